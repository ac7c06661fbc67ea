"""Ops in sequence collapse like branches in parallel: Conv∘Conv (with the border condition),
AveragePool as a depthwise conv, a BN before a conv, Gemm/MatMul with BN before or after;
and the inexact forms stay with a reason naming the condition."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import Builder, assert_equivalent, assert_untouched, fuse_and_check, op_counts
from reparam_onnx import fuse_with_report

C = 4
GEOMETRY = [  # (stride, group, spatial size): odd sizes, stride 2, groups > 1
    (1, 1, (9, 11)),
    (2, 1, (11, 9)),
    (1, 2, (7, 10)),
    (2, 2, (10, 13)),
]
ZERO = (0, 0, 0, 0)
ONE = (1, 1, 1, 1)


def _int_const(b: Builder, values) -> str:
    from onnx import numpy_helper
    name = b.name("i")
    b.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


def _zero_pad(b: Builder, x: str, value=None) -> str:
    inputs = [x, _int_const(b, [0, 0, 1, 1, 0, 0, 1, 1])]
    if value is not None:
        inputs.append(b.const(np.array(value)))
    return b.node("Pad", inputs, mode="constant")


@pytest.mark.parametrize("stride,group,size", GEOMETRY)
def test_dbb_with_zero_bias_intermediate_and_avgpool(stride, group, size):
    """k×k + 1×1 + (1×1 → k×k) + (1×1 → AvgPool), each with BN: one k×k conv."""
    b = Builder(seed=stride * 10 + group)
    x = b.input([2, C] + list(size))
    s = (stride, stride)
    kxk = b.bn(b.conv(x, C, C, (3, 3), s, ONE, group=group, bias=False), C)
    one = b.bn(b.conv(x, C, C, (1, 1), s, ZERO, group=group, bias=False), C)
    chain = b.bn(b.conv(b.conv(x, C, C, (1, 1), group=group, bias=False), C, C, (3, 3), s, ONE, group=group,
                        bias=False), C)
    avg = b.bn(b.node("AveragePool", [b.conv(x, C, C, (1, 1), group=group, bias=False)], kernel_shape=[3, 3],
                      strides=list(s), pads=list(ONE), count_include_pad=1), C)
    result = fuse_and_check(b.model(b.add(kxk, one, chain, avg)), {"Conv": 1, "Add": 0, "AveragePool": 0})
    assert [r.rule for r in result.report.fused] == ["dbb"]


def _bn_shift(b: Builder) -> np.ndarray:
    """The shift β − μ·γ/√(σ²+ε) of the BN the builder made last (in float32, as an exporter does)."""
    from onnx import numpy_helper
    gamma, beta, mean, var = (numpy_helper.to_array(t) for t in b.inits[-4:])
    return beta - mean * gamma / np.sqrt(var + np.float32(1e-5))


@pytest.mark.parametrize("stride,group,size", GEOMETRY)
@pytest.mark.parametrize("matching", [True, False])
def test_padding_with_the_intermediate_bias_is_exact(stride, group, size, matching):
    """DBB written with an explicit Pad: conv1×1 → BN → −t → zero Pad → +t → k×k (unpadded): exact
    when t is the BN's shift (every padded position then holds what the merged conv sees there)."""
    b = Builder(seed=stride + 3 * group)
    x = b.input([2, C] + list(size))
    first = b.bn(b.conv(x, C, C, (1, 1), group=group, bias=False), C)
    t = _bn_shift(b) if matching else b.rng.normal(0, 1, C)
    shift = b.const(t.reshape(1, C, 1, 1))
    padded = b.node("Add", [_zero_pad(b, b.node("Sub", [first, shift])), shift])
    chain = b.bn(b.conv(padded, C, C, (3, 3), (stride, stride), ZERO, group=group, bias=False), C)
    kxk = b.bn(b.conv(x, C, C, (3, 3), (stride, stride), ONE, group=group, bias=False), C)
    model = b.model(b.add(kxk, chain))
    if matching:
        fuse_and_check(model, {"Conv": 1, "Add": 0, "Pad": 0, "Sub": 0})
    else:   # the 1×1's bias (t ≠ its BN's shift) reaches the 3×3's zero padding: the two stay apart
        result = assert_untouched(model, "not exact at the borders", identical=False)
        assert op_counts(result.model)["Conv"] == 3
        assert all("reparam" not in (r.reason or "") for r in result.report.unfused)   # named by its originals


def test_pad_value_equal_to_a_constant_bias_is_exact():
    b = Builder(seed=4)
    x = b.input([2, C, 9, 9])
    w = b.const(b.rng.normal(0, 0.5, (C, C, 1, 1)))
    first = b.node("Conv", [x, w, b.const(np.full(C, 0.75))], kernel_shape=[1, 1])
    y = b.conv(_zero_pad(b, first, 0.75), C, C, (3, 3), pads=ZERO)
    fuse_and_check(b.model(b.add(y, b.bn(b.conv(x, C, C, (3, 3), pads=ONE), C))), {"Conv": 1, "Pad": 0})


