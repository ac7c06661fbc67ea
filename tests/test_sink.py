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
