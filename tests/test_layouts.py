"""NHWC graphs as tf2onnx and friends write them: Transposes around convs, per-channel
constants on the last axis, explicit Pad nodes, SAME padding. They fuse exactly, and the
Transposes between fused blocks cancel."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import Builder, fuse_and_check, op_counts, repvgg_block
from reparam_onnx import fuse_with_report

TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def nhwc_block(b: Builder, x: str, c_in: int, c_out: int, stride: int = 1, identity: bool = True,
               padding: str = "explicit", shared_transpose: bool = True, bn_shape=(-1,)) -> str:
    """3×3 + 1×1 convs in NCHW between Transposes, identity BN as Mul/Add in NHWC, Adds in NHWC."""
    r = b.rng
    shared = b.node("Transpose", [x], perm=TO_NCHW) if shared_transpose else None

    def branch(k):
        src = x
        if padding == "pad" and k == 3:
            pads = b.const(np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64), "pads")
            b.inits[-1] = onnx.numpy_helper.from_array(np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64), pads)
            src = b.node("Pad", [x, pads])
            t = b.node("Transpose", [src], perm=TO_NCHW)
            conv = b.conv(t, c_in, c_out, (k, k), (stride, stride), (0, 0, 0, 0))
        else:
            t = shared if shared is not None else b.node("Transpose", [src], perm=TO_NCHW)
            if padding == "same":
                conv = b.conv(t, c_in, c_out, (k, k), (stride, stride), auto_pad="SAME_UPPER")
            else:
                p = k // 2
                conv = b.conv(t, c_in, c_out, (k, k), (stride, stride), (p, p, p, p))
        return b.node("Transpose", [conv], perm=TO_NHWC)

    terms = [branch(3), branch(1)]
    if identity and stride == 1 and c_in == c_out:
        scale = b.const(r.uniform(.5, 1.5, c_in).reshape(bn_shape), "scale")
        shift = b.const(r.normal(0, .5, c_in).reshape(bn_shape), "shift")
        terms.append(b.node("Add", [b.node("Mul", [x, scale]), shift]))
    return b.add(*terms)


@pytest.mark.parametrize("padding", ["explicit", "pad", "same"])
@pytest.mark.parametrize("stride,spatial", [(1, (13, 11)), (2, (13, 11)), (2, (14, 12))])
def test_nhwc_block(padding, stride, spatial):
    b = Builder(seed=stride)
    x = b.input([2] + list(spatial) + [4])
    y = b.node("Relu", [nhwc_block(b, x, 4, 4, stride, padding=padding)])
    result = fuse_and_check(b.model(y), {"Conv": 1, "Add": 0, "Mul": 0, "Pad": 0})
    assert len(result.report.fused) == 1


@pytest.mark.parametrize("bn_shape", [(-1,), (1, 1, 1, -1)])
def test_nhwc_stack_keeps_only_the_model_transposes(bn_shape):
    b = Builder(seed=5)
    x = b.input(["N", 15, 13, 4])
    h = b.node("Relu", [nhwc_block(b, x, 4, 8, stride=2, bn_shape=bn_shape)])
    for _ in range(2):
        h = b.node("Relu", [nhwc_block(b, h, 8, 8, bn_shape=bn_shape)])
    result = fuse_and_check(b.model(h), {"Conv": 3, "Add": 0, "Mul": 0, "Relu": 3, "Transpose": 2})
    assert len(result.report.fused) == 3
    assert any("Transposes" in note for note in result.report.notes)


def test_nchw_shaped_constant_in_nhwc_is_not_per_channel():
    """[1, C, 1, 1] against an NHWC tensor broadcasts over H: not a per-channel scale."""
    b = Builder(seed=6)
    x = b.input([1, 4, 4, 4])
    t = b.node("Transpose", [x], perm=TO_NCHW)
    conv = b.node("Transpose", [b.conv(t, 4, 4, (3, 3), pads=(1,) * 4)], perm=TO_NHWC)
    y = b.node("Mul", [conv, b.const(np.random.default_rng(0).uniform(.5, 2, (1, 4, 1, 1)))])
    model = b.model(y)
    result = fuse_with_report(model)
    reasons = [bl.reason for bl in result.report.blocks if not bl.fused]
    assert any("not per-channel on axis 3" in r for r in reasons), reasons
    assert op_counts(result.model)["Mul"] == 1


def test_per_channel_constant_on_the_right_axis_nhwc_chain():
    b = Builder(seed=7)
    x = b.input([1, 9, 7, 4])
    t = b.node("Transpose", [x], perm=TO_NCHW)
    conv = b.node("Transpose", [b.conv(t, 4, 6, (3, 3), pads=(1,) * 4)], perm=TO_NHWC)
    y = b.node("Add", [b.node("Mul", [conv, b.const(np.random.default_rng(0).uniform(.5, 2, 6))]),
                       b.const(np.random.default_rng(1).normal(size=(1, 1, 1, 6)))])
    fuse_and_check(b.model(y), {"Conv": 1, "Mul": 0, "Add": 0})


def test_reflect_pad_is_not_zero_padding():
    b = Builder(seed=8)
    x = b.input([1, 9, 7, 4])
    pads = b.const(np.zeros(8), "pads")
    b.inits[-1] = onnx.numpy_helper.from_array(np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64), pads)
    p = b.node("Pad", [x, pads], mode="reflect")
    conv = b.conv(b.node("Transpose", [p], perm=TO_NCHW), 4, 4, (3, 3))
    y = b.add(b.bn(conv, 4), b.bn(b.conv(b.node("Transpose", [x], perm=TO_NCHW), 4, 4, (1, 1)), 4))
    model = b.model(y)
    result = fuse_with_report(model)
    assert any("reflect" in (bl.reason or "") for bl in result.report.blocks)


def test_dynamic_spatial_is_verified_at_odd_and_even_sizes():
    b = Builder(seed=9)
    x = b.input(["N", "H", "W", 4])
    y = b.node("Relu", [nhwc_block(b, x, 4, 4, stride=2)])
    model = b.model(y)
    result = fuse_with_report(model)
    assert result.report.verification.runs == 2 and result.report.verification.passed
    for size in (9, 10):
        feeds = {"x": np.random.default_rng(size).standard_normal((1, size, size + 3, 4)).astype(np.float32)}
        from conftest import assert_equivalent
        assert_equivalent(model, result.model, feeds)


def test_transpose_pair_without_ops_between_cancels():
    """tf2onnx sometimes lays a block input out NHWC for an identity Mul and back for the convs."""
    b = Builder(seed=10)
    x = b.input([1, 4, 9, 7])
    r = b.node("Relu", [b.conv(x, 4, 4, (1, 1))])
    nhwc = b.node("Transpose", [r], perm=TO_NHWC)
    ident = b.node("Transpose", [b.node("Mul", [nhwc, b.const(np.random.default_rng(0).uniform(.5, 2, 4))])],
                   perm=TO_NCHW)
    back = b.node("Transpose", [nhwc], perm=TO_NCHW)
    y = b.add(b.conv(back, 4, 4, (3, 3), pads=(1,) * 4), b.conv(back, 4, 4, (1, 1)), ident)
    fuse_and_check(b.model(b.node("Relu", [y])), {"Conv": 2, "Add": 0, "Mul": 0, "Transpose": 0})


def test_unrelated_transpose_chain_is_left_alone():
    """A Transpose→Mul→Transpose⁻¹ chain on another input would cancel, but the fusion did not
    make it: only pairs around fused blocks are the rewrite's to cancel; this one stays byte for byte."""
    b = Builder(seed=11)
    x = b.input([1, 4, 9, 7])
    z = b.input([1, 4, 5, 6], name="z")
    y = b.node("Relu", [repvgg_block(b, x, 4, 4)])
    nhwc = b.node("Transpose", [z], perm=TO_NHWC)
    w = b.node("Transpose", [b.node("Mul", [nhwc, b.const(np.random.default_rng(0).uniform(.5, 2, 4))])],
               perm=TO_NCHW)
    model = b.model(y, w)
    result = fuse_and_check(model, {"Conv": 1, "Transpose": 2, "Mul": 1})
    assert len(result.report.fused) == 1 and not result.report.notes
    chain = {n.name: n.SerializeToString() for n in model.graph.node if n.name in ("transpose1", "mul1", "transpose2")}
    assert len(chain) == 3
    assert {n.name: n.SerializeToString() for n in result.model.graph.node if n.name in chain} == chain
    constant = next(t for t in model.graph.initializer if t.name == "w3")
    assert [t for t in result.model.graph.initializer if t.name == "w3"] == [constant]
