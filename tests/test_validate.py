"""Shape facts the engine reads, checked at load (validate.SHAPE_CHECKS): a malformed Conv,
BatchNormalization, Pad or Transpose is an input error (exit 2, one line naming the node),
never an internal error; and every model refused is one onnxruntime refuses too."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from conftest import SETTINGS, Builder, invoke, leftovers, one_error_line, repvgg_block, runs
from reparam_onnx import InputError, VerificationError, fuse_with_report
from reparam_onnx import validate


def repvgg(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x → 3×3 conv-bn + 1×1 conv-bn + bn, then a Conv with a bias and a Transpose."""
    b = Builder(seed, opset=opset)
    x = b.input([1, 4, 6, 5])
    y = b.conv(b.node("Relu", [repvgg_block(b, x, 4, 4)]), 4, 4, (3, 3), pads=(1,) * 4)
    return b.model(b.node("Transpose", [y], perm=[0, 2, 3, 1]))


def _init(model, name) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _set_init(name, shape):
    def change(m):
        t = _init(m, name)
        t.CopyFrom(numpy_helper.from_array(np.ones(shape, np.float32), name))
    return change


def _node(model, name) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_attr(node_name, attr, value):
    def change(m):
        node = _node(m, node_name)
        kept = [a for a in node.attribute if a.name != attr]
        del node.attribute[:]
        node.attribute.extend(kept + ([helper.make_attribute(attr, value, attr_type=onnx.AttributeProto.INTS if isinstance(value, list) else None)] if value is not None else []))
    return change


def _bn_all(shape, n=1):
    def change(m):
        for name in ("gamma", "beta", "mean", "var"):
            _set_init(f"{name}{n}", shape)(m)
    return change


def _pads_input(values):
    def change(m):
        m.graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), "pads"))
        m.graph.node.insert(0, helper.make_node("Pad", ["x", "pads"], ["padded"], name="pad1"))
        _node(m, "conv1").input[0] = "padded"
        _set_attr("conv1", "pads", [0, 0, 0, 0])(m)
    return change


