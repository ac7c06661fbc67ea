"""Hand-built blocks of every family fuse to one Conv and stay equivalent, over geometry."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import onnx
from onnx import helper

from conftest import Builder, fuse_and_check, repvgg_block
from reparam_onnx import fuse_with_report


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("group,channels", [(1, 8), (2, 8), (4, 8), (8, 8)])
@pytest.mark.parametrize("spatial", [(13, 11), (16, 9), (7, 7)])
def test_repvgg_block(stride, group, channels, spatial):
    b = Builder(seed=stride * 100 + group)
    x = b.input([2, channels] + list(spatial))
    y = b.node("Relu", [repvgg_block(b, x, channels, channels, stride=stride, group=group)])
    result = fuse_and_check(b.model(y), {"Conv": 1, "Add": 0, "BatchNormalization": 0})
    (block,) = result.report.fused
    expected = {1: "repvgg", channels: "repvgg"}.get(group, "yolo_repconv") if group != channels else None
    if group == channels:
        assert block.rule in ("mobileone_dw", "repvgg")
    else:
        assert block.rule == expected


def test_repvgg_channel_change_has_no_identity():
    b = Builder()
    x = b.input([1, 4, 9, 13])
    y = repvgg_block(b, x, 4, 6)
    result = fuse_and_check(b.model(y), {"Conv": 1, "Add": 0})
    assert result.report.fused[0].rule == "repvgg"


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("assoc", ["left", "right", "sum"])
def test_add_tree_order_and_association(order, assoc):
    b = Builder(seed=sum(order))
    x = b.input([2, 6, 11, 9])
    terms = [b.bn(b.conv(x, 6, 6, (3, 3), pads=(1, 1, 1, 1), bias=False), 6),
             b.bn(b.conv(x, 6, 6, (1, 1), bias=True), 6),
             b.bn(x, 6)]
    t = [terms[i] for i in order]
    if assoc == "left":
        y = b.add(b.add(t[0], t[1]), t[2])
    elif assoc == "right":
        y = b.node("Add", [t[0], b.node("Add", [t[1], t[2]])])
    else:
        y = b.node("Sum", t)
    fuse_and_check(b.model(y), {"Conv": 1, "Add": 0, "Sum": 0})


def test_add_zero_placeholder_and_identity_nodes():
    """Add(x, 0) leftovers of a Python `0` and Identity nodes are looked through."""
    b = Builder()
    x = b.input([1, 4, 9, 7])
    zero = b.const(np.zeros((), np.float32), "zero")
    a = b.node("Add", [b.node("Identity", [b.bn(b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1)), 4)]), zero])
    c = b.node("Identity", [b.bn(b.conv(x, 4, 4, (1, 1)), 4)])
    y = b.add(a, c, b.node("Identity", [x]))
    fuse_and_check(b.model(y), {"Conv": 1, "Add": 0, "Identity": 0})


@pytest.mark.parametrize("op,value", [("Add", 0.0), ("Sub", 0.0), ("Mul", 1.0), ("Div", 1.0)])
def test_a_conv_then_an_arithmetic_noop_is_one_conv(op, value):
    """timm's MobileOne exported with constant folding: a block with only its conv branch left
    adds its absent branches as a 0 (out = scale_out + identity_out, both 0): one Conv, as the
    deploy form. An Identity after a conv is not such a block."""
    b = Builder(seed=3)
    x = b.input([1, 4, 9, 7])
    y = b.node(op, [b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1)), b.const(np.array(value, np.float32))])
    fuse_and_check(b.model(b.node("Relu", [y])), {"Conv": 1, op: 0})
    b = Builder(seed=3)
    x = b.input([1, 4, 9, 7])
    model = b.model(b.node("Relu", [b.node("Identity", [b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1))])]))
    assert not fuse_with_report(model).report.blocks


def test_trivial_reparam_conv_plus_x():
    """RepVGG ablation: conv + x (identity without BN) fuses."""
    b = Builder()
    x = b.input([2, 5, 8, 11])
    y = b.add(b.conv(x, 5, 5, (3, 3), pads=(1, 1, 1, 1)), x)
    fuse_and_check(b.model(y), {"Conv": 1, "Add": 0})


def test_sub_of_branches():
    b = Builder()
    x = b.input([1, 4, 9, 9])
    y = b.node("Sub", [b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1)), b.bn(x, 4)])
    result = fuse_and_check(b.model(y), {"Conv": 1, "Sub": 0})
    assert result.report.fused


@pytest.mark.parametrize("pads3,pads1,stride,spatial", [
    ((1, 1, 1, 1), (0, 0, 0, 0), 1, (13, 11)),
    ((0, 0, 1, 1), (0, 0, 0, 0), 2, (14, 12)),    # TF SAME, stride 2, even input: the 1×1 tap is top-left
    ((1, 1, 1, 1), (0, 0, 0, 0), 2, (13, 11)),    # odd input, stride 2
    ((1, 0, 1, 2), (0, 0, 0, 0), 1, (10, 9)),     # asymmetric 3×3: the 1×1 tap at (1, 0)
    ((2, 1, 0, 1), (1, 0, 0, 0), 2, (9, 12)),     # stride 2: 1×1 tap at offset (1, 1)
])
def test_tap_alignment_explicit_pads(pads3, pads1, stride, spatial):
    b = Builder(seed=7)
    x = b.input([1, 4] + list(spatial))
    a = b.bn(b.conv(x, 4, 6, (3, 3), (stride, stride), pads3), 6)
    c = b.bn(b.conv(x, 4, 6, (1, 1), (stride, stride), pads1), 6)
    y = b.add(a, c)
    fuse_and_check(b.model(y), {"Conv": 1, "Add": 0})


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("stride,spatial", [(1, (9, 8)), (2, (14, 11)), (2, (13, 16))])
def test_auto_pad_same_static(auto_pad, stride, spatial):
    b = Builder(seed=3)
    x = b.input([1, 4] + list(spatial))
    a = b.bn(b.conv(x, 4, 4, (3, 3), (stride, stride), auto_pad=auto_pad), 4)
    c = b.bn(b.conv(x, 4, 4, (1, 1), (stride, stride), auto_pad=auto_pad), 4)
    y = b.add(a, c)
    fuse_and_check(b.model(y), {"Conv": 1, "Add": 0})


def test_acb_asymmetric_branches():
    b = Builder(seed=11)
    x = b.input([2, 6, 11, 13])
    y = b.add(b.bn(b.conv(x, 6, 6, (3, 3), pads=(1, 1, 1, 1), bias=False), 6),
              b.bn(b.conv(x, 6, 6, (1, 3), pads=(0, 1, 0, 1), bias=False), 6),
              b.bn(b.conv(x, 6, 6, (3, 1), pads=(1, 0, 1, 0), bias=False), 6))
    result = fuse_and_check(b.model(y), {"Conv": 1, "Add": 0})
    assert result.report.fused[0].rule == "acb"


@pytest.mark.parametrize("stride", [1, 2])
def test_acb_stride(stride):
    b = Builder(seed=12)
    x = b.input([1, 4, 15, 10])
    y = b.add(b.bn(b.conv(x, 4, 8, (3, 3), (stride, stride), (1, 1, 1, 1)), 8),
              b.bn(b.conv(x, 4, 8, (1, 3), (stride, stride), (0, 1, 0, 1)), 8),
              b.bn(b.conv(x, 4, 8, (3, 1), (stride, stride), (1, 0, 1, 0)), 8))
    assert fuse_and_check(b.model(y), {"Conv": 1}).report.fused[0].rule == "acb"


def test_mobileone_depthwise_and_pointwise():
    b = Builder(seed=5)
    c = 8
    x = b.input([2, c, 13, 11])
    dw = b.add(*[b.bn(b.conv(x, c, c, (3, 3), pads=(1, 1, 1, 1), group=c, bias=False), c) for _ in range(3)],
               b.bn(b.conv(x, c, c, (1, 1), group=c, bias=False), c), b.bn(x, c))
    h = b.node("Relu", [dw])
    pw = b.add(*[b.bn(b.conv(h, c, c, (1, 1), bias=False), c) for _ in range(3)], b.bn(h, c))
    y = b.node("Relu", [pw])
    result = fuse_and_check(b.model(y), {"Conv": 2, "Add": 0, "BatchNormalization": 0})
    assert sorted(bl.rule for bl in result.report.fused) == ["mobileone_dw", "mobileone_pw"]


@pytest.mark.parametrize("large,small", [(13, 3), (7, 5), (9, 3)])
def test_replknet_large_and_small_depthwise(large, small):
    b = Builder(seed=large)
    c = 6
    x = b.input([1, c, 17, 15])
    y = b.add(b.bn(b.conv(x, c, c, (large, large), pads=(large // 2,) * 4, group=c, bias=False), c),
              b.bn(b.conv(x, c, c, (small, small), pads=(small // 2,) * 4, group=c, bias=False), c))
    result = fuse_and_check(b.model(y), {"Conv": 1, "Add": 0})
    assert result.report.fused[0].rule == "replknet"
    assert result.report.fused[0].kernel == [large, large]


def test_dilated_small_kernel_is_expanded():
    """UniRepLKNet-style: a dilated 3×3 beside a 7×7 becomes a 5×5 with holes inside the 7×7."""
    b = Builder(seed=21)
    c = 4
    x = b.input([1, c, 15, 13])
    y = b.add(b.bn(b.conv(x, c, c, (7, 7), pads=(3,) * 4, group=c), c),
              b.bn(b.conv(x, c, c, (3, 3), pads=(2,) * 4, dilations=(2, 2), group=c), c))
    result = fuse_and_check(b.model(y), {"Conv": 1, "Add": 0})
    assert result.report.fused[0].kernel == [7, 7]


def test_equal_dilation_branches_keep_dilation():
    b = Builder(seed=22)
    x = b.input([1, 4, 16, 15])
    y = b.add(b.conv(x, 4, 4, (3, 3), pads=(2,) * 4, dilations=(2, 2)), b.conv(x, 4, 4, (1, 1)), x)
    result = fuse_and_check(b.model(y), {"Conv": 1, "Add": 0})
    assert result.report.fused[0].kernel == [3, 3]


def test_qarepvgg_bn_after_sum():
    b = Builder(seed=9)
    c = 6
    x = b.input([2, c, 11, 13])
    s = b.add(b.bn(b.conv(x, c, c, (3, 3), pads=(1, 1, 1, 1), bias=False), c), b.conv(x, c, c, (1, 1), bias=False), x)
    y = b.node("Relu", [b.bn(s, c)])
    result = fuse_and_check(b.model(y), {"Conv": 1, "Add": 0, "BatchNormalization": 0})
    assert result.report.fused[0].rule == "qarepvgg"


@pytest.mark.parametrize("stride,pads", [(1, (1, 1, 1, 1)), (2, (0, 1, 1, 0))])
def test_conv_bn_chain(stride, pads):
    b = Builder(seed=4)
    x = b.input([2, 3, 13, 12])
    y = b.node("Relu", [b.bn(b.conv(x, 3, 8, (3, 3), (stride, stride), pads), 8)])
    result = fuse_and_check(b.model(y), {"Conv": 1, "BatchNormalization": 0})
    assert result.report.fused[0].rule == "conv_bn"


def test_conv_per_channel_mul_add_chain():
    """BN exported as Mul + Add with [1, C, 1, 1] constants folds like BN."""
    b = Builder(seed=6)
    x = b.input([1, 4, 9, 9])
    c = b.conv(x, 4, 5, (3, 3), pads=(1, 1, 1, 1))
    y = b.node("Add", [b.node("Mul", [c, b.const(np.random.default_rng(0).uniform(.5, 2, (1, 5, 1, 1)))]),
                       b.const(np.random.default_rng(1).normal(0, 1, (5, 1, 1)))])
    fuse_and_check(b.model(y), {"Conv": 1, "Mul": 0, "Add": 0})


@pytest.mark.parametrize("rank", [1, 3])
def test_other_spatial_ranks(rank):
    b = Builder(seed=rank)
    c = 4
    spatial = [11, 9, 7][:rank]
    x = b.input([2, c] + spatial)
    k3, k1 = (3,) * rank, (1,) * rank
    y = b.add(b.bn(b.conv(x, c, c, k3, pads=(1,) * 2 * rank), c), b.bn(b.conv(x, c, c, k1, pads=(0,) * 2 * rank), c),
              b.bn(x, c))
    fuse_and_check(b.model(y), {"Conv": 1, "Add": 0})


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_dtypes(dtype):
    b = Builder(seed=2, dtype=dtype)
    x = b.input([1, 4, 9, 11])
    y = repvgg_block(b, x, 4, 4)
    result = fuse_and_check(b.model(y), {"Conv": 1, "Add": 0})
    (init,) = [t for t in result.model.graph.initializer if t.name.endswith("reparam.weight")]
    assert helper.tensor_dtype_to_np_dtype(init.data_type) == np.dtype(dtype)


def test_opset_11_batchnorm_without_training_mode():
    b = Builder(seed=8, opset=11)
    x = b.input([1, 4, 9, 9])
    fuse_and_check(b.model(repvgg_block(b, x, 4, 4)), {"Conv": 1, "BatchNormalization": 0})


def test_stacked_blocks_all_fuse():
    b = Builder(seed=13)
    x = b.input(["N", 4, 17, 15])
    h = x
    for stride, (ci, co) in zip([2, 1, 1, 2], [(4, 8), (8, 8), (8, 8), (8, 16)]):
        h = b.node("Relu", [repvgg_block(b, h, ci, co, stride=stride)])
    result = fuse_and_check(b.model(h), {"Conv": 4, "Add": 0, "BatchNormalization": 0, "Relu": 4})
    assert len(result.report.fused) == 4
    assert result.report.verification.passed


def test_bn_params_from_constant_nodes():
    """BatchNorm(affine=False) exports its scale and bias as Constant nodes, not initializers."""
    b = Builder(seed=31)
    c = 4
    x = b.input([1, c, 9, 7])
    consts = []
    for value in (np.ones(c), np.zeros(c)):
        consts.append(b.node("Constant", [], value=onnx.numpy_helper.from_array(value.astype(np.float32))))
    r = np.random.default_rng(3)
    mean, var = b.const(r.normal(0, .5, c), "mean"), b.const(r.uniform(.5, 2, c), "var")
    identity_bn = b.node("BatchNormalization", [x, consts[0], consts[1], mean, var])
    y = b.add(b.bn(b.conv(x, c, c, (3, 3), pads=(1,) * 4), c), identity_bn)
    fuse_and_check(b.model(y), {"Conv": 1, "Add": 0, "BatchNormalization": 0, "Constant": 0})


def test_constant_subgraph_bias():
    """The dynamo exporter's zero bias: Shape(W) → Expand(CastLike(0, activation))."""
    b = Builder(seed=32)
    x = b.input([1, 4, 9, 7])
    w = b.const(np.random.default_rng(0).normal(0, .3, (4, 4, 3, 3)))
    shape = b.node("Shape", [w], start=0, end=1)
    zero = b.node("CastLike", [b.node("Constant", [], value=onnx.numpy_helper.from_array(np.array(0.0, np.float32))), x])
    bias = b.node("Expand", [zero, shape])
    conv = b.node("Conv", [x, w, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.add(b.bn(conv, 4), b.bn(x, 4))
    fuse_and_check(b.model(y), {"Conv": 1, "Add": 0, "Expand": 0, "Shape": 0, "CastLike": 0, "Constant": 0})


def test_reparam_sum_inside_a_residual_add():
    """RepGhost: Add(Add(dwconv-BN(p), BN(p)), x) — the residual Add is no block, the inner sum is."""
    b = Builder(seed=33)
    c = 6
    x = b.input([1, c, 11, 9])
    p = b.node("Relu", [b.bn(b.conv(x, c, c, (1, 1)), c)])
    inner = b.add(b.bn(b.conv(p, c, c, (3, 3), pads=(1,) * 4, group=c, bias=False), c), b.bn(p, c))
    y = b.add(inner, x)
    result = fuse_and_check(b.model(y), {"Conv": 2, "Add": 1, "BatchNormalization": 0})
    assert sorted(bl.rule for bl in result.report.blocks) == ["conv_bn", "mobileone_dw"]
    assert not result.report.unfused   # the residual Add is not reported


def test_conv_bn_after_a_residual_add():
    """A Conv→BN whose input is a residual Add read once: folded from the conv's input."""
    b = Builder(seed=34)
    x = b.input([1, 4, 9, 9])
    h = b.add(b.conv(b.node("Relu", [b.conv(x, 4, 4, (3, 3), pads=(1,) * 4)]), 4, 4, (3, 3), pads=(1,) * 4), x)
    y = b.node("Relu", [b.bn(b.conv(h, 4, 8, (3, 3), pads=(1,) * 4), 8)])
    result = fuse_and_check(b.model(y), {"BatchNormalization": 0, "Add": 1})
    assert [bl.rule for bl in result.report.blocks] == ["conv_bn"]


def test_blocks_sharing_weights_get_fresh_initializers():
    """Two blocks reading the same weight and BN initializers: each gets fresh fused weights;
    the shared ones are never edited in place and go only when nothing reads them any more."""
    b = Builder(seed=35)
    x = b.input([1, 4, 9, 9])
    first = repvgg_block(b, x, 4, 4)
    block = list(b.nodes)
    h = b.node("Relu", [first])
    renamed = {x: h}
    for node in block:   # the same block again on h, same parameter tensors
        copy = helper.make_node(node.op_type, [renamed.get(i, i) for i in node.input],
                                [f"{o}_again" for o in node.output], name=f"{node.name}_again")
        copy.attribute.extend(node.attribute)
        renamed.update({o: f"{o}_again" for o in node.output})
        b.nodes.append(copy)
    model = b.model(renamed[first])
    params = {t.name for t in model.graph.initializer}
    result = fuse_and_check(model, {"Conv": 2, "Add": 0, "BatchNormalization": 0})
    assert len(result.report.fused) == 2
    names = {t.name for t in result.model.graph.initializer}
    assert not names & params
    assert len([n for n in names if n.endswith("reparam.weight")]) == 2


@pytest.mark.parametrize("const_shape", [(1, 6, 1, 1), (6, 1, 1), (1,), ()])
@pytest.mark.parametrize("position", [0, 1, 3])
def test_sum_with_a_constant_operand(const_shape, position):
    """Sum(BN(Conv3x3(x)), c, BN(Conv1x1(x)), x): the constant is part of the sum (it once was
    peeled off with the sum's own node and lost)."""
    b = Builder(seed=31 + position)
    x = b.input([1, 6, 9, 7])
    terms = [b.bn(b.conv(x, 6, 6, (3, 3), pads=(1, 1, 1, 1), bias=False), 6),
             b.bn(b.conv(x, 6, 6, (1, 1), bias=False), 6), x]
    terms.insert(position, b.const(b.rng.normal(0, 3.0, const_shape), "c"))
    result = fuse_and_check(b.model(b.node("Sum", terms)), {"Conv": 1, "Sum": 0})
    assert [blk.rule for blk in result.report.fused] == ["repvgg"]


def test_nested_sums_keep_their_constants():
    """Constants of nested Sum nodes carry their sign through a Sub."""
    b = Builder(seed=35)
    x = b.input([1, 4, 8, 9])
    inner = b.node("Sum", [b.conv(x, 4, 4, (1, 1), bias=False), b.const(b.rng.normal(0, 2.0, (1, 4, 1, 1)), "c")])
    outer = b.node("Sub", [b.bn(b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1), bias=False), 4), inner])
    fuse_and_check(b.model(b.node("Sum", [outer, x, b.const(b.rng.normal(0, 2.0, (4, 1, 1)), "d")])),
                   {"Conv": 1, "Sum": 0, "Sub": 0}, verify=False, check_blocks=False)


