"""A BatchNormalization read through layout ops and fan-out by several linear ops (NextViT's
norm before q, k and v) is moved to each of them and folded there; otherwise it stays."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import Builder, assert_equivalent, fuse_and_check, op_counts
from reparam_onnx import fuse_with_report

C = 6


def _ints(b: Builder, values) -> str:
    from onnx import numpy_helper
    name = b.name("i")
    b.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


def _linear(b: Builder, x: str, out: int = 5) -> str:
    return b.node("Add", [b.node("MatMul", [x, b.const(b.rng.normal(0, 0.5, (C, out)))]), b.const(b.rng.normal(0, 1, out))])


def _tokens(b: Builder, y: str, shape) -> str:
    """[B, C, H, W] → [B, C, H·W] → [B, H·W, C], as x.flatten(2).transpose(1, 2)."""
    return b.node("Transpose", [b.node("Reshape", [y, _ints(b, shape)])], perm=[0, 2, 1])


def _attention_inputs(b: Builder, x: str, size, pool=None, batch=2, readers=3, reshape=None):
    """norm → tokens → q, and (pool: AveragePool → norm → tokens) → k, v; the outputs concatenated."""
    n = size[0] * size[1]
    y = b.bn(x, C)
    flat = b.node("Reshape", [y, _ints(b, reshape or [batch, C, n])])
    outs = [_linear(b, b.node("Transpose", [flat], perm=[0, 2, 1]))]
    if pool is not None:
        pooled = b.node("AveragePool", [flat], kernel_shape=[pool["k"]], strides=[pool["k"]],
                        pads=pool.get("pads", [0, 0]))
        kv = b.node("Transpose", [b.bn(pooled, C)], perm=[0, 2, 1])
    else:
        kv = b.node("Transpose", [flat], perm=[0, 2, 1])
    outs += [_linear(b, kv) for _ in range(readers - 1)]
    return [b.node("ReduceMean", [o], axes=[1], keepdims=0) for o in outs]


@pytest.mark.parametrize("size", [(5, 7), (4, 3)])
def test_a_norm_read_by_q_k_v_through_tokens_folds_into_each(size):
    b = Builder(seed=40)
    x = b.input([2, C] + list(size))
    model = b.model(b.node("Concat", _attention_inputs(b, x, size), axis=1))
    before = op_counts(model)
    # each reader stays a Linear after its Transpose (the deploy form), not a 1-D Conv before it
    result = fuse_and_check(model, {"BatchNormalization": 0, "Conv": 0, "MatMul": before["MatMul"],
                                    "Transpose": before["Transpose"], "Add": before["MatMul"]})
    assert any("moved 1 BatchNormalization" in note for note in result.report.notes)
    assert all("batchnormalization1" in r.nodes for r in result.report.fused)   # named as in the input


@pytest.mark.parametrize("size,k", [((4, 6), 2), ((3, 5), 3)])
def test_a_norm_before_a_pooled_norm_moves_past_the_pool(size, k):
    """Next-ViT's E_MHSA with sr_ratio > 1: norm1 → tokens → q, and → AvgPool → norm → k, v."""
    b = Builder(seed=41)
    x = b.input([2, C] + list(size))
    model = b.model(b.node("Concat", _attention_inputs(b, x, size, pool={"k": k}), axis=1))
    fuse_and_check(model, {"BatchNormalization": 0, "AveragePool": 1})


def test_a_dynamic_batch_is_kept_apart_from_the_channels():
    """Reshape to [0, C, -1]: the batch copied, the channels whole, whatever the batch is."""
    b = Builder(seed=42)
    size = (5, 3)
    x = b.input(["B", C] + list(size))
    model = b.model(b.node("Concat", _attention_inputs(b, x, size, reshape=[0, C, -1]), axis=1))
    result = fuse_and_check(model, {"BatchNormalization": 0})
    feeds = {"x": np.random.default_rng(3).normal(size=(3, C) + size).astype(np.float32)}
    assert_equivalent(model, result.model, feeds)