def test_zero_padding_after_a_bias_stays():
    """DBB done naively: the intermediate has a bias, the padding is zero: not exact at the borders."""
    b = Builder(seed=5)
    x = b.input([2, C, 9, 9])
    chain = b.conv(_zero_pad(b, b.bn(b.conv(x, C, C, (1, 1), bias=False), C)), C, C, (3, 3), pads=ZERO)
    model = b.model(b.add(chain, b.bn(b.conv(x, C, C, (3, 3), pads=ONE), C)))
    result = assert_untouched(model, "not the value its input has at a padded position", identical=False)
    assert op_counts(result.model)["Pad"] == 1


def test_padded_conv_after_a_biased_1x1_stays():
    """The dynamo exporter moves the zero Pad into the next conv's pads: the same condition."""
    b = Builder(seed=6)
    x = b.input([2, C, 9, 9])
    chain = b.conv(b.conv(x, C, C, (1, 1)), C, C, (3, 3), pads=ONE)
    model = b.model(b.add(chain, b.bn(b.conv(x, C, C, (3, 3), pads=ONE), C)))
    assert_untouched(model, "conv with a bias before the padded Conv", identical=False)


@pytest.mark.parametrize("first_stride,second_stride,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)])
def test_kxk_after_kxk_composes_when_the_second_is_unpadded(first_stride, second_stride, dilation):
    b = Builder(seed=first_stride + 2 * second_stride + dilation)
    x = b.input([2, C, 13, 11])
    first = b.bn(b.conv(x, C, 2 * C, (3, 3), (first_stride,) * 2, ONE, bias=False), 2 * C)
    y = b.bn(b.conv(first, 2 * C, C, (3, 3), (second_stride,) * 2, ZERO, (dilation,) * 2, bias=False), C)
    result = fuse_and_check(b.model(y), {"Conv": 1, "BatchNormalization": 0}, allow_larger=True)
    assert result.report.fused[0].kernel == [2 * dilation * first_stride + 3] * 2


def test_padded_kxk_after_kxk_stays():
    b = Builder(seed=8)
    x = b.input([2, C, 9, 9])
    y = b.conv(b.bn(b.conv(x, C, C, (3, 3), pads=ONE, bias=False), C), C, C, (3, 3), pads=ONE)
    result = fuse_and_check(b.model(y), {"Conv": 2, "BatchNormalization": 0})   # the Conv→BN folds, no more
    assert not result.report.unfused   # two convs in sequence are a network, not a block to report


def test_costly_chain_of_convs_is_not_a_block():
    """8 → 2 → 8 channels through two 1×1 convs: merged (64 weights) costs more than the two (32)."""
    b = Builder(seed=9)
    x = b.input([2, 8, 5, 5])
    y = b.conv(b.conv(x, 8, 2, (1, 1)), 2, 8, (1, 1))
    result = fuse_with_report(b.model(y))
    assert not result.report.blocks


@pytest.mark.parametrize("attrs,reason", [
    ({"pads": [1, 1, 1, 1], "count_include_pad": 0}, "leaves the padding out of its average"),
    ({"pads": [0, 0, 0, 0], "ceil_mode": 1, "strides": [2, 2]}, "ceil_mode=1"),
])
def test_avgpool_that_is_not_a_conv_stays(attrs, reason):
    b = Builder(seed=10)
    x = b.input([2, C, 9, 9])
    pool = b.bn(b.node("AveragePool", [x], kernel_shape=[3, 3], **attrs), C)
    stride = attrs.get("strides", [1, 1])
    pads = (1, 1, 1, 1) if attrs["pads"][0] else ZERO
    y = b.add(pool, b.bn(b.conv(x, C, C, (3, 3), tuple(stride), pads, bias=False), C))
    assert_untouched(b.model(y), reason, identical=False)


def test_avgpool_without_padding_excluding_it_is_exact():
    b = Builder(seed=11)
    x = b.input([2, C, 9, 9])
    pool = b.bn(b.node("AveragePool", [x], kernel_shape=[3, 3], count_include_pad=0), C)
    y = b.add(pool, b.bn(b.conv(x, C, C, (3, 3), bias=False), C))
    fuse_and_check(b.model(y), {"Conv": 1, "AveragePool": 0, "Add": 0})


@pytest.mark.parametrize("stride,group,size", GEOMETRY)
def test_batchnorm_before_an_unpadded_conv_folds(stride, group, size):
    b = Builder(seed=12 + stride + group)
    x = b.input([2, C] + list(size))
    y = b.conv(b.bn(x, C), C, 2 * C, (1, 1), (stride, stride), group=group)
    result = fuse_and_check(b.model(y), {"Conv": 1, "BatchNormalization": 0})
    assert result.report.fused[0].rule == "prebn"


def test_batchnorm_before_a_padded_conv_stays_with_the_reason():
    b = Builder(seed=13)
    x = b.input([2, C, 9, 9])
    y = b.conv(b.bn(x, C), C, C, (3, 3), pads=ONE)
    assert_untouched(b.model(y), "per-channel shift before the padded Conv")


def test_scale_before_a_padded_conv_folds():
    """Only a shift sees the border: a per-channel scale (input normalization by 1/σ) folds."""
    b = Builder(seed=14)
    x = b.input([2, C, 9, 9])
    y = b.conv(b.node("Mul", [x, b.const(b.rng.uniform(0.5, 2, (1, C, 1, 1)))]), C, C, (3, 3), pads=ONE)
    fuse_and_check(b.model(y), {"Conv": 1, "Mul": 0})


# ---------------------------------------------------------------- Gemm / MatMul


def _gemm(b: Builder, x: str, c_in: int, c_out: int, trans_b: int = 1, **attrs) -> str:
    shape = (c_out, c_in) if trans_b else (c_in, c_out)
    return b.node("Gemm", [x, b.const(b.rng.normal(0, 0.5, shape)), b.const(b.rng.normal(0, 0.5, c_out), "b")],
                  transB=trans_b, **attrs)


@pytest.mark.parametrize("trans_b,alpha,beta", [(1, 1.0, 1.0), (0, 1.0, 1.0), (1, 0.5, 2.0)])
def test_batchnorm_before_and_after_gemm(trans_b, alpha, beta):
    b = Builder(seed=15 + trans_b)
    x = b.input([3, 6])
    y = b.bn(_gemm(b, b.bn(x, 6), 6, 5, trans_b, alpha=alpha, beta=beta), 5)
    result = fuse_and_check(b.model(y), {"Gemm": 1, "BatchNormalization": 0})
    assert result.report.fused[0].kernel == []


def test_two_linear_heads_averaged_are_one():
    """RepViT's classifier: (head(bn(x)) + head_dist(bn'(x))) / 2."""
    b = Builder(seed=16)
    x = b.input([3, 8])
    heads = b.add(_gemm(b, b.bn(x, 8), 8, 5), _gemm(b, b.bn(x, 8), 8, 5))
    y = b.node("Div", [heads, b.const(np.array(2.0))])
    fuse_and_check(b.model(y), {"Gemm": 1, "Add": 0, "Div": 0, "BatchNormalization": 0})


def test_matmul_on_channels_last_with_affine_after_is_matmul_add():
    b = Builder(seed=17)
    x = b.input([2, 7, 6])
    y = b.node("MatMul", [x, b.const(b.rng.normal(0, 0.5, (6, 5)))])
    y = b.node("Mul", [b.node("Add", [y, b.const(b.rng.normal(0, 1, 5))]), b.const(b.rng.uniform(0.5, 2, 5))])
    fuse_and_check(b.model(y), {"MatMul": 1, "Add": 1, "Mul": 0, "Conv": 0, "Transpose": 0})


def test_matmul_add_alone_is_left_as_it_is():
    """MatMul → Add is already a Linear's deploy form: rewriting it would change nothing."""
    b = Builder(seed=18)
    x = b.input([2, 7, 6])
    y = b.node("Add", [b.node("MatMul", [x, b.const(b.rng.normal(0, 0.5, (6, 5)))]), b.const(b.rng.normal(0, 1, 5))])
    model = b.model(y)
    result = fuse_with_report(model)
    assert not result.report.blocks
    assert result.model.SerializeToString() == model.SerializeToString()


def _to_tokens(b: Builder, x: str) -> str:
    """[B, C, H, W] → [B, C, H·W] → [B, H·W, C]: x.flatten(2).transpose(1, 2)."""
    flat = b.node("Reshape", [x, _int_const(b, [0, C, -1])])
    return b.node("Transpose", [flat], perm=[0, 2, 1])


def test_linear_after_a_transpose_to_tokens_is_left_as_it_is():
    """Transpose → MatMul → Add could be written as a 1-D Conv and a Transpose back (one node
    fewer), but that is no re-parameterization: a Linear with nothing to fold stays itself."""
    b = Builder(seed=21)
    x = b.input([2, C, 5, 3])
    t = _to_tokens(b, x)
    y = b.node("Add", [b.node("MatMul", [t, b.const(b.rng.normal(0, 0.5, (C, 5)))]), b.const(b.rng.normal(0, 1, 5))])
    model = b.model(y)
    result = fuse_with_report(model)
    assert not result.report.fused
    assert result.model.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_linear_with_a_norm_after_a_transpose_stays_a_linear(where):
    """A per-channel affine next to a Linear on tokens folds into the Linear, which stays MatMul +
    Add after the graph's Transpose (the deploy form: NextViT's q, LeViT's Linear_BN), not a 1-D
    Conv on the untransposed tokens."""
    b = Builder(seed=22)
    x = b.input([2, C, 5, 3])
    t = _to_tokens(b, x)
    if where == "before":
        t = b.node("Add", [b.node("Mul", [t, b.const(b.rng.uniform(0.5, 2, C))]), b.const(b.rng.normal(0, 1, C))])
    y = b.node("Add", [b.node("MatMul", [t, b.const(b.rng.normal(0, 0.5, (C, 5)))]), b.const(b.rng.normal(0, 1, 5))])
    if where == "after":
        y = b.node("Mul", [y, b.const(b.rng.uniform(0.5, 2, 5))])
    result = fuse_and_check(b.model(y), {"MatMul": 1, "Add": 1, "Mul": 0, "Conv": 0, "Transpose": 1})
    assert len(result.report.fused) == 1


@pytest.mark.parametrize("norm", ["batchnorm", "mul_add"])
def test_a_norm_before_the_transpose_to_tokens_folds_with_it(norm):
    """A norm on [B, C, N] before the Transpose (a BatchNormalization is moved past it first; a
    Mul/Add on the channel axis is not): the Linear takes it in."""
    b = Builder(seed=23)
    x = b.input([2, C, 5, 3])
    flat = b.node("Reshape", [x, _int_const(b, [0, C, -1])])
    if norm == "batchnorm":
        flat = b.bn(flat, C)
    else:
        flat = b.node("Add", [b.node("Mul", [flat, b.const(b.rng.uniform(0.5, 2, (C, 1)))]),
                              b.const(b.rng.normal(0, 1, (C, 1)))])
    t = b.node("Transpose", [flat], perm=[0, 2, 1])
    y = b.node("Add", [b.node("MatMul", [t, b.const(b.rng.normal(0, 0.5, (C, 5)))]), b.const(b.rng.normal(0, 1, 5))])
    fuse_and_check(b.model(y), {"BatchNormalization": 0, "Mul": 0, "Add": 1 if norm == "batchnorm" else 0})


def test_exact_but_costly_sum_is_not_half_fused():
    """(depthwise 3×3 + depthwise 1×1) + dense 1×1: the whole merge costs more, and fusing only
    the depthwise pair would leave a model that is neither form."""
    b = Builder(seed=19)
    x = b.input([2, C, 9, 9])
    dw = b.add(b.bn(b.conv(x, C, C, (3, 3), pads=ONE, group=C, bias=False), C),
               b.bn(b.conv(x, C, C, (1, 1), group=C, bias=False), C))
    y = b.add(dw, b.bn(b.conv(x, C, C, (1, 1), bias=False), C))
    result = fuse_and_check(b.model(y))
    assert op_counts(result.model)["Add"] == 2 and op_counts(result.model)["Conv"] == 3
    assert any("merging would cost more" in (r.reason or "") for r in result.report.unfused)


# ---------------------------------------------------------------- Flatten / Reshape around a Linear


def _levit(b: Builder, x: str, n: int, c_in: int, c_out: int, final) -> str:
    """LeViT's Linear_BN: MatMul on [B, N, C], BatchNorm1d on its [B·N, C] flattening, back."""
    y = b.node("MatMul", [x, b.const(b.rng.normal(0, 0.5, (c_in, c_out)))])
    flat = b.bn(b.node("Flatten", [y], axis=2), c_out)
    if final == "shape":
        return b.node("Reshape", [flat, b.node("Shape", [y])])
    return b.node("Reshape", [flat, _int_const(b, final)])


@pytest.mark.parametrize("final", ["shape", [-1, 9, 5], [2, 9, 5]])
def test_linear_then_batchnorm_on_the_flattened_tokens(final):
    b = Builder(seed=20)
    x = b.input([2 if final == [2, 9, 5] else "B", 9, 6])
    y = _levit(b, x, 9, 6, 5, final)
    result = fuse_and_check(b.model(y), {"MatMul": 1, "Add": 1, "BatchNormalization": 0, "Flatten": 0,
                                         "Reshape": 0, "Shape": 0})
    assert result.report.fused[0].shape == "linear+bn"


@pytest.mark.parametrize("final", [
    None,             # stays flattened, [B·N, C]: Reshape(-1, C) after the Linear
    [-1, 45],         # flattened further
    [-1, 3, 5],       # N regrouped: 9 tokens become 3 rows of 3
    [-1, 9, 1, 5],    # a unit axis put in
])
def test_linear_then_batchnorm_reshaped_to_another_shape(final):
    """The block's output is not its input's shape: one Linear, then one Reshape to the block's
    output shape (reshapes in a row are the last one; the BN folds through the flattening)."""
    b = Builder(seed=21)
    x = b.input(["B", 9, 6])
    if final is None:
        y = b.bn(b.node("Flatten", [b.node("MatMul", [x, b.const(b.rng.normal(0, 0.5, (6, 5)))])], axis=2), 5)
    else:
        y = _levit(b, x, 9, 6, 5, final)
    fuse_and_check(b.model(y), {"MatMul": 1, "Add": 1, "BatchNormalization": 0, "Flatten": 0, "Reshape": 1})


@pytest.mark.parametrize("batch", [2, "B"])
def test_linear_then_batchnorm_viewed_into_heads(batch):
    """The dynamo exporter's LeViT qkv: Linear → view(-1, C) → BatchNorm1d → view(B, N, heads, d),
    one Reshape splitting the channels into heads: MatMul + Add + that Reshape."""
    b = Builder(seed=25)
    x = b.input([batch, 9, 6])
    y = b.node("MatMul", [x, b.const(b.rng.normal(0, 0.5, (6, 8)))])
    y = b.bn(b.node("Reshape", [y, _int_const(b, [-1, 8])]), 8)
    y = b.node("Reshape", [y, _int_const(b, [-1, 9, 2, 4])])
    fuse_and_check(b.model(y), {"MatMul": 1, "Add": 1, "BatchNormalization": 0, "Reshape": 1})


@pytest.mark.parametrize("z_dims", [["B", "N", 5], [2, 9, 5]])
def test_reshape_to_the_shape_of_another_tensor(z_dims):
    """Reshape to Shape(z) of a tensor outside the chain: with z's dims guaranteed (the shape the
    Linear writes), one Linear; otherwise no constant can stand for them, so that Reshape stays,
    reading the fused Linear → BN, which ends flattened."""
    b = Builder(seed=26)
    x = b.input([2, 9, 6])
    z = b.input(z_dims, name="z")
    y = b.node("MatMul", [x, b.const(b.rng.normal(0, 0.5, (6, 5)))])
    y = b.node("Reshape", [b.bn(b.node("Flatten", [y], axis=2), 5), b.node("Shape", [z])])
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 9, 6)).astype(np.float32),
             "z": np.zeros((2, 9, 5), np.float32)}
    known = isinstance(z_dims[0], int)
    fuse_and_check(b.model(y), {"BatchNormalization": 0, "Flatten": 0, "Reshape": 0 if known else 2,
                                "Shape": 0 if known else 1}, feeds=feeds, verify=False)


