"""The cost guard: an exact merge that costs more than its branches stays unless asked, and
no merge ever builds a kernel past the safety limit (coprime dilations, issue 7 item 8)."""
from __future__ import annotations

import time

import pytest

from conftest import Builder, assert_untouched, fuse_and_check, invoke
from reparam_onnx import fuse_with_report
from reparam_onnx.linear import MAX_MERGED_WEIGHTS


def _dense_beside_depthwise():
    """A depthwise 3×3 beside a dense 1×1: exact as one dense 3×3 (9·C² weights against 9·C + C²)."""
    b = Builder(seed=51)
    x = b.input([1, 8, 11, 9])
    y = b.add(b.bn(b.conv(x, 8, 8, (3, 3), pads=(1, 1, 1, 1), group=8, bias=False), 8),
              b.bn(b.conv(x, 8, 8, (1, 1), bias=False), 8))
    return b.model(y)


def _coprime_dilations(channels: int):
    """Depthwise 3×3 beside depthwise 3×3 at dilation 400: one grid only at an 801×801 kernel."""
    b = Builder(seed=52)
    x = b.input([1, channels, 5, 4])
    y = b.add(b.conv(x, channels, channels, (3, 3), pads=(1, 1, 1, 1), group=channels),
              b.conv(x, channels, channels, (3, 3), pads=(400,) * 4, dilations=(400, 400), group=channels))
    return b.model(y)


def test_more_expensive_merge_stays_with_its_figures():
    result = assert_untouched(_dense_beside_depthwise(), "merging would cost more", identical=False)
    (block,) = [b for b in result.report.blocks if not b.fused]
    assert "576 weights" in block.reason and "against 136" in block.reason and "--allow-larger" in block.reason
    # the two Conv→BN branches alone are still folded: never a half-merged sum
    assert sorted(b.rule for b in result.report.fused) == ["conv_bn", "conv_bn"]


def test_allow_larger_merges_it_exactly():
    result = fuse_and_check(_dense_beside_depthwise(), {"Conv": 1, "Add": 0}, allow_larger=True)
    assert result.report.fused[0].kernel == [3, 3]


def test_coprime_dilations_stay_by_default():
    start = time.perf_counter()
    result = assert_untouched(_coprime_dilations(4), "merged 801×801 conv would have")
    assert time.perf_counter() - start < 10
    assert not result.report.fused


def test_coprime_dilations_past_the_limit_stay_even_when_allowed():
    channels = 128   # 128 × 801² weights > MAX_MERGED_WEIGHTS
    assert channels * 801 * 801 > MAX_MERGED_WEIGHTS
    assert_untouched(_coprime_dilations(channels), "over the limit", allow_larger=True)


@pytest.mark.parametrize("flag", [[], ["--allow-larger"]])
def test_cli_allow_larger(tmp_path, flag):
    import onnx
    model = tmp_path / "m.onnx"
    onnx.save(_dense_beside_depthwise(), model)
    out = tmp_path / "out.onnx"
    assert invoke([model, "-o", out, "-q", *flag]) == 0
    adds = [n for n in onnx.load(out).graph.node if n.op_type == "Add"]
    assert len(adds) == (0 if flag else 1)


def test_repvgg_family_is_never_more_expensive():
    """k×k + 1×1 + identity merges into k×k: fewer weights, so the guard never stands in its way."""
    from conftest import repvgg_block
    b = Builder(seed=53)
    x = b.input([1, 4, 9, 9])
    result = fuse_with_report(b.model(repvgg_block(b, x, 4, 4, group=2)))
    assert [blk.rule for blk in result.report.fused] == ["yolo_repconv"]


def _chain(b: Builder, x: str, convs) -> str:
    """Convs in a row (c_in, c_out, k, group), each without bias (zero padding stays exact),
    then a BN: a sequential block."""
    y = x
    for c_in, c_out, k, group in convs:
        y = b.conv(y, c_in, c_out, (k, k), pads=(k // 2,) * 4, group=group, bias=False)
    return b.bn(y, convs[-1][1])


def test_a_costly_chain_is_refused_before_its_kernel_is_built(monkeypatch):
    """FastViT's ConvMlp: depthwise 7×7 → 1×1 to 4C is a dense 7×7 of 4C·C·49 weights: refused from
    the block's output channels and sizes before composing (it took 14 s and 1.8 GB at C = 512)."""
    from reparam_onnx import kernels
    calls = []
    real = kernels.compose_kernels
    monkeypatch.setattr(kernels, "compose_kernels", lambda *a, **k: calls.append(1) or real(*a, **k))
    b = Builder(seed=53)
    x = b.input([1, 8, 9, 7])
    y = _chain(b, x, [(8, 8, 7, 8), (8, 32, 1, 1)])
    result = fuse_and_check(b.model(y), {"Conv": 2, "BatchNormalization": 0})
    assert not calls
    assert [r.rule for r in result.report.fused] == ["conv_bn"]   # the 1×1 → BN alone


def test_a_chain_whose_middle_is_wider_than_its_ends_still_merges():
    """1×1 C→C/4, 3×3 C/4→4C, 1×1 4C→C/4: composing the first two is larger than the whole block
    (4C·C·9), but the block writes C/4 channels, and C/4·C·9 is less than it replaces."""
    b = Builder(seed=54)
    x = b.input([1, 8, 9, 7])
    y = _chain(b, x, [(8, 2, 1, 1), (2, 32, 3, 1), (32, 2, 1, 1)])
    result = fuse_and_check(b.model(y), {"Conv": 1, "BatchNormalization": 0})
    assert result.report.fused[0].kernel == [3, 3]