# case → (edit of repvgg(), words of the error)
MALFORMED = {
    "conv weight rank 1": (_set_init("w1", (36,)), "Conv node 'conv1' has a weight of shape [36]"),
    "conv weight rank 0": (_set_init("w1", ()), "Conv node 'conv1' has a weight of shape []"),
    "conv weight rank 2": (_set_init("w1", (4, 4)), "has a weight of shape [4, 4]"),
    "conv weight rank 3 on a rank-4 input": (_set_init("w1", (4, 4, 3)), "rank-4 input"),
    "conv weight reads other channels": (_set_init("w1", (4, 3, 3, 3)), "reads 4 channels"),
    "conv bias of 3 for 4 channels": (_set_init("b1", (3,)), "bias of shape [3] for 4 output channels"),
    "conv bias of rank 2": (_set_init("b1", (1, 4)), "bias of shape [1, 4]"),
    "conv group does not divide": (_set_attr("conv3", "group", 3), "group 3 does not divide"),
    "conv group 0": (_set_attr("conv3", "group", 0), "group 0"),
    "conv kernel_shape differs": (_set_attr("conv3", "kernel_shape", [3, 1]), "kernel_shape [3, 1]"),
    "conv kernel_shape of rank 1": (_set_attr("conv3", "kernel_shape", [3]), "kernel_shape [3] and a weight of shape [4, 4, 3, 3]"),
    "conv pads for 3 axes": (_set_attr("conv3", "pads", [1] * 6), "pads [1, 1, 1, 1, 1, 1] for 2"),
    "conv negative pads": (_set_attr("conv3", "pads", [-1, 0, 0, 0]), "negative pads"),
    "conv strides of rank 1": (_set_attr("conv3", "strides", [1]), "strides [1] for 2"),
    "conv dilation 0": (_set_attr("conv3", "dilations", [0, 1]), "dilations [0, 1]"),
    "bn scale of 3": (_set_init("gamma1", (3,)), "scale of shape [3], B of shape [4]"),
    "bn var of rank 2": (_set_init("var1", (2, 2)), "var of shape [2, 2]"),
    "bn scale of rank 0": (_set_init("gamma1", ()), "scale of shape []"),
    "bn of 5 after a conv of 4": (_bn_all((5,)), "'batchnormalization1' has 5 values of scale for 4 channels"),
    "bn of 1 after a conv of 4": (_bn_all((1,)), "1 values of scale for 4 channels"),
    "bn vectors of rank 3": (_bn_all((4, 1, 1)), "scale of shape [4, 1, 1]"),
    "bn of 3 on an input of 4": (_bn_all((3,), 3), "'batchnormalization3' has 3 values of scale for 4 channels"),
    "pad of 6 for a rank-4 input": (_pads_input([0] * 6), "6 pads for 4 input axes"),
    "transpose perm repeats": (_set_attr("transpose1", "perm", [0, 2, 2, 1]), "not a permutation"),
    "transpose perm of rank 3": (_set_attr("transpose1", "perm", [0, 2, 1]), "perm [0, 2, 1]"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_is_refused_at_load(case, tmp_path, capfd):
    """One line, exit 2, the node and the fact named; onnxruntime refuses the model too."""
    model = repvgg()
    edit, words = MALFORMED[case]
    edit(model)
    assert not runs(model), "the check refused a model onnxruntime runs"
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    out.mkdir()
    assert invoke([src, "-o", out / "f.onnx"]) == 2
    line = one_error_line(capfd.readouterr().err)
    assert "is not a valid ONNX model" in line and words in line, line
    assert leftovers(out) == []


def _zero_output_channels(m):
    _set_init("w3", (0, 4, 3, 3))(m)
    _set_init("b1", (0,))(m)
    del m.graph.node[-1:]
    m.graph.output[0].name = "conv3_out"


def _weights_as_graph_inputs(m):
    """IR 3 style: initializers also graph inputs, declared with their shapes."""
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _weight_from_a_constant_node(m):
    w = _init(m, "w3")
    m.graph.node.insert(0, helper.make_node("Constant", [], ["w3c"], name="const_w3", value=w))
    _node(m, "conv3").input[1] = "w3c"


def _pad_with_axes(m):
    _pads_input([1, 1, 1, 1])(m)
    m.graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    _node(m, "pad1").input.extend(["", "axes"])


VALID = {
    "zero output channels": (17, _zero_output_channels),
    "weights listed as graph inputs": (17, _weights_as_graph_inputs),
    "weight from a Constant node": (17, _weight_from_a_constant_node),
    "pad with axes": (18, _pad_with_axes),
    "conv without kernel_shape": (17, lambda m: _set_attr("conv3", "kernel_shape", None)(m)),
}


@pytest.mark.parametrize("case", sorted(VALID))
def test_unusual_but_valid_is_accepted(case):
    opset, edit = VALID[case]
    model = repvgg(opset=opset)
    edit(model)
    assert runs(model)
    validate.check_model(model)


def test_batchnorm_spatial_0_is_left_to_the_runtime():
    """Opset 7 BatchNormalization with spatial=0 has one value per channel and position."""
    b = Builder(opset=7)
    x = b.input([1, 4, 3, 3])
    y = b.node("BatchNormalization", [x] + [b.const(np.full((4, 3, 3), 0.5), k) for k in "sbmv"], spatial=0)
    model = b.model(y, ir_version=3)
    assert runs(model)
    validate.check_model(model)


# ---------------------------------------------------------------- the property

TARGETS = ["w1", "w2", "w3", "b1", "gamma1", "beta1", "mean1", "var1", "gamma3", "var3"]
ATTRIBUTES = ["kernel_shape", "strides", "dilations", "pads", "group"]


@st.composite
def mutations(draw):
    """One initializer of repvgg() reshaped, or one Conv attribute rewritten."""
    if draw(st.booleans()):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=5)))
        return "init", draw(st.sampled_from(TARGETS)), shape
    attr = draw(st.sampled_from(ATTRIBUTES))
    if attr == "group":
        value = draw(st.integers(-1, 5))
    else:
        value = draw(st.lists(st.integers(-1, 4), min_size=0, max_size=6))
    return "attr", draw(st.sampled_from(["conv1", "conv2", "conv3"])), (attr, value)