def test_reshape_that_splits_the_channels_stays():
    b = Builder(seed=22)
    x = b.input(["B", 9, 6])
    y = b.node("MatMul", [x, b.const(b.rng.normal(0, 0.5, (6, 4)))])
    y = b.node("Mul", [b.node("Reshape", [y, _int_const(b, [-1, 9, 2, 2])]), b.const(b.rng.uniform(0.5, 2, 2))])
    model = b.model(y)
    result = fuse_with_report(model)   # not a block: nothing fused, nothing to report
    assert not result.report.blocks and result.model.SerializeToString() == model.SerializeToString()


def test_a_norm_before_a_reshape_and_a_padded_pool_says_why():
    """BN on [B, C, H, W] → Reshape [B, C, H·W] → padded AveragePool → tokens → Linear: the BN
    cannot move past the padded pool, and the block spans a rank change; the reason says so
    (it said the channel count of the input was unknown)."""
    b = Builder(seed=27)
    x = b.input([2, C, 3, 5])
    y = b.node("Reshape", [b.bn(x, C), _int_const(b, [2, C, 15])])
    y = b.node("Transpose", [b.node("AveragePool", [y], kernel_shape=[3], pads=[1, 1])], perm=[0, 2, 1])
    y = b.node("Add", [b.node("MatMul", [y, b.const(b.rng.normal(0, 0.5, (C, 4)))]), b.const(b.rng.normal(0, 1, 4))])
    result = assert_untouched(b.model(y), "'x' has rank 4 but the block's Gemm/MatMul reads rank 3")
    (left,) = result.report.unfused   # said once for the Linear's Add and its MatMul, with every node
    assert {"add1", "matmul1", "batchnormalization1"} <= set(left.nodes)


