"""Exactness rests only on what the graph guarantees; checks run at shapes the graph fixes.

Stale value_info, -1 and symbolic dims are hints, never proof (issue 7, items 1, 2, 13);
verification compares NaN/inf by position and names an unstable original (items 14, 16).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import (Builder, assert_equivalent, fuse_and_check, invoke, max_rel_error, one_error_line, repvgg_block,
                      run_model)
from reparam_onnx import VerificationError, fuse_with_report
from reparam_onnx.shapes import input_dims, static_shapes
from reparam_onnx.verify import relative_error


def _same_block(b: Builder, x: str, c: int, kernel: int, stride: int) -> str:
    """k×k + 1×1 Conv-BN with auto_pad=SAME_UPPER at a stride: its pads depend on the input size."""
    k = b.bn(b.conv(x, c, c, (kernel, kernel), (stride, stride), auto_pad="SAME_UPPER", bias=False), c)
    one = b.bn(b.conv(x, c, c, (1, 1), (stride, stride), auto_pad="SAME_UPPER", bias=False), c)
    return b.add(k, one)


def _dynamic_model(dims, kernel: int, stride: int, stale=None):
    """x (declared `dims`) → Relu → SAME block; `stale` adds a value_info for the block input."""
    b = Builder(seed=3)
    x = b.input(dims)
    h = b.node("Relu", [x])
    model = b.model(_same_block(b, h, 6, kernel, stride))
    if stale is not None:
        model.graph.value_info.append(helper.make_tensor_value_info(h, TensorProto.FLOAT, stale))
    return model


def _equal_at_sizes(original, fused, sizes):
    """Both models agree (shape and values) at every spatial size in `sizes`."""
    rng = np.random.default_rng(5)
    for n in sizes:
        feeds = {"x": rng.standard_normal((2, 6, n, n + 1)).astype(np.float32)}
        assert_equivalent(original, fused, feeds)


@pytest.mark.parametrize("kernel,stride", [(2, 7), (3, 2)])
@pytest.mark.parametrize("declared", [["N", 6, "H", "W"], [-1, 6, -1, -1], [None, 6, None, None]])
def test_stale_value_info_and_unknown_dims_are_not_proof(declared, kernel, stride):
    """A stale [1,6,16,16] value_info, or a dim written -1/0, is no static size: a SAME block at
    stride > 1 stays, with the reason that names the dynamic size, and the output is exact at every size.
    (onnxruntime enforces a declared 0, so it is a real size; the engine still treats it as unknown.)"""
    model = _dynamic_model(declared, kernel, stride, stale=[1, 6, 16, 16])
    result = fuse_with_report(model)
    block = next(b for b in result.report.blocks if "SAME" in (b.reason or ""))
    assert not block.fused and "static spatial input size" in block.reason
    _equal_at_sizes(model, result.model, range(11, 24))


def test_declared_static_size_is_proof():
    """The same block on a declared static input fuses, with pads for that size."""
    model = _dynamic_model([2, 6, 16, 17], 3, 2)
    result = fuse_and_check(model, feeds={"x": np.random.default_rng(1).standard_normal((2, 6, 16, 17))
                                          .astype(np.float32)})
    assert [b.rule for b in result.report.fused] == ["repvgg"]


def test_static_shapes_ignore_annotations():
    model = _dynamic_model(["N", 6, -1, "W"], 3, 2, stale=[1, 6, 16, 16])
    declared = helper.make_tensor_value_info(model.graph.output[0].name, TensorProto.FLOAT, [1, 6, 8, 8])
    model.graph.output[0].CopyFrom(declared)                   # a declared output shape is a hint too
    shapes = static_shapes(model)
    relu = model.graph.node[0].output[0]
    assert shapes["x"][0] == (None, 6, None, None)
    assert shapes[relu][0] == (None, 6, None, None)
    assert shapes[model.graph.output[0].name][0] == (None, 6, None, None)


def test_dims_fixed_by_weights_are_fed():
    """A symbolic channel dim is fed what the weights read, through Transposes too."""
    b = Builder(seed=4)
    x = b.input(["N", "C", "H", "W"])
    nhwc = b.input(["N", "H", "W", "C"], name="y")
    model = b.model(b.conv(x, 6, 6, (3, 3), pads=(1, 1, 1, 1)),
                    b.conv(b.node("Transpose", [nhwc], perm=[0, 3, 1, 2]), 5, 5, (1, 1)))
    dims = input_dims(model)
    assert dims == {"x": [2, 6, 17, 17], "y": [2, 17, 17, 5]}


def _symbolic_channels(stem: bool):
    b = Builder(seed=6)
    x = b.input(["N", "C", "H", "W"])
    h = b.node("Relu", [b.conv(x, 6, 6, (3, 3), pads=(1, 1, 1, 1))]) if stem else x
    y = b.node("Relu", [repvgg_block(b, h, 6, 6)])
    return b.model(b.node("Relu", [b.bn(b.conv(y, 6, 4, (3, 3), (2, 2), (1, 0, 1, 1), bias=False), 4)]))


@pytest.mark.parametrize("stem", [False, True])
def test_symbolic_channels_fixed_by_weights(stem):
    """Block checks and the whole-model verification take C from the weights, not a guess."""
    model = _symbolic_channels(stem)
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 6, 11, 8)).astype(np.float32)}
    result = fuse_and_check(model, feeds=feeds)
    assert sorted(b.rule for b in result.report.fused) == ["conv_bn", "repvgg"]
    assert result.report.verification.passed and result.report.verification.inputs["x"][1] == 6


def test_block_input_of_unknown_shape_is_checked_at_the_weights_channels():
    """A block after an op shape inference does not know (a com.microsoft contrib op): the
    block check builds its input from the weights, and the block fuses."""
    b = Builder(seed=8)
    x = b.input([1, 6, 9, 7])
    b.nodes.append(helper.make_node("Gelu", [x], ["g"], name="gelu", domain="com.microsoft"))
    model = b.model(repvgg_block(b, "g", 6, 6))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert static_shapes(model).get("g", (None,))[0] is None
    result = fuse_and_check(model)
    assert [b.rule for b in result.report.fused] == ["repvgg"] and result.report.fused[0].check is not None


def test_block_check_covers_every_stride_residue():
    """On a dynamic size the block is run alone at one size per residue modulo its stride."""
    from reparam_onnx.geometry import ConvGeometry
    from reparam_onnx.check import check_sizes
    g = ConvGeometry((3, 3), (7, 2), (1, 1), (1, 1), (1, 1))
    sizes = check_sizes((None, 10), g)
    assert len(sizes) == 7 and {h % 7 for h, _ in sizes} == set(range(7)) and {w for _, w in sizes} == {10}
    assert all(h >= g.extent(0) for h, _ in sizes)
    assert check_sizes((12, 10), g) == [(12, 10)]
    assert {w % 2 for _, w in check_sizes((12, None), g)} == {0, 1}


# ---------------------------------------------------------------- non-finite and unstable originals


def test_relative_error_compares_nonfinite_by_position():
    ref = np.array([1.0, np.nan, np.inf, -np.inf, 2.0])
    assert relative_error(ref, ref.copy()) == 0.0
    assert relative_error(ref, np.array([1.0, np.nan, np.inf, -np.inf, 2.5])) == pytest.approx(0.25)
    assert relative_error(ref, np.array([1.0, 0.0, np.inf, -np.inf, 2.0])) == np.inf
    assert relative_error(ref, np.array([1.0, np.nan, -np.inf, -np.inf, 2.0])) == np.inf
    assert relative_error(ref, np.array([np.nan, np.nan, np.inf, -np.inf, 2.0])) == np.inf


def test_nan_outputs_in_the_original_compare_by_position():
    """A Sqrt of the random input beside the block: its NaNs are where the original has them."""
    b = Builder(seed=9)
    x = b.input([1, 4, 9, 7])
    model = b.model(repvgg_block(b, x, 4, 4), b.node("Sqrt", [x]))
    result = fuse_with_report(model)
    assert result.report.verification.passed and len(result.report.fused) == 1
    assert not any("NaN" in n for n in result.report.notes)


def test_mostly_nan_original_is_verified_on_non_negative_inputs():
    """Sqrt before a block spreads NaN over nearly every output: retried on |x|, and said so."""
    b = Builder(seed=10)
    x = b.input([1, 4, 9, 7])
    model = b.model(repvgg_block(b, b.node("Sqrt", [x]), 4, 4))
    result = fuse_with_report(model)
    v = result.report.verification
    assert v.passed and v.ran and "non-negative inputs" in v.message
    assert any("non-negative inputs" in n for n in result.report.notes)
    feeds = {"x": np.abs(np.random.default_rng(3).standard_normal((1, 4, 9, 7))).astype(np.float32)}
    assert_equivalent(model, result.model, feeds)


def _chaotic_model():
    """sin(10⁶·block(x)): a one-ulp change of x moves the output by O(1)."""
    b = Builder(seed=11)
    x = b.input([1, 4, 9, 7])
    y = b.node("Mul", [repvgg_block(b, x, 4, 4), b.const(np.array(1e6))])
    return b.model(b.node("Sin", [y]))


def test_unstable_original_is_named_in_the_failure(tmp_path, capfd):
    model = _chaotic_model()
    with pytest.raises(VerificationError) as caught:
        fuse_with_report(model, rtol=1e-5)
    assert "the original itself is unstable" in str(caught.value) and "--inputs" in str(caught.value)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert invoke([path, "-o", tmp_path / "out.onnx", "--rtol", "1e-5", "-q"]) == 3
    assert "unstable" in one_error_line(capfd.readouterr().err)
    assert not (tmp_path / "out.onnx").exists()


def test_stable_failure_says_nothing_about_instability(monkeypatch):
    from reparam_onnx import kernels
    real = kernels.identity_kernel
    monkeypatch.setattr(kernels, "identity_kernel", lambda c, g, r: real(c, g, r) * 0.5)
    b = Builder(seed=12)
    x = b.input([1, 4, 9, 7])
    with pytest.raises(VerificationError) as caught:
        fuse_with_report(b.model(repvgg_block(b, x, 4, 4)), check_blocks=False)
    assert "unstable" not in str(caught.value)


# ---------------------------------------------------------------- random draws are not constants


@pytest.mark.parametrize("op", ["RandomNormal", "RandomUniform", "RandomUniform-in-If"])
def test_random_parameters_are_not_folded(op):
    """A Conv bias drawn by RandomNormal (or computed in a subgraph that draws) changes on every
    run: folding it would freeze one draw. The block stays, with that reason, even unverified."""
    b = Builder(seed=14)
    x = b.input([1, 4, 7, 7])
    if op == "RandomUniform-in-If":
        then = helper.make_graph([helper.make_node("RandomUniform", [], ["r"], shape=[4])], "then", [],
                                 [helper.make_tensor_value_info("r", TensorProto.FLOAT, [4])])
        cond = b.const(np.array(True), "cond")
        b.inits[-1] = onnx.numpy_helper.from_array(np.array(True), cond)
        bias = b.node("If", [cond], then_branch=then, else_branch=then)
    else:
        bias = b.node(op, [], shape=[4])
    w = b.const(b.rng.normal(0, 0.5, (4, 4, 3, 3)))
    y = b.bn(b.node("Conv", [x, w, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 4)
    model = b.model(y)
    result = fuse_with_report(model, verify=False, check_blocks=False)
    assert not result.report.fused
    (block,) = result.report.blocks
    assert "non-deterministic" in block.reason
    assert result.model.SerializeToString() == model.SerializeToString()


# ---------------------------------------------------------------- verification sizes


def test_whole_model_verification_covers_every_stride_residue():
    """A stride-3 block behind a stride-2 stem, on a dynamic input: the sizes chosen make the
    block's input length take every residue modulo 3 (17 and 16 alone give 9 and 8 only)."""
    b = Builder(seed=15)
    x = b.input([1, 4, "H", "W"])
    h = b.node("Relu", [b.conv(x, 4, 4, (3, 3), (2, 2), (1, 1, 1, 1))])
    k3 = b.bn(b.conv(h, 4, 4, (3, 3), (3, 3), (1, 1, 1, 1), bias=False), 4)
    k1 = b.bn(b.conv(h, 4, 4, (1, 1), (3, 3), (0, 0, 0, 0), bias=False), 4)
    model = b.model(b.add(k3, k1))
    result = fuse_with_report(model)
    v = result.report.verification
    assert v.passed and "residue" not in v.message
    from reparam_onnx.api import _fused_convs
    from reparam_onnx.shapes import covering_sizes
    sizes, short = covering_sizes(result.model, _fused_convs(result.model, result.report.fused))
    assert sizes == [17, 16, 19] and not short and v.runs == 3
    assert {((n - 1) // 2 + 1) % 3 for n in sizes} == {0, 1, 2}   # the stem's output length mod 3


def test_sessions_take_weights_beside_the_graph_and_leave_the_model_alone():
    """Verification hands large weights to onnxruntime beside a serialized skeleton of the
    graph (so models over 2 GiB verify); the model itself is only read."""
    from reparam_onnx.verify import _Runner, _skeleton
    b = Builder(seed=16)
    x = b.input([1, 32, 9, 7])
    model = b.model(repvgg_block(b, x, 32, 32))
    model.graph.initializer[0].data_location = TensorProto.DEFAULT   # an explicit default survives too
    before = model.SerializeToString()
    skeleton, arrays = _skeleton(model)
    assert len(arrays) >= 2 and len(skeleton.SerializeToString()) < len(before) // 4
    assert {t.name for t in skeleton.graph.initializer} == {t.name for t in model.graph.initializer}
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 32, 9, 7)).astype(np.float32)}
    out = _Runner(model)(feeds)
    assert model.SerializeToString() == before
    assert np.array_equal(next(iter(out.values())), next(iter(run_model(model, feeds).values())))
    fuse_and_check(model)


