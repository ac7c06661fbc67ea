"""Blocks that cannot be fused exactly stay as they were, and the report says why."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import Builder, assert_equivalent, assert_untouched, fuse_and_check, op_counts, repvgg_block, run_cli
from reparam_onnx import fuse_with_report


def test_different_strides():
    """A 1×5 at stride 1 and a 1×1 at stride 2 both give width 5 from width 9, yet read different taps."""
    b = Builder()
    x = b.input([1, 4, 3, 9])
    a = b.bn(b.conv(x, 4, 4, (1, 5), (1, 1), (0, 0, 0, 0)), 4)
    c = b.bn(b.conv(x, 4, 4, (1, 1), (1, 2), (0, 0, 0, 0)), 4)
    assert_untouched(b.model(b.add(a, c)), "different strides", identical=False)


def test_misaligned_one_by_one():
    """A 1×1 with padding 1 beside a 3×3 with padding 1: on a height of 1 the outputs broadcast
    (1 row and 3 rows), so the model runs, but the 1×1 reads a different grid."""
    b = Builder()
    x = b.input([1, 4, 1, 7])
    a = b.bn(b.conv(x, 4, 4, (3, 3), (1, 1), (1, 1, 1, 1)), 4)
    c = b.bn(b.conv(x, 4, 4, (1, 1), (1, 1), (1, 0, 1, 0)), 4)
    assert_untouched(b.model(b.add(a, c)), "different output sizes", identical=False)


def test_misaligned_by_half_a_dilation():
    b = Builder()
    x = b.input([1, 4, 11, 11])
    a = b.conv(x, 4, 4, (3, 3), pads=(2, 2, 2, 2), dilations=(2, 2))
    c = b.conv(x, 4, 4, (3, 3), pads=(1, 1, 3, 3), dilations=(2, 2))
    assert_untouched(b.model(b.add(a, c)), "misaligned")


def test_relu_inside_a_branch():
    b = Builder()
    x = b.input([1, 4, 9, 7])
    a = b.bn(b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1)), 4)
    c = b.node("Relu", [b.bn(b.conv(x, 4, 4, (1, 1)), 4)])
    model = b.model(b.add(a, c, b.bn(x, 4)))
    result = assert_untouched(model, "Relu", identical=False)
    assert op_counts(result.model)["Add"] == 2
    assert_equivalent(model, result.model)


def test_branch_tensor_is_a_graph_output():
    b = Builder()
    x = b.input([1, 4, 9, 7])
    a = b.bn(b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1)), 4)
    c = b.bn(b.conv(x, 4, 4, (1, 1)), 4)
    y = b.add(a, c, x)
    b.output(c)
    model = b.model(y)
    result = assert_untouched(model, "graph output", identical=False)
    assert op_counts(result.model)["Add"] == 2


def test_branch_tensor_with_a_second_consumer():
    b = Builder()
    x = b.input([1, 4, 9, 7])
    a = b.bn(b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1)), 4)
    c = b.bn(b.conv(x, 4, 4, (1, 1)), 4)
    y = b.add(a, c)
    z = b.node("Sigmoid", [c])
    model = b.model(y, z)
    result = assert_untouched(model, "also read by", identical=False)
    assert op_counts(result.model)["Add"] == 1


def test_weight_is_a_graph_input():
    b = Builder()
    x = b.input([1, 4, 9, 7])
    y = repvgg_block(b, x, 4, 4)
    model = b.model(y)
    w = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)))
    assert_untouched(model, "graph input", identical=False)
    fuse_and_check(model, {"Conv": 1, "Add": 0}, initializers_as_constants=True)


def test_batchnorm_in_training_mode():
    b = Builder(opset=15)
    x = b.input([1, 4, 9, 7])
    a = b.bn(b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1)), 4)
    c = b.bn(b.conv(x, 4, 4, (1, 1)), 4, training_mode=1)
    assert "training mode" in _reason(b.model(b.add(a, c)))


def test_bn_before_padded_conv_is_not_folded():
    """A shift before zero padding differs at the borders: only the Conv→BN after it is folded."""
    b = Builder()
    x = b.input([1, 4, 9, 7])
    h = b.bn(b.node("Relu", [x]), 4)
    y = b.bn(b.conv(h, 4, 4, (3, 3), pads=(1, 1, 1, 1)), 4)
    result = fuse_and_check(b.model(y), {"Conv": 1, "BatchNormalization": 1})
    assert [bl.input for bl in result.report.fused] == [h]


def test_bn_before_unpadded_conv_is_folded():
    b = Builder()
    x = b.input([1, 4, 9, 7])
    h = b.bn(b.node("Relu", [x]), 4)
    y = b.bn(b.conv(h, 4, 6, (3, 3)), 6)
    fuse_and_check(b.model(y), {"Conv": 1, "BatchNormalization": 0})


def test_same_pads_stride_2_dynamic_spatial():
    b = Builder()
    x = b.input([1, 4, "H", "W"])
    a = b.bn(b.conv(x, 4, 4, (3, 3), (2, 2), auto_pad="SAME_UPPER"), 4)
    c = b.bn(b.conv(x, 4, 4, (1, 1), (2, 2), auto_pad="SAME_UPPER"), 4)
    assert "static spatial input size" in _reason(b.model(b.add(a, c)))


def test_resnet_residual_is_not_a_candidate():
    b = Builder()
    x = b.input([1, 4, 9, 7])
    r = b.node("Relu", [x])
    h = b.bn(b.conv(b.node("Relu", [b.bn(b.conv(r, 4, 4, (3, 3), pads=(1,) * 4), 4)]), 4, 4, (3, 3), pads=(1,) * 4), 4)
    y = b.add(h, r)
    result = fuse_with_report(b.model(y))
    assert all(bl.rule == "conv_bn" for bl in result.report.blocks)
    assert op_counts(result.model)["Add"] == 1


def test_spatially_varying_constant_is_not_per_channel():
    b = Builder()
    x = b.input([1, 4, 5, 5])
    c = b.conv(x, 4, 4, (3, 3), pads=(1,) * 4)
    y = b.node("Mul", [c, b.const(np.random.default_rng(0).normal(size=(5,)))])   # broadcasts on W
    assert_untouched(b.model(y), "not per-channel")


def test_no_rule_accepts():
    """Exact but unwanted: two 1×1 convs with groups > 1, no named rule for them, generic disabled."""
    b = Builder()
    x = b.input([1, 4, 5, 5])
    y = b.add(b.conv(x, 4, 4, (1, 1), group=2), b.conv(x, 4, 4, (1, 1), group=2))
    assert_untouched(b.model(y), "no enabled rule accepts", disable_rules=["generic"])


def test_weights_too_large_for_float16():
    b = Builder(dtype=np.float16)
    x = b.input([1, 2, 5, 5])
    a = b.conv(x, 2, 2, (3, 3), pads=(1,) * 4, scale=1.0)
    y = b.bn(b.add(a, b.conv(x, 2, 2, (1, 1)), x), 2)
    model = b.model(y)
    var = next(t for t in model.graph.initializer if t.name.startswith("var"))
    var.CopyFrom(onnx.numpy_helper.from_array(np.full(2, 1e-9, np.float16), var.name))
    bn = model.graph.node[-1]
    bn.attribute[0].f = 1e-12   # epsilon: s = γ/√(σ²+ε) ≈ 3e4 pushes weights past 65504
    assert "float16 range" in _reason(model)


def _reason(model):
    """The reasons of the blocks left unfused; their sums (Adds) must still be there."""
    result = fuse_with_report(model, verify=False)
    left = [bl for bl in result.report.blocks if not bl.fused]
    assert left and all(bl.output in {o for n in result.model.graph.node for o in n.output} for bl in left)
    return " | ".join(bl.reason for bl in left)


def test_quantized_weights_are_left_alone():
    """A Conv weight from DequantizeLinear is not folded to float: that would change the precision."""
    b = Builder()
    x = b.input([1, 4, 9, 7])
    wq = b.node("QuantizeLinear", [b.const(np.random.default_rng(0).normal(size=(4, 4, 3, 3))),
                                   b.const(np.array(0.05), "scale")])
    w = b.node("DequantizeLinear", [wq, b.const(np.array(0.05), "scale")])
    c = b.node("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = b.model(b.add(c, b.bn(b.conv(x, 4, 4, (1, 1)), 4)))
    assert_untouched(model, "quantized", identical=False)


def test_control_flow_is_noted():
    b = Builder()
    x = b.input([1, 4, 9, 7])
    y = repvgg_block(b, x, 4, 4)
    then = helper.make_graph([helper.make_node("Identity", [y], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)])
    cond = b.const(np.array(True), "cond")
    b.inits[-1] = onnx.numpy_helper.from_array(np.array(True), cond)
    out = b.node("If", [cond], then_branch=then, else_branch=then)
    result = fuse_and_check(b.model(out), {"Conv": 1, "Add": 0})
    assert any("If" in note for note in result.report.notes)


def test_branch_tensor_read_inside_a_subgraph():
    """An If body reading a branch tensor is a second consumer: the block stays."""
    b = Builder()
    x = b.input([1, 4, 9, 7])
    a = b.bn(b.conv(x, 4, 4, (3, 3), pads=(1,) * 4), 4)
    c = b.bn(b.conv(x, 4, 4, (1, 1)), 4)
    y = b.add(a, c)
    then = helper.make_graph([helper.make_node("Identity", [c], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)])
    cond = b.const(np.array(True), "cond")
    b.inits[-1] = onnx.numpy_helper.from_array(np.array(True), cond)
    out = b.node("If", [cond], then_branch=then, else_branch=then)
    result = assert_untouched(b.model(y, out), "also read by", identical=False)
    assert op_counts(result.model)["Add"] == 1


# ---------------------------------------------------------------- broken BatchNormalization statistics

def _conv_bn(channels=6, dtype=np.float32, **stats):
    """x → 3×3 Conv → BatchNormalization, with some statistics replaced: a Conv→BN chain."""
    b = Builder(dtype=dtype)
    x = b.input([1, channels, 5, 5])
    y = b.bn(b.conv(x, channels, channels, (3, 3), pads=(1,) * 4), channels, epsilon=stats.pop("epsilon", 1e-5))
    model = b.model(y)
    for name, (channel, value) in stats.items():
        t = next(t for t in model.graph.initializer if t.name == f"{name}1")
        array = onnx.numpy_helper.to_array(t).copy()
        array[channel] = value
        t.CopyFrom(onnx.numpy_helper.from_array(array, t.name))
    return model


BROKEN_STATISTICS = {
    "negative variance": (dict(var=(5, -1.0)), "has a negative variance (-1, epsilon 1e-05) in channel 5"),
    "zero variance, epsilon 0": (dict(var=(2, 0.0), epsilon=0.0), "has zero variance with epsilon 0 in channel 2"),
    "variance −epsilon": (dict(var=(1, -0.5), epsilon=0.5), "has a negative variance (-0.5, epsilon 0.5) in channel 1"),
    "NaN mean": (dict(mean=(3, np.nan)), "has a non-finite mean (nan) in channel 3"),
    "infinite scale": (dict(gamma=(0, np.inf)), "has a non-finite scale (inf) in channel 0"),
    "float64 scale overflow": (dict(dtype=np.float64, gamma=(4, 1e300), var=(4, 1e-300), epsilon=0.0),
                               "beyond the float64 range in channel 4"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_STATISTICS))
def test_broken_batchnorm_statistics_are_named(case):
    """Statistics where s = γ/√(σ²+ε) is NaN or infinite: the block stays, its reason says what is
    wrong with which BatchNormalization in which channel, and numpy warns about nothing."""
    stats, words = BROKEN_STATISTICS[case]
    model = _conv_bn(**dict(stats))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fuse_with_report(model, verify=False)
    assert not caught, [str(w.message) for w in caught]
    (block,) = result.report.blocks
    assert not block.fused and block.reason.startswith("BatchNormalization 'batchnormalization1' has ")
    assert words in block.reason and "fused weights exceed" not in block.reason, block.reason
    assert result.model.SerializeToString() == model.SerializeToString()


def test_negative_variance_inside_a_block():
    """One branch's BN is broken: the sum stays, and says why; the sound branches' Conv→BN fold."""
    b = Builder()
    x = b.input([1, 4, 9, 7])
    model = b.model(repvgg_block(b, x, 4, 4))
    var = next(t for t in model.graph.initializer if t.name == "var2")
    var.CopyFrom(onnx.numpy_helper.from_array(np.array([1, 1, -2, 1], np.float32), var.name))
    reason = _reason(model)
    assert "BatchNormalization 'batchnormalization2' has a negative variance (-2, epsilon 1e-05) in channel 2" \
        in reason, reason
    assert "range" not in reason


def test_overflowing_fold_warns_about_nothing():
    """Anywhere in the fold (here a Conv times a per-channel Mul, in float64) numbers may overflow:
    the block stays with the reason, and numpy prints no warning."""
    b = Builder(dtype=np.float64)
    x = b.input([1, 2, 5, 5])
    y = b.node("Mul", [b.conv(x, 2, 2, (3, 3), pads=(1,) * 4, scale=1e200), b.const(np.full((1, 2, 1, 1), 1e200))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "float64 range" in _reason(b.model(y))
    assert not caught, [str(w.message) for w in caught]


def test_tiny_negative_variance_within_epsilon_is_exact():
    """σ² < 0 but σ² + ε > 0: the runtime computes a finite BN, and folding it is exact."""
    fuse_and_check(_conv_bn(var=(1, -1e-6)), {"Conv": 1, "BatchNormalization": 0})


def test_broken_batchnorm_cli_stderr_is_empty(tmp_path):
    """On the command line: exit 0, the reason on stdout, and nothing at all on stderr."""
    src = tmp_path / "m.onnx"
    onnx.save_model(_conv_bn(var=(5, -1.0)), str(src))
    proc = run_cli([src, "-o", tmp_path / "out.onnx"])
    assert proc.returncode == 0
    assert proc.stderr == ""
    assert "  batchnormalization1_out: BatchNormalization 'batchnormalization1' has a negative variance " \
           "(-1, epsilon 1e-05) in channel 5\n" in proc.stdout


def test_broken_batchnorm_beside_fused_blocks_cli(tmp_path):
    """The broken BN makes the model's own output infinite; the sound Conv→BN beside it fold. The
    fused model computes the same infinities: exit 0, and nothing on stderr."""
    b = Builder()
    x = b.input([1, 4, 9, 7])
    model = b.model(repvgg_block(b, x, 4, 4))
    var = next(t for t in model.graph.initializer if t.name == "var1")
    var.CopyFrom(onnx.numpy_helper.from_array(np.array([1, 1, 0, 1], np.float32), var.name))
    bn = next(n for n in model.graph.node if n.name == "batchnormalization1")
    bn.attribute[0].f = 0.0
    src = tmp_path / "m.onnx"
    onnx.save_model(model, str(src))
    proc = run_cli([src, "-o", tmp_path / "out.onnx"])
    assert proc.stderr == ""
    assert proc.returncode == 0


def test_conv_weight_of_rank_below_3_from_a_constant_subgraph():
    """validate.py sees initializers; a weight reshaped to rank 2 by a constant subgraph is the
    engine's to refuse (once exit 4)."""
    b = Builder(seed=61)
    x = b.input([1, 4, 5, 5])
    w = b.const(b.rng.normal(0, 0.5, (4, 4, 1, 1)))
    shape = b.name("shape")
    b.inits.append(onnx.numpy_helper.from_array(np.array([4, 4], np.int64), shape))
    flat = b.node("Reshape", [w, shape])
    y = b.bn(b.node("Conv", [x, flat], kernel_shape=[1, 1]), 4)
    result = fuse_with_report(b.model(y), verify=False)
    assert not result.report.fused
    assert any("has rank 2" in (blk.reason or "") for blk in result.report.blocks)


def test_nan_parameter_is_named():
    b = Builder(seed=62)
    x = b.input([1, 4, 5, 5])
    y = b.bn(b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1)), 4)
    model = b.model(y)
    weight = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(weight).copy()
    values[2, 1, 0, 0] = np.nan
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    result = fuse_with_report(model, verify=False)
    reasons = [blk.reason or "" for blk in result.report.blocks]
    assert not result.report.fused and any("NaN" in r for r in reasons), reasons