@pytest.mark.parametrize("case", ["padded_pool", "channels_split", "not_linear", "no_rule"])
def test_a_norm_that_cannot_reach_every_reader_stays(case):
    """A pool that reads padding (the shift would be averaged with zeros), a Reshape that splits
    the channels, a reader that is not linear, or copies no rule takes in: the BN stays where it
    was and the model is as it came (no copy left behind)."""
    size = (4, 6)
    b = Builder(seed=43)
    x = b.input([2, C] + list(size)) if case != "channels_split" else None
    kwargs, options = {}, {}
    if case == "padded_pool":
        kwargs = {"pool": {"k": 3, "pads": [1, 1]}}
    elif case == "no_rule":
        options = {"disable_rules": ["linear_bn", "generic"]}
    if case == "channels_split":   # H == C: [2, C, C, 4] → [2·C, C, 4] has an axis of C, but it is H
        x = b.input([2, C, C, 4], name="xc")
        y = b.node("Reshape", [b.bn(x, C), _ints(b, [2 * C, C, 4])])
        t = b.node("Transpose", [y], perm=[0, 2, 1])
        outs = [b.node("ReduceMean", [_linear(b, t)], axes=[1], keepdims=0) for _ in range(2)]
    else:
        outs = _attention_inputs(b, x, size, **kwargs)
        if case == "not_linear":
            flat = b.node("Reshape", [b.nodes[0].output[0], _ints(b, [2, C, 24])])
            outs.append(b.node("ReduceMean", [b.node("Relu", [flat])], axes=[2], keepdims=0))
    model = b.model(b.node("Concat", outs, axis=1))
    result = fuse_with_report(model, check_blocks=False, verify=False, **options)
    assert any(n.name == "batchnormalization1" for n in result.model.graph.node)
    assert not any(n.name and "moved" in n.name for n in result.model.graph.node)
    if case != "padded_pool":   # there the norm after the pool moves to k and v: nothing pads after it
        assert op_counts(result.model)["BatchNormalization"] == op_counts(model)["BatchNormalization"]
        assert not any("moved" in note for note in result.report.notes)
    assert_equivalent(model, result.model)
    if case == "no_rule":
        assert result.model.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("readers", [2, 3])
def test_a_norm_read_directly_by_several_convs_folds_into_each(readers):
    """x → BN → several unpadded 1×1 Convs reading the BN itself (efficientformerv2's q, k, v
    without constant folding): each takes a copy (this was an internal error)."""
    b = Builder(seed=44)
    x = b.input([2, C, 5, 7])
    y = b.bn(x, C)
    outs = [b.conv(y, C, 4, (1, 1)) for _ in range(readers)]
    result = fuse_and_check(b.model(*outs), {"BatchNormalization": 0, "Conv": readers, "Mul": 0, "Add": 0})
    assert [r.rule for r in result.report.fused] == ["prebn"] * readers


def test_a_norm_read_directly_and_through_tokens_moves_to_both():
    b = Builder(seed=45)
    size = (3, 5)
    x = b.input([2, C] + list(size))
    y = b.bn(x, C)
    direct = b.node("ReduceMean", [b.conv(y, C, 4, (1, 1))], axes=[2, 3], keepdims=0)
    tokens = b.node("ReduceMean", [_linear(b, _tokens(b, y, [2, C, 15]))], axes=[1], keepdims=0)
    fuse_and_check(b.model(b.node("Concat", [direct, tokens], axis=1)), {"BatchNormalization": 0})


def test_a_conv_norm_read_by_several_folds_into_its_conv():
    """Conv → BN → several 1×1 Convs: the BN folds once into the Conv before it, not into each reader."""
    b = Builder(seed=46)
    x = b.input([2, C, 9, 9])
    y = b.bn(b.conv(x, C, C, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), group=C), C)
    outs = [b.conv(y, C, 4, (1, 1)) for _ in range(3)]
    result = fuse_and_check(b.model(*outs), {"BatchNormalization": 0, "Conv": 4})
    assert [r.rule for r in result.report.fused] == ["conv_bn"]
    assert not any("moved" in note for note in result.report.notes)


@pytest.mark.parametrize("batch", [2, "B"])
def test_a_norm_flattened_by_its_own_shape_moves(batch):
    """TorchScript's x.flatten(2) after a norm: Reshape(y, Concat(Shape(y)[:2], [-1])), and
    Shape(y) read again for H·W (fastvit_sa12's attention). The Shape readers read only the
    shape, which the move keeps; the target is followed with a dynamic batch as a symbol."""
    b = Builder(seed=47)
    size = (3, 5)
    x = b.input([batch, C] + list(size))
    y = b.bn(x, C)
    shape = b.node("Shape", [y])
    target = b.node("Concat", [b.node("Slice", [shape, _ints(b, [0]), _ints(b, [2]), _ints(b, [0])]), _ints(b, [-1])],
                    axis=0)
    tokens = b.node("Transpose", [b.node("Reshape", [y, target])], perm=[0, 2, 1])
    h = b.node("Gather", [b.node("Shape", [y]), _ints(b, 2)], axis=0)
    model = b.model(_linear(b, tokens), b.node("Cast", [h], to=1))
    result = fuse_and_check(model, {"BatchNormalization": 0})
    assert [r.rule for r in result.report.fused] == ["linear_bn"]
    if batch == "B":
        feeds = {"x": np.random.default_rng(4).normal(size=(3, C) + size).astype(np.float32)}
        assert_equivalent(model, result.model, feeds)