def _topk_model():
    """A block, then TopK over the parity of ⌊10⁶·block⌋ (ties everywhere): a rounding difference
    flips a parity, so the choice, and the Gather after it then picks other values."""
    b = Builder(seed=17)
    x = b.input([1, 4, 9, 7])
    y = b.node("Reshape", [repvgg_block(b, x, 4, 4), b.name("flat")])
    b.inits.append(onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "flat1"))
    b.nodes[-1].input[1] = "flat1"
    f = b.node("Floor", [b.node("Mul", [y, b.const(np.array(1e6))])])
    near = b.node("Sub", [f, b.node("Mul", [b.node("Floor", [b.node("Mul", [f, b.const(np.array(0.5))])]),
                                            b.const(np.array(2.0))])])   # the parity of ⌊10⁶·y⌋
    k = b.name("k")
    b.inits.append(onnx.numpy_helper.from_array(np.array([40], np.int64), k))
    _, indices = b.node("TopK", [near, k], n_out=2), "topk1_out1"
    return b.model(b.node("GatherElements", [y, indices], axis=1))


def test_choices_are_taken_from_the_original(monkeypatch):
    """Discrete choices (TopK, NMS, ArgMax, random draws) flip on float rounding: the fused model
    runs on the original's, and what follows them is compared."""
    from reparam_onnx import verify
    model = _topk_model()
    result = fuse_with_report(model)
    v = result.report.verification
    assert v.passed and len(result.report.fused) == 1 and "choice" in v.message
    assert set(v.inputs) == {"x"}
    monkeypatch.setattr(verify, "CHOICE_OPS", set())     # without it, the same correct fusion fails
    with pytest.raises(VerificationError):
        fuse_with_report(model, rtol=1e-5)