def test_reshape_after_a_spatial_conv_stays():
    """A 3×3 conv on channels last mixes positions: regrouping them after it is not a channel map."""
    b = Builder(seed=23)
    x = b.input([2, 4, 5, 5])
    y = b.node("Transpose", [b.conv(x, 4, 4, (3, 3), pads=ONE)], perm=[0, 2, 3, 1])
    y = b.node("Mul", [b.node("Reshape", [y, _int_const(b, [-1, 4])]), b.const(b.rng.uniform(0.5, 2, 4))])
    model = b.model(y)
    result = fuse_with_report(model, verify=False)
    assert not result.report.fused and result.model.SerializeToString() == model.SerializeToString()


# ---------------------------------------------------------------- DBB's BNAndPadLayer: border writes


def _border_writes(b: Builder, y: str, value: np.ndarray, size, sides=("top", "bottom", "left", "right"),
                   rows=None) -> str:
    """Zero Pad by 1, then the padding ring overwritten with a per-channel value slice by slice,
    as the dynamo exporter writes DBB's in-place border assignments: Transpose the written axis
    first, ScatterND one [k, 1] slice index, Transpose back; the updates Expand the value."""
    h, w = size[0] + 2, size[1] + 2
    y = _zero_pad(b, y)
    c = b.const(value.reshape(C, 1, 1))
    for side in sides:
        perm = [2, 1, 0, 3] if side in ("top", "bottom") else [3, 1, 2, 0]
        shape = [2, C, 1, w] if side in ("top", "bottom") else [2, C, h, 1]
        row = {"top": 0, "bottom": h - 1, "left": 0, "right": w - 1}[side] if rows is None else rows[side]
        updates = b.node("Transpose", [b.node("Expand", [c, _int_const(b, shape)])], perm=perm)
        written = b.node("ScatterND", [b.node("Transpose", [y], perm=perm), _int_const(b, [[row]]), updates])
        y = b.node("Transpose", [written], perm=perm)
    return y