def test_a_norm_pooled_then_flattened_by_the_input_batch_moves():
    """B, C = x.shape at the top of forward, then pool(norm(x)).reshape(B, C, -1): the batch read
    from x is the pooled tensor's batch (a pool keeps batch and channels)."""
    b = Builder(seed=48)
    x = b.input(["B", C, 4, 6])
    batch = b.node("Slice", [b.node("Shape", [x]), _ints(b, [0]), _ints(b, [1]), _ints(b, [0])])
    target = b.node("Concat", [batch, _ints(b, [C]), _ints(b, [-1])], axis=0)
    pooled = b.node("AveragePool", [b.bn(x, C)], kernel_shape=[2, 2], strides=[2, 2])
    tokens = b.node("Transpose", [b.node("Reshape", [pooled, target])], perm=[0, 2, 1])
    model = b.model(_linear(b, tokens))
    result = fuse_and_check(model, {"BatchNormalization": 0, "AveragePool": 1})
    feeds = {"x": np.random.default_rng(5).normal(size=(3, C, 4, 6)).astype(np.float32)}
    assert_equivalent(model, result.model, feeds)


def _gemm_head(b: Builder, x: str, out: int = 5) -> str:
    return b.node("Gemm", [x, b.const(b.rng.normal(0, 0.5, (out, C))), b.const(b.rng.normal(0, 1, out))], transB=1)


@pytest.mark.parametrize("batch", [2, "B"])
@pytest.mark.parametrize("pool", ["global_average", "mean_keepdims", "mean_axes_input", "mean_to_conv"])
def test_a_final_norm_moves_past_the_global_mean_into_the_heads(pool, batch):
    """A per-channel affine commutes with a mean over positions: BN → GlobalAveragePool → Flatten
    → Gemm, BN → ReduceMean → Gemm heads (efficientformerv2's final norm and its two heads), BN →
    mean → 1×1 conv classifier."""
    opset = 18 if pool == "mean_axes_input" else 13
    b = Builder(seed=49, opset=opset)
    x = b.input([batch, C, 3, 5])   # a dynamic batch: Flatten's [B, C] is proven with B a symbol
    y = b.bn(x, C)
    if pool == "global_average":
        outs = [_gemm_head(b, b.node("Flatten", [b.node("GlobalAveragePool", [y])]))]
    elif pool == "mean_keepdims":
        outs = [_gemm_head(b, b.node("Flatten", [b.node("ReduceMean", [y], axes=[2, 3], keepdims=1)]))]
    elif pool == "mean_axes_input":
        mean = b.node("ReduceMean", [y, _ints(b, [-1, 2])], keepdims=0)
        outs = [_gemm_head(b, mean), _gemm_head(b, mean)]
    else:
        outs = [b.conv(b.node("ReduceMean", [y], axes=[2, 3], keepdims=1), C, 4, (1, 1))]
    fuse_and_check(b.model(*outs), {"BatchNormalization": 0, "Mul": 0})


@pytest.mark.parametrize("pool", ["mean_over_channels", "global_max"])
def test_a_norm_before_a_pool_that_mixes_channels_or_is_not_a_mean_stays(pool):
    b = Builder(seed=50)
    x = b.input([2, C, 3, 5])
    y = b.bn(x, C)
    if pool == "mean_over_channels":
        pooled = b.node("ReduceMean", [y], axes=[1, 3], keepdims=1)
        out = b.conv(pooled, 1, 4, (1, 1))
    else:
        out = _gemm_head(b, b.node("Flatten", [b.node("GlobalMaxPool", [y])]))
    model = b.model(out)
    result = fuse_with_report(model)
    assert op_counts(result.model)["BatchNormalization"] == 1
    assert_equivalent(model, result.model)


def test_a_norm_moves_past_a_channels_last_mean():
    """BN → NHWC Transpose → ReduceMean over H, W (keepdims 0): the channels go from axis 3 to 1."""
    b = Builder(seed=51)
    x = b.input([2, C, 3, 5])
    t = b.node("Transpose", [b.bn(x, C)], perm=[0, 2, 3, 1])
    fuse_and_check(b.model(_gemm_head(b, b.node("ReduceMean", [t], axes=[1, 2], keepdims=0))),
                   {"BatchNormalization": 0})