def test_choices_taken_from_the_original_still_catch_a_wrong_block(monkeypatch):
    from reparam_onnx import kernels
    real = kernels.identity_kernel
    monkeypatch.setattr(kernels, "identity_kernel", lambda c, g, r: real(c, g, r) * 0.5)
    with pytest.raises(VerificationError):
        fuse_with_report(_topk_model(), check_blocks=False)


def test_stale_value_info_is_dropped_once_the_graph_is_rewritten():
    """A rewritten graph keeps no value_info the graph does not guarantee: onnxruntime's memory
    planner trusts it, and the fused model (nodes in another order) failed where the original ran."""
    b = Builder(seed=0)
    x = b.input([1, 2, 1, "W"])
    c1 = b.conv(x, 2, 2, (1, 1), bias=False)
    c2 = b.conv(x, 2, 2, (1, 4), pads=(0, 0, 0, 3), bias=False)
    c3 = b.conv(x, 2, 2, (1, 4), bias=False)
    model = b.model(b.add(b.add(b.add(c1, x), c3), c2))
    model.graph.value_info.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, 2, 1, 1])
                                  for t in (c1, c2, c3))
    model.graph.value_info.append(helper.make_tensor_value_info(c2, TensorProto.FLOAT, [1, 2, 1, None]))
    result = fuse_with_report(model, allow_larger=True, verify=False)   # the model runs at W = 4 only
    assert result.report.fused
    kept = {(v.name, tuple(d.dim_value if d.HasField("dim_value") else None
                           for d in v.type.tensor_type.shape.dim)) for v in result.model.graph.value_info}
    assert all(1 not in dims[3:] for _, dims in kept)    # the stale W = 1 claims are gone
    assert any("value_info" in n for n in result.report.notes)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 2, 1, 4)).astype(np.float32)}
    assert_equivalent(model, result.model, feeds)