def _dbb_branch(b: Builder, x: str, size, matching=True, **writes):
    """1×1 conv (with bias t) → border writes of t (or of another value) → 3×3 unpadded, + a 3×3 Conv-BN."""
    t = b.rng.normal(0, 1, C)
    first = b.node("Conv", [x, b.const(b.rng.normal(0, 0.5, (C, C, 1, 1))), b.const(t)], kernel_shape=[1, 1])
    value = t if matching else t + b.rng.uniform(0.5, 1.0, C)
    chain = b.conv(_border_writes(b, first, value, size, **writes), C, C, (3, 3), pads=(0, 0, 0, 0))
    return b.add(chain, b.bn(b.conv(x, C, C, (3, 3), pads=ONE), C))


@pytest.mark.parametrize("size", [(7, 9), (10, 5)])
def test_padding_written_slice_by_slice_with_the_bias_is_exact(size):
    b = Builder(seed=24)
    x = b.input([2, C] + list(size))
    fuse_and_check(b.model(_dbb_branch(b, x, size)), {"Conv": 1, "Add": 0, "ScatterND": 0, "Pad": 0})


@pytest.mark.parametrize("case,reason", [
    ({"matching": False}, "not the value its input has at a padded position"),
    ({"sides": ("top", "bottom", "left")}, "written only in part"),
    ({"rows": {"top": 0, "bottom": 4, "left": 0, "right": 10}}, "outside its padding"),
])
def test_padding_written_otherwise_stays(case, reason):
    b = Builder(seed=25)
    size = (7, 9)
    x = b.input([2, C] + list(size))
    result = assert_untouched(b.model(_dbb_branch(b, x, size, **case)), reason, identical=False)
    assert op_counts(result.model)["ScatterND"] == len(case.get("sides", "abcd"))