def test_sum_with_a_constant_that_is_not_per_channel_stays():
    """A constant that varies over H is not a bias: the block stays, and nothing is lost."""
    from conftest import assert_untouched
    b = Builder(seed=36)
    x = b.input([1, 4, 8, 9])
    terms = [b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1)), b.conv(x, 4, 4, (1, 1)),
             b.const(b.rng.normal(0, 1.0, (1, 1, 8, 1)), "c")]
    assert_untouched(b.model(b.node("Sum", terms)), "not per-channel")


def _affine_free_bn(b: Builder, y: str, channels: int, via_shape: bool, leak: bool = False) -> str:
    """BatchNorm2d(affine=False) as the dynamo exporter writes it without optimization: scale and
    bias are Expand(CastLike(1 or 0, y), shape), reading y only for its dtype (and shape)."""
    one, zero = b.const(np.array(1.0), "one"), b.const(np.array(0.0), "zero")
    if via_shape:
        shape = b.node("Shape", [y], start=1, end=2)
    else:
        shape = b.name("shape")
        b.inits.append(onnx.numpy_helper.from_array(np.array([channels], np.int64), shape))
    scale = b.node("Expand", [b.node("CastLike", [one, y]), shape])
    bias = b.node("Expand", [b.node("CastLike", [zero, y]), shape])
    if leak:   # the shape is also used elsewhere: the reader outlives the block
        b.output(b.node("Cast", [shape], to=onnx.TensorProto.FLOAT))
    mean, var = b.const(b.rng.normal(0, 0.5, channels), "mean"), b.const(b.rng.uniform(0.5, 2, channels), "var")
    return b.node("BatchNormalization", [y, scale, bias, mean, var])