def test_vouched_value_info_is_kept():
    b = Builder(seed=1)
    x = b.input([1, 4, 9, 7])
    y = b.node("Relu", [repvgg_block(b, x, 4, 4)])
    model = b.model(b.node("Relu", [y]))
    model.graph.value_info.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 9, None]))
    result = fuse_with_report(model)
    assert [v.name for v in result.model.graph.value_info] == [y]


def test_a_multiplication_by_ones_that_broadcasts_is_not_a_no_op():
    """x · ones([1, 7, 1]) widens an x of one token to 7 (RT-DETR's all-ones anchor mask): it is
    not dropped as a no-op; folded, it would be a per-token scale, which no Linear holds."""
    b = Builder(seed=3)
    x = b.input(["B", "N", 6])
    masked = b.node("Mul", [b.const(np.ones((1, 7, 1))), x])
    y = b.node("Add", [b.node("MatMul", [masked, b.const(b.rng.normal(0, 0.5, (6, 5)))]), b.const(b.rng.normal(0, 1, 5))])
    y = b.node("Mul", [y, b.const(b.rng.uniform(0.5, 2, 5))])
    model = b.model(y)
    result = fuse_with_report(model, check_blocks=False, verify=False)
    assert "mul1" in {n.name for n in result.model.graph.node}   # the mask stays
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 1, 6)).astype(np.float32)}
    (ref,) = run_model(model, feeds).values()
    (out,) = run_model(result.model, feeds).values()
    assert ref.shape == out.shape == (2, 7, 5)
    assert max_rel_error(ref, out) <= 1e-5