def test_chain_through_a_linear_never_starts_inside_its_node():
    """A per-token Mul (not per-channel) before MatMul → Add → Mul: the shorter chain starts at the
    MatMul's input tensor, never at a tensor internal to the MatMul (its Transpose to channels
    first), which no graph has: with every check off the result still runs and is exact."""
    b = Builder(seed=26)
    x = b.input([2, 7, 6])
    y = b.node("Mul", [x, b.const(b.rng.uniform(0.5, 2, (1, 7, 1)))])
    y = b.node("Add", [b.node("MatMul", [y, b.const(b.rng.normal(0, 0.5, (6, 5)))]), b.const(b.rng.normal(0, 1, 5))])
    y = b.node("Mul", [y, b.const(b.rng.uniform(0.5, 2, 5))])
    result = fuse_and_check(b.model(y), {"Mul": 1, "MatMul": 1, "Add": 1}, check_blocks=False, verify=False)
    assert [r.input for r in result.report.fused] == ["mul1_out"]
    assert not result.report.unfused   # a per-token scale is not a block to report


def test_tokens_regrouped_before_the_block_do_not_hide_its_shape():
    """LeViT's Subsample without constant folding: a Reshape of the input (its own regrouping,
    not the block's) before Linear → Flatten → BN → Reshape(Shape(linear output)): the output's
    shape is proven from the block input on, past the Reshape before it."""
    b = Builder(seed=27)
    x = b.input(["B", 3, 3, 6])
    tokens = b.node("Reshape", [x, _int_const(b, [-1, 9, 6])])
    y = _levit(b, tokens, 9, 6, 5, "shape")
    fuse_and_check(b.model(y), {"MatMul": 1, "Add": 1, "BatchNormalization": 0, "Flatten": 0, "Shape": 0,
                                "Reshape": 1})


def test_padding_ring_with_a_dynamic_axis_is_never_complete():
    """H static, W dynamic: writing the top and bottom rows leaves the left and right columns at
    zero, whatever W is. The ring cannot be proven written, so nothing fuses, even with every
    check off (before, the ring was counted from the static axes only, and a wrong conv came out)."""
    b = Builder(seed=28)
    x = b.input([2, C, 7, "W"])
    t = b.rng.normal(0, 1, C)
    first = b.node("Conv", [x, b.const(b.rng.normal(0, 0.5, (C, C, 1, 1))), b.const(t)], kernel_shape=[1, 1])
    y = _zero_pad(b, first)
    c = b.const(t.reshape(C, 1, 1))
    for row in (0, 8):
        row_shape = b.node("Concat", [b.node("Shape", [y], end=2), _int_const(b, [1]), b.node("Shape", [y], start=3)],
                           axis=0)
        updates = b.node("Transpose", [b.node("Expand", [c, row_shape])], perm=[2, 1, 0, 3])   # [1, C, 2, W + 2]
        written = b.node("ScatterND", [b.node("Transpose", [y], perm=[2, 1, 0, 3]), _int_const(b, [[row]]), updates])
        y = b.node("Transpose", [written], perm=[2, 1, 0, 3])
    model = b.model(b.conv(y, C, C, (3, 3), pads=(0, 0, 0, 0)))
    result = fuse_with_report(model, check_blocks=False, verify=False)
    assert op_counts(result.model)["ScatterND"] == 2
    feeds = {"x": np.random.default_rng(1).normal(size=(2, C, 7, 6)).astype(np.float32)}
    assert_equivalent(model, result.model, feeds)


@pytest.mark.parametrize("dtype,off,fused", [(np.float32, 1e-9, True), (np.float64, 1e-9, False),
                                             (np.float64, 0.0, True), (np.float32, 1e-4, False)])
def test_a_padding_value_must_equal_the_bias_at_the_models_precision(dtype, off, fused):
    """A stored padding value may differ from the bias the engine computes by the model dtype's
    rounding, not by float32's in a float64 model."""
    b = Builder(seed=29, dtype=dtype)
    x = b.input([2, C, 9, 9])
    first = b.node("Conv", [x, b.const(b.rng.normal(0, 0.5, (C, C, 1, 1))), b.const(np.full(C, 0.75))],
                   kernel_shape=[1, 1])
    y = b.conv(_zero_pad(b, first, 0.75 * (1 + off)), C, C, (3, 3), pads=(0, 0, 0, 0))
    model = b.model(b.add(y, b.bn(b.conv(x, C, C, (3, 3), pads=ONE), C)))
    result = fuse_with_report(model, verify=False, check_blocks=False)
    assert (op_counts(result.model).get("Pad", 0) == 0) == fused, [r.reason for r in result.report.unfused]