@pytest.mark.parametrize("case", ["mean_over_channels", "global_pool_channels_last"])
def test_a_mean_over_the_channels_keeps_the_norm_even_unverified(case):
    """Averaging over the channel axis does not commute with a per-channel affine: the BN stays,
    and it is the move's own condition that says so (no verification to catch it)."""
    b = Builder(seed=52)
    if case == "mean_over_channels":   # [2, C, C]: the mean over axis 1 leaves C values a Gemm can read
        x = b.input([2, C, C])
        out = _gemm_head(b, b.node("ReduceMean", [b.bn(x, C)], axes=[1], keepdims=0))
    else:                              # NHWC with W == C: GlobalAveragePool averages W and C
        x = b.input([2, C, 3, C])
        t = b.node("Transpose", [b.bn(x, C)], perm=[0, 3, 2, 1])   # [N, W(=C), H, C]
        out = _gemm_head(b, b.node("Flatten", [b.node("GlobalAveragePool", [t])]))
    model = b.model(out)
    result = fuse_with_report(model, verify=False)
    assert op_counts(result.model)["BatchNormalization"] == 1
    assert_equivalent(model, result.model)


def test_a_norm_before_a_pool_and_a_pointwise_conv_folds_into_the_conv():
    """coatnet's downsampling shortcut: BN → AvgPool 2×2/2 → 1×1 conv. Pool and conv merged would
    be a dense 2×2 conv (more weights), so the chain is cut above the pool: the moved BN folds
    into the 1×1 conv and the pool stays."""
    b = Builder(seed=53)
    x = b.input([2, C, 6, 8])
    pooled = b.node("AveragePool", [b.bn(x, C)], kernel_shape=[2, 2], strides=[2, 2])
    y = b.conv(pooled, C, 2 * C, (1, 1))
    result = fuse_and_check(b.model(b.node("Relu", [y])), {"BatchNormalization": 0, "AveragePool": 1, "Conv": 1})
    assert [r.rule for r in result.report.fused] == ["prebn"]


def _mixconv(b: Builder, x: str, kernels, axis: int = 1, **reuse) -> str:
    """MixNet's MixConv: Split the channels, a depthwise conv of its own kernel size per part,
    Concat, then one BN."""
    parts = len(kernels)
    split = b.node("Split", [x, _ints(b, [C // parts] * parts)], n_out=parts, axis=1)
    names = [split] + [f"{split[:-4]}_out{i}" for i in range(1, parts)]
    convs = [b.conv(n, C // parts, C // parts, (k, k), pads=(k // 2,) * 4, group=C // parts, bias=False)
             for n, k in zip(names, kernels)]
    if reuse.get("input_as_part"):
        convs[-1] = names[-1]
    return b.bn(b.node("Concat", convs, axis=axis), C), convs


@pytest.mark.parametrize("batch", [2, "B"])
@pytest.mark.parametrize("kernels", [(3, 5), (3, 5, 7)])
def test_a_norm_after_a_channel_concat_of_convs_splits_into_them(kernels, batch):
    b = Builder(seed=54)
    x = b.input([batch, C, 7, 5])
    y, _ = _mixconv(b, x, kernels)
    result = fuse_and_check(b.model(b.node("Relu", [y])), {"BatchNormalization": 0, "Concat": 1,
                                                            "Conv": len(kernels)})
    assert [r.rule for r in result.report.fused] == ["conv_bn"] * len(kernels)
    assert all("batchnormalization1" in r.nodes for r in result.report.fused)   # named as in the input
    assert any("split 1 BatchNormalization" in note for note in result.report.notes)
    read = {name for n in result.model.graph.node for name in n.input}
    assert {t.name for t in result.model.graph.initializer} <= read   # neither the BN's nor its slices' left


@pytest.mark.parametrize("case", ["part_read_elsewhere", "part_not_a_conv", "concat_on_another_axis"])
def test_a_norm_after_a_concat_that_is_not_only_its_convs_stays(case):
    b = Builder(seed=55)
    x = b.input([2, C, 6, 6])
    if case == "concat_on_another_axis":
        parts = [b.conv(x, C, C, (1, 1), bias=False), b.conv(x, C, C, (1, 1), bias=False)]
        y = b.bn(b.node("Concat", parts, axis=2), C)
        outs = [y]
    else:
        y, convs = _mixconv(b, x, (3, 5), input_as_part=case == "part_not_a_conv")
        outs = [y, b.node("Relu", [convs[0]])] if case == "part_read_elsewhere" else [y]
    model = b.model(*outs)
    result = fuse_with_report(model)
    # split, the BN would be exact but would not fold whole: it stays as it was, one BN
    assert [n.name for n in result.model.graph.node if n.op_type == "BatchNormalization"] == ["batchnormalization1"]
    assert not any("split" in note for note in result.report.notes)
    assert_equivalent(model, result.model)