@pytest.mark.parametrize("via_shape", [False, True])
def test_shape_only_readers_die_with_the_block(via_shape):
    """CastLike/Shape readers of a conv output that only compute the BN's parameters are not
    consumers: the Conv→BN folds (alone and as RepVGG branches), and they go with it."""
    b = Builder(seed=37)
    x = b.input([1, 4, 9, 7])
    chain = _affine_free_bn(b, b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1), bias=False), 4, via_shape)
    y = b.node("Relu", [chain])
    block = b.add(_affine_free_bn(b, b.conv(y, 4, 4, (3, 3), pads=(1, 1, 1, 1), bias=False), 4, via_shape),
                  _affine_free_bn(b, b.conv(y, 4, 4, (1, 1), bias=False), 4, via_shape), y)
    result = fuse_and_check(b.model(block), {"Conv": 2, "Add": 0, "CastLike": 0, "Shape": 0, "Expand": 0})
    assert sorted(blk.rule for blk in result.report.fused) == ["conv_bn", "repvgg"]


def test_shape_reader_that_outlives_the_block_keeps_it():
    from conftest import assert_untouched
    b = Builder(seed=38)
    x = b.input([1, 4, 9, 7])
    y = _affine_free_bn(b, b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1), bias=False), 4, True, leak=True)
    assert_untouched(b.model(b.node("Relu", [y])), "is also read by 'shape")


@pytest.mark.parametrize("op", ["Concat", "Slice", "Add"])
def test_a_shape_read_through_another_op_that_outlives_the_block_keeps_it(op):
    """Shape(Concat(y, y)) (or of a Slice, an Add) read by the graph's output: the op reads y for its
    shape only, but outlives the block, so y stays; nothing fails on the way (a Concat among such
    readers once stopped the index with a TypeError, on EfficientViT)."""
    from conftest import assert_untouched
    from onnx import numpy_helper
    b = Builder(seed=39)
    x = b.input([1, 4, 9, 7])
    y = b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1))
    if op == "Concat":
        other = b.node("Concat", [y, y], axis=1)
    elif op == "Slice":
        b.inits += [numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((0, "s0"), (2, "s1"), (1, "s2"))]
        other = b.node("Slice", [y, "s0", "s1", "s2"])
    else:
        other = b.node("Add", [y, y])
    b.output(b.node("Shape", [other]))
    assert_untouched(b.model(b.bn(y, 4)), "is also read by")