# ------------------------------------- the same border writes as TorchScript spells them: index grids


def _grid_border_write(b: Builder, y: str, c: str, axis: int, start: int, end: int, hostile=None) -> str:
    """ScatterND(y, indices, updates) writing y[..., start:end along axis, ...] = c, as the TorchScript
    exporter writes a slice assignment: the indices a meshgrid of Range(Shape(y)[k]) per axis (the
    written axis's range sliced), broadcast by Expand to the grid's shape and stacked on a last axis;
    the updates c expanded to the shape of the written slice. Every dim is read at run time, so
    the write holds at any batch size. `hostile`: one way to make the indices not that box."""
    zero, one = _int_const(b, 0), _int_const(b, 1)
    ranges = []
    for k in range(4):
        read = b.input(["N", 1], name="z") if hostile == "other_batch" and k == 0 else y
        dim = b.node("Gather", [b.node("Shape", [read]), _int_const(b, k)], axis=0)
        if hostile == "batch_is_5" and k == 0:   # the grid misses the last batch when there are 5
            dim = b.node("Where", [b.node("Equal", [dim, _int_const(b, 5)]), _int_const(b, 4), dim])
        r = b.node("Range", [zero, dim, one])
        if k == axis:
            r = b.node("Slice", [r, _int_const(b, [start]), _int_const(b, [end]), _int_const(b, [0])])
        if hostile == "channels_reversed" and k == 1:
            r = b.node("Slice", [r, _int_const(b, [-1]), _int_const(b, [-(2 ** 62)]), _int_const(b, [0]),
                                 _int_const(b, [-1])])
        ranges.append(b.node("Reshape", [r, _int_const(b, [-1] + [1] * (3 - k))]))
    grid = b.node("Shape", [b.add(*ranges)])
    components = [b.node("Unsqueeze", [b.node("Expand", [r, grid]), _int_const(b, [-1])]) for r in ranges]
    if hostile == "axes_swapped":   # the batch and channel components exchanged
        components[0], components[1] = components[1], components[0]
    indices = b.node("Concat", components, axis=-1)
    if hostile in ("batch_is_5", "other_batch"):   # updates of the grid's shape: the model runs, some batch unwritten
        updates = b.node("Expand", [c, grid])
    else:   # TorchScript's: c expanded to the written slice's shape, reshaped to the grid's
        written = b.node("Slice", [y, _int_const(b, [start]), _int_const(b, [end]), _int_const(b, [axis])])
        updates = b.node("Reshape", [b.node("Expand", [c, b.node("Shape", [written])]), grid])
    return b.node("ScatterND", [y, indices, updates])


def _grid_dbb_branch(b: Builder, x: str, size, hostile=None, sides=((2, 0, 1), (2, -1, 2 ** 62), (3, 0, 1),
                                                                   (3, -1, 2 ** 62))):
    """1×1 conv (bias t) → zero Pad → the four border slices set to t by index-grid ScatterNDs →
    3×3 unpadded conv, + a 3×3 Conv-BN."""
    t = b.rng.normal(0, 1, C)
    y = _zero_pad(b, b.node("Conv", [x, b.const(b.rng.normal(0, 0.5, (C, C, 1, 1))), b.const(t)], kernel_shape=[1, 1]))
    c = b.const(t.reshape(C, 1, 1))
    for i, (axis, start, end) in enumerate(sides):
        y = _grid_border_write(b, y, c, axis, start, end, hostile if i == 0 else None)
    chain = b.conv(y, C, C, (3, 3), pads=(0, 0, 0, 0))
    return b.add(chain, b.bn(b.conv(x, C, C, (3, 3), pads=ONE), C))


def _batch_feeds(model, batch, size, seed=3):
    feeds = {"x": np.random.default_rng(seed).normal(size=(batch, C) + tuple(size)).astype(np.float32)}
    if any(i.name == "z" for i in model.graph.input):   # another tensor's batch: one less
        feeds["z"] = np.zeros((batch - 1, 1), np.float32)
    return feeds


@pytest.mark.parametrize("size", [(7, 9), (6, 5)])
def test_index_grid_border_writes_fuse_at_every_batch_size(size):
    """The grid is proven a box for every batch: its batch component is i[0] over the data's own
    batch dim, whatever that is at run time. Checked at batch 1, 2 and 3."""
    b = Builder(seed=30)
    x = b.input(["B", C] + list(size))
    model = b.model(_grid_dbb_branch(b, x, size))
    result = fuse_and_check(model, {"Conv": 1, "Add": 0, "ScatterND": 0, "Pad": 0, "Range": 0},
                            feeds=_batch_feeds(model, 2, size))
    for batch in (1, 3):
        assert_equivalent(model, result.model, _batch_feeds(model, batch, size))