def _mutated(mutation) -> onnx.ModelProto:
    model = repvgg()
    kind, target, change = mutation
    if kind == "init":
        _set_init(target, change)(model)
    else:
        _set_attr(target, *change)(model)
    return model


@settings(max_examples=150, **SETTINGS)
@given(mutations())
def test_shape_mutants_refused_only_when_invalid_and_never_crash(mutation):
    """Refused at load ⇒ onnxruntime refuses too; accepted ⇒ fusing ends in a report or in a
    documented error (an input or verification error), never in an internal one."""
    model = _mutated(mutation)
    note(repr(mutation))
    try:
        validate.check_model(model)
    except InputError:
        event("refused at load")
        assert not runs(model), "refused a model onnxruntime runs"
        return
    try:
        fuse_with_report(model)
        event("fused or left")
    except (InputError, VerificationError) as exc:
        event(type(exc).__name__)


# ---------------------------------------------------------------- raw_data lengths read from the file

def _lengths_of(model: onnx.ModelProto):
    return [len(t.raw_data) if t.HasField("raw_data") else None for t in model.graph.initializer]


def test_raw_lengths_from_the_file_are_those_of_the_parsed_model(tmp_path):
    """io.load learns each initializer's raw_data length from the file's record headers (and the
    external data entries); they are the parsed model's, or unknown, never other ones."""
    from reparam_onnx import io
    model = repvgg()
    onnx.save(model, str(tmp_path / "plain.onnx"))
    onnx.save_model(repvgg(), str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    raw = model.SerializeToString()
    # the first initializer's record with a second raw_data record in it (protobuf keeps the last),
    # written last in the graph, the graph written last in the model
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    first = rest.graph.initializer[0].SerializeToString()
    del rest.graph.initializer[0]
    tensor = first + io._varint(io._RAW_DATA << 3 | 2) + io._varint(3) + b"abc"
    graph = rest.graph.SerializeToString() + io._varint(5 << 3 | 2) + io._varint(len(tensor)) + tensor
    rest.ClearField("graph")
    (tmp_path / "doubled.onnx").write_bytes(rest.SerializeToString() + io._varint(7 << 3 | 2) +
                                            io._varint(len(graph)) + graph)
    (tmp_path / "two_graphs.onnx").write_bytes(raw + io._varint(7 << 3 | 2) + io._varint(0))
    for name in ("plain.onnx", "ext.onnx", "doubled.onnx", "two_graphs.onnx"):
        loaded = io.load(tmp_path / name)[0]
        lengths = io.raw_lengths(loaded)
        expected = _lengths_of(loaded)
        assert lengths is None if name == "two_graphs.onnx" else lengths == expected, name
        assert io.raw_lengths(loaded) is None   # handed over once
    assert _lengths_of(io.load(tmp_path / "doubled.onnx")[0])[-1] == 3


@pytest.mark.parametrize("external", [False, True])
def test_raw_data_shorter_than_its_dims_is_refused_from_a_file(tmp_path, external):
    model = repvgg()
    tensor = next(t for t in model.graph.initializer if len(t.dims) == 4)
    tensor.raw_data = tensor.raw_data[:-4]
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=external, location="m.onnx.data", size_threshold=0)
    with pytest.raises(InputError, match="holds .* values or bytes"):
        fuse_with_report(str(path), verify=False)