@pytest.mark.parametrize("hostile", ["batch_is_5", "other_batch", "channels_reversed", "axes_swapped"])
def test_index_grids_that_are_not_the_box_stay(hostile):
    """Indices that depend on whether the batch is 5, that run over another tensor's batch, that
    reverse the channels or that exchange two axes are not whole slices of one per-channel value:
    nothing fuses, with every check off too."""
    size = (7, 9)
    b = Builder(seed=31)
    x = b.input(["B", C] + list(size))
    model = b.model(_grid_dbb_branch(b, x, size, hostile=hostile))
    result = fuse_with_report(model, check_blocks=False, verify=False)
    assert op_counts(result.model)["ScatterND"] == 4
    if hostile != "axes_swapped":   # exchanging batch and channels runs only when B == C
        for batch in (2, 3, 5):
            assert_equivalent(model, result.model, _batch_feeds(model, batch, size))


def test_index_grid_writing_inside_the_tensor_stays():
    """Rows 1:2 are not the padding: the writes are a box, but the reason names where they write."""
    size = (7, 9)
    b = Builder(seed=32)
    x = b.input(["B", C] + list(size))
    sides = ((2, 1, 2), (2, -1, 2 ** 62), (3, 0, 1), (3, -1, 2 ** 62))
    result = assert_untouched(b.model(_grid_dbb_branch(b, x, size, sides=sides)), "outside its padding",
                              identical=False)
    assert op_counts(result.model)["ScatterND"] == 4


def test_an_index_grid_too_large_to_build_is_not_built():
    """Indices from Range(0, 2^40): neither folded nor followed (no 2^40-element array is made),
    the write stays, and the analysis returns at once."""
    import time
    b = Builder(seed=33)
    x = b.input([2, C, 7, 9])
    y = _zero_pad(b, b.conv(x, C, C, (1, 1)))
    rows = b.node("Range", [_int_const(b, 0), _int_const(b, 2 ** 40), _int_const(b, 1)])
    indices = b.node("Unsqueeze", [rows, _int_const(b, [-1])])
    updates = b.node("Expand", [b.const(np.ones((C, 1, 1))), b.node("Shape", [y])])
    model = b.model(b.conv(b.node("ScatterND", [y, indices, updates]), C, C, (3, 3), pads=(0, 0, 0, 0)))
    start = time.perf_counter()
    result = fuse_with_report(model, check_blocks=False, verify=False)
    assert time.perf_counter() - start < 30
    assert op_counts(result.model)["ScatterND"] == 1


@pytest.mark.parametrize("rows_differ", [False, True])
def test_updates_expanded_to_a_traced_batch_are_read_per_channel(rows_differ):
    """TorchScript traced at batch 2 with a dynamic batch: the updates are c expanded to a baked
    [2, C, 1, W], then to the slice's shape, then reshaped to the grid's [B, C, 1, W]. The model
    runs only at batch 2; the Reshape keeps every axis after the batch, so where it runs each
    update is c of its channel. A c that differs between the two baked rows is not one value
    per channel: that stays, with every check off too."""
    size = (7, 9)
    b = Builder(seed=34)
    x = b.input(["B", C] + list(size))
    t = b.rng.normal(0, 1, C)
    y = _zero_pad(b, b.node("Conv", [x, b.const(b.rng.normal(0, 0.5, (C, C, 1, 1))), b.const(t)], kernel_shape=[1, 1]))
    h, w = size[0] + 2, size[1] + 2
    for axis, start, end in ((2, 0, 1), (2, -1, 2 ** 62), (3, 0, 1), (3, -1, 2 ** 62)):
        zero, one = _int_const(b, 0), _int_const(b, 1)
        ranges = []
        for k in range(4):
            r = b.node("Range", [zero, b.node("Gather", [b.node("Shape", [y]), _int_const(b, k)], axis=0), one])
            if k == axis:
                r = b.node("Slice", [r, _int_const(b, [start]), _int_const(b, [end]), _int_const(b, [0])])
            ranges.append(b.node("Reshape", [r, _int_const(b, [-1] + [1] * (3 - k))]))
        grid = b.node("Shape", [b.add(*ranges)])
        indices = b.node("Concat", [b.node("Unsqueeze", [b.node("Expand", [r, grid]), _int_const(b, [-1])])
                                    for r in ranges], axis=-1)
        baked = [2, C, 1, w] if axis == 2 else [2, C, h, 1]
        value = np.stack([t.reshape(C, 1, 1), (t + (1.0 if rows_differ else 0.0)).reshape(C, 1, 1)])
        written = b.node("Slice", [y, _int_const(b, [start]), _int_const(b, [end]), _int_const(b, [axis])])
        expanded = b.node("Expand", [b.node("Expand", [b.const(value), _int_const(b, baked)]),
                                     b.node("Shape", [written])])
        y = b.node("ScatterND", [y, indices, b.node("Reshape", [expanded, grid])])
    model = b.model(b.add(b.conv(y, C, C, (3, 3), pads=(0, 0, 0, 0)), b.bn(b.conv(x, C, C, (3, 3), pads=ONE), C)))
    feeds = _batch_feeds(model, 2, size)
    if rows_differ:
        result = fuse_with_report(model, check_blocks=False, verify=False)
        assert op_counts(result.model)["ScatterND"] == 4
        assert_equivalent(model, result.model, feeds)
    else:
        fuse_and_check(model, {"Conv": 1, "ScatterND": 0, "Add": 0}, feeds=feeds)
