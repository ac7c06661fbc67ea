"""The streamed save: the model file is written part by part (each large tensor's bytes read
from the model when its turn comes) and is byte for byte what model.SerializeToString() (so
onnx.save) writes, on every model the project has and on hand-made ones with every kind of
field: external data, sparse initializers, subgraphs, metadata, IR < 4, tensors in node
attributes, fields this protobuf does not know, tensors whose dims disagree with their data."""
from __future__ import annotations

import io as pyio
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import FIXTURES, ROOT, SETTINGS, Builder, repvgg_block
from reparam_onnx import fuse, fuse_with_report, io
from reparam_onnx.api import to_save


def streamed(model: onnx.ModelProto, predicted: bool = True) -> bytes:
    """What save() writes; `predicted`: the parts' size is the bytes' (dims agree with the data)."""
    parts = io.serialized_parts(model)
    out = pyio.BytesIO()
    io.write_parts(model, parts, out)
    assert not predicted or io.parts_size(parts) == len(out.getvalue())
    return out.getvalue()


@pytest.fixture(params=["default", "every tensor"])
def stream_min(request, monkeypatch):
    """The default threshold, and every tensor with raw_data streamed (small models reach the
    streamed path too)."""
    if request.param == "every tensor":
        monkeypatch.setattr(io, "STREAM_MIN", 0)
    return request.param


def fixture_models():
    return sorted(FIXTURES.rglob("*.onnx"))


@pytest.mark.parametrize("path", fixture_models(), ids=lambda p: str(p.relative_to(FIXTURES)))
def test_fixture_models_and_their_fused_forms(path, stream_min):
    model = onnx.load(str(path))   # external data read in
    assert streamed(model) == model.SerializeToString()
    fused = fuse(model, verify=False, check_blocks=False)
    assert streamed(fused) == fused.SerializeToString()


def test_the_project_has_fixture_models():
    assert len(fixture_models()) > 20


def _repvgg(seed=0, channels=64) -> onnx.ModelProto:
    b = Builder(seed)
    x = b.input(["N", channels, 8, 8])
    y = repvgg_block(b, x, channels, channels)
    return b.model(b.node("Relu", [repvgg_block(b, y, channels, channels)]))


def _big(name, shape=(64, 64, 3, 3), seed=0) -> TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _unknown(message, number: int = 1000, payload: bytes = b"\x05") -> None:
    """Give `message` a field this protobuf does not know (a varint, field `number`)."""
    message.MergeFromString(io._varint(number << 3) + payload)


def _everything() -> onnx.ModelProto:
    """One model with every kind of field there is to stream around."""
    model = _repvgg()
    graph = model.graph
    graph.doc_string = "a graph"
    model.doc_string, model.producer_name, model.producer_version = "doc", "test", "1.0"
    model.domain, model.model_version = "ai.test", 7
    helper.set_model_props(model, {"author": "me", "license": "none"})
    graph.metadata_props.add(key="k", value="v")
    graph.initializer[0].doc_string = "a weight"
    graph.initializer[0].metadata_props.add(key="tensor", value="meta")
    # a Constant holding a large tensor, and one holding a small one
    graph.node.insert(0, helper.make_node("Constant", [], ["big_const"], value=_big("bc", seed=1)))
    graph.node.insert(0, helper.make_node("Constant", [], ["small_const"], value_float=1.5))
    graph.node.insert(0, helper.make_node("Constant", [], ["list"], value_floats=[1.0, 2.0]))
    # a tensor in float_data (no raw_data), a string tensor, an int64 tensor, an empty one
    graph.initializer.append(helper.make_tensor("floats", TensorProto.FLOAT, [20000],
                                                np.arange(20000, dtype=np.float32).tolist()))
    graph.initializer.append(helper.make_tensor("strings", TensorProto.STRING, [2], [b"a", b"b"]))
    graph.initializer.append(numpy_helper.from_array(np.arange(40000, dtype=np.int64), "ints"))
    graph.initializer.append(numpy_helper.from_array(np.zeros((0, 3), np.float32), "empty"))
    graph.initializer.append(numpy_helper.from_array(np.ones((300, 300), np.float16), "half"))
    graph.initializer.append(numpy_helper.from_array(np.ones((300, 300), np.float64), "double"))
    # sparse initializers, in the graph and in an attribute
    values = numpy_helper.from_array(np.arange(30000, dtype=np.float32), "sparse_values")
    indices = numpy_helper.from_array(np.arange(30000, dtype=np.int64), "sparse_indices")
    sparse = helper.make_sparse_tensor(values, indices, [40000])
    graph.sparse_initializer.append(sparse)
    graph.node.append(helper.make_node("Constant", [], ["sparse_const"], sparse_value=sparse))
    # a subgraph (If) with its own large initializer and a large Constant
    branch = helper.make_graph([helper.make_node("Constant", [], ["b_out"], value=_big("sub_c", seed=2))], "then", [],
                               [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, None)], [_big("sub_w", seed=3)])
    graph.node.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=branch, else_branch=branch))
    # an attribute with a list of tensors
    graph.node.append(helper.make_node("Custom", [], ["custom_out"], domain="test",
                                       tensors=[_big("t1", seed=4), _big("t2", (5,), seed=5)]))
    # a model-local function, training info
    model.functions.append(helper.make_function("test", "f", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                                [helper.make_opsetid("", 17)]))
    training = model.training_info.add()
    training.initialization.CopyFrom(helper.make_graph([], "init", [], [], [_big("train_w", seed=6)]))
    return model


def test_every_kind_of_field(stream_min):
    model = _everything()
    assert streamed(model) == model.SerializeToString()
    streamed_tensors = {p.tensor.name for p in io.serialized_parts(model) if not isinstance(p, bytes)}
    assert {"bc", model.graph.initializer[0].name} <= streamed_tensors   # a Constant's and an initializer's


@pytest.mark.parametrize("where", ["model", "graph", "initializer", "node", "attribute", "attribute tensor",
                                   "large initializer"])
def test_fields_this_protobuf_does_not_know(where, stream_min):
    """Unknown fields are written last; a message holding some is serialized whole."""
    model = _everything()
    target = {"model": model, "graph": model.graph, "initializer": model.graph.initializer[1],
              "node": model.graph.node[2], "attribute": model.graph.node[2].attribute[0],
              "attribute tensor": model.graph.node[2].attribute[0].t,
              "large initializer": max(model.graph.initializer, key=lambda t: len(t.raw_data))}[where]
    _unknown(target)
    assert streamed(model) == model.SerializeToString()


def test_ir3_initializers_as_graph_inputs(stream_min):
    model = _repvgg()
    model.ir_version = 3
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    assert streamed(model) == model.SerializeToString()


def test_model_with_external_data_entries(tmp_path, stream_min):
    """A model read without its external data, and the same model after io.load."""
    path = tmp_path / "m.onnx"
    onnx.save_model(_repvgg(), str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    head = onnx.load(str(path), load_external_data=False)
    assert streamed(head) == head.SerializeToString()
    loaded, _, files = io.load(path)
    assert files
    assert streamed(loaded) == loaded.SerializeToString()


@pytest.mark.parametrize("change", ["longer", "shorter", "undefined type", "dims say nothing"])
def test_tensor_whose_dims_disagree_with_its_data(change, monkeypatch):
    """A length predicted from dims that the data does not have: the whole model is then
    serialized in one piece (the file starts over), still the same bytes."""
    monkeypatch.setattr(io, "STREAM_MIN", 0)
    model = _repvgg()
    tensor = model.graph.initializer[0]
    if change == "longer":
        tensor.raw_data = tensor.raw_data + b"\0\0\0\0"
    elif change == "shorter":
        tensor.raw_data = tensor.raw_data[:-4]
    elif change == "undefined type":
        tensor.data_type = TensorProto.UNDEFINED
    else:
        del tensor.dims[:]
    assert streamed(model, predicted=change == "undefined type") == model.SerializeToString()


def _random_model(draw) -> onnx.ModelProto:
    """A model of random initializers (sizes around the streaming threshold, types, float_data or
    raw_data) and Constants, with random optional fields set."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    inits, nodes = [], []
    for i in range(draw(st.integers(0, 6))):
        dtype = draw(st.sampled_from([np.float32, np.float16, np.int64, np.uint8, np.float64]))
        size = draw(st.sampled_from([0, 1, 255, 16384, 16385, 70000]))
        array = rng.standard_normal(size).astype(dtype)
        if draw(st.booleans()):
            tensor = numpy_helper.from_array(array, f"w{i}")
        else:
            tensor = helper.make_tensor(f"w{i}", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [size],
                                        array.tolist())
        if draw(st.booleans()):
            tensor.doc_string = "d" * draw(st.integers(0, 200))
        if draw(st.booleans()):
            nodes.append(helper.make_node("Constant", [], [f"c{i}"], value=tensor))
        else:
            inits.append(tensor)
    graph = helper.make_graph(nodes, draw(st.sampled_from(["", "g"])), [], [], inits)
    if draw(st.booleans()):
        graph.doc_string = "graph doc"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", draw(st.integers(7, 21)))])
    model.ir_version = draw(st.integers(3, 10))
    if draw(st.booleans()):
        helper.set_model_props(model, {"a": "b"})
    if draw(st.booleans()):
        _unknown(model, draw(st.integers(30, 2000)))
    return model


@settings(max_examples=60, **SETTINGS)
@given(st.data(), st.sampled_from([0, 1024, 64 << 10]))
def test_random_models(data, threshold):
    old = io.STREAM_MIN
    io.STREAM_MIN = threshold
    try:
        model = _random_model(data.draw)
        assert streamed(model) == model.SerializeToString()
    finally:
        io.STREAM_MIN = old


# ---------------------------------------------------------------- io.save

def test_save_writes_what_onnx_save_writes(tmp_path, stream_min):
    model = _everything()
    io.save(model, tmp_path / "ours.onnx")
    onnx.save(model, str(tmp_path / "theirs.onnx"))
    assert (tmp_path / "ours.onnx").read_bytes() == (tmp_path / "theirs.onnx").read_bytes()


def test_save_of_a_fused_model_is_its_serialization(tmp_path):
    fused = fuse(_repvgg(channels=128), verify=False)
    io.save(fused, tmp_path / "f.onnx")
    assert (tmp_path / "f.onnx").read_bytes() == fused.SerializeToString()


def test_external_save_streams_the_data_and_writes_the_small_model(tmp_path):
    model = _repvgg()
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    io.save(model, tmp_path / "m.onnx", external=True)
    head = (tmp_path / "m.onnx").read_bytes()
    assert len(head) < 20000
    assert head == onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).SerializeToString()
    again = onnx.load(str(tmp_path / "m.onnx"))
    for a, b in zip(again.graph.initializer, expected.graph.initializer):
        assert numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()


def test_a_model_past_the_protobuf_limit_goes_to_external_data(tmp_path, monkeypatch):
    """The choice is made from the streamed parts' size (no serialization of the whole model)."""
    model = _repvgg()
    size = len(model.SerializeToString())
    monkeypatch.setattr(io, "TWO_GIB", size)
    io.save(model, tmp_path / "at.onnx")
    assert (tmp_path / "at.onnx.data").exists()
    monkeypatch.setattr(io, "TWO_GIB", size + 1)
    io.save(model, tmp_path / "below.onnx")
    assert not (tmp_path / "below.onnx.data").exists()
    assert (tmp_path / "below.onnx").read_bytes() == model.SerializeToString()


MEMORY = textwrap.dedent("""
    import resource, sys
    import numpy as np, onnx
    from onnx import helper, numpy_helper
    from reparam_onnx import io
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(1 << 20).astype(np.float32), f"w{i}") for i in range(24)]
    model = helper.make_model(helper.make_graph([], "g", [], [], inits))
    del inits
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    io.save(model, sys.argv[1])
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")


def test_save_holds_no_second_copy_of_the_model(tmp_path):
    """A 96 MB model of 4 MB tensors is saved with a few MB more at the peak, not 96."""
    out = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path / "m.onnx")], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120)
    grown = int(out.stdout)
    assert grown < 24, f"saving a 96 MB model raised the peak RSS by {grown} MB"
    assert (tmp_path / "m.onnx").stat().st_size > 96 << 20


# ---------------------------------------------------------------- parses of a run

@pytest.mark.parametrize("existing", ["none", "inline", "external"])
def test_a_run_parses_the_input_once_and_an_inline_output_it_replaces_never(existing, tmp_path, monkeypatch, capfd):
    """The file checks' parse of the input is the one load() uses, whatever else is looked at;
    an output being replaced is parsed only when it has external-data entries to find."""
    from conftest import invoke
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(_repvgg(), str(src))
    if existing == "inline":
        onnx.save(_repvgg(seed=1), str(out))
    elif existing == "external":
        onnx.save_model(_repvgg(seed=1), str(out), save_as_external_data=True, location="f.onnx.data",
                        size_threshold=0)
    parsed = []
    real = io._read_model   # every parse of a model file goes through it

    def counting(path, *args, **kwargs):
        parsed.append(Path(path).name)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(io, "_read_model", counting)
    assert invoke([src, "-o", out, "-q", "--no-verify"]) == 0
    assert capfd.readouterr().err == ""
    assert parsed.count("m.onnx") == 1
    if existing == "external":   # its data file is one the run may replace: it is looked up
        assert "f.onnx" in parsed
    else:
        assert "f.onnx" not in parsed


def test_replaced_locations_of_files_that_are_not_models(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 100)
    (tmp_path / "named.onnx").write_bytes(b"\xff" + io._LOCATION + b"\xff")   # the bytes, not a model
    for name in ("empty.onnx", "junk.onnx", "named.onnx", "missing.onnx"):
        assert io._replaced_locations(tmp_path / name) == []


def test_a_model_file_is_parsed_as_onnx_load_parses_it(tmp_path):
    """_read_model parses a binary model from a map of the file: the model onnx.load gives, text
    formats by extension as onnx.load reads them, and what onnx.load refuses refused."""
    from google.protobuf.message import DecodeError
    model = _repvgg()
    for name in ("m.onnx", "m.pb", "m.bin"):
        onnx.save(model, str(tmp_path / name))
        assert io._read_model(tmp_path / name) == onnx.load(str(tmp_path / name), load_external_data=False)
    onnx.save(model, str(tmp_path / "m.textproto"), format="textproto")
    assert io._read_model(tmp_path / "m.textproto") == model
    whole = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 100)
    for name in ("cut.onnx", "junk.onnx"):
        with pytest.raises((DecodeError, RuntimeError, ValueError)):
            onnx.load(str(tmp_path / name), load_external_data=False)
        with pytest.raises((DecodeError, RuntimeError, ValueError)):
            io._read_model(tmp_path / name)


# ---------------------------------------------------------------- fused weights kept apart (pending stubs)

def _two_blocks_and_a_transpose_pair(channels=64) -> onnx.ModelProto:
    """Large fused weights (64 KiB and more), a small one, and a second pass (a Conv→BN chain
    after the block) that reads a fused weight again."""
    b = Builder(3)
    x = b.input(["N", channels, 8, 8])
    y = repvgg_block(b, x, channels, channels)
    z = b.bn(b.conv(b.node("Relu", [y]), channels, 4, (3, 3), pads=(1, 1, 1, 1)), 4)
    return b.model(b.node("Relu", [z]))


def fuse_to_save(model, **options):
    with to_save():
        return fuse_with_report(model, **options)


@pytest.mark.parametrize("channels", [8, 64, 128])
def test_kept_apart_is_the_model_it_stands_for(tmp_path, channels):
    """fuse_with_report within to_save(): stubs in the model, and io.save writes the file of the
    complete model (inline, external, and past the size limit), which materialize() makes."""
    model = _two_blocks_and_a_transpose_pair(channels)
    whole = fuse_with_report(model, verify=False).model
    expected = whole.SerializeToString()   # (an external save moves the data out of `whole`)
    apart = fuse_to_save(model, verify=False)
    assert (len(apart.arrays) > 0) is (channels >= 64)
    assert all(io.pending(t, apart.arrays) for t in apart.model.graph.initializer if t.name in apart.arrays)
    io.save(apart.model, tmp_path / "apart.onnx", arrays=apart.arrays)
    assert (tmp_path / "apart.onnx").read_bytes() == expected
    (tmp_path / "whole").mkdir()
    (tmp_path / "apart").mkdir()
    io.save(whole, tmp_path / "whole" / "m.onnx", external=True)
    io.save(apart.model, tmp_path / "apart" / "m.onnx", external=True, arrays=apart.arrays)
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "apart" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    again = fuse_to_save(model, verify=False)
    io.materialize(again.model, again.arrays)
    assert again.model.SerializeToString() == expected


def test_kept_apart_through_the_mismatch_fallback(tmp_path, monkeypatch):
    """write_parts' whole-model fallback writes the complete model, stubs materialized."""
    model = _two_blocks_and_a_transpose_pair()
    whole = fuse_with_report(model, verify=False).model
    apart = fuse_to_save(model, verify=False)
    parts = io.serialized_parts(apart.model, apart.arrays)
    first = next(p for p in parts if not isinstance(p, bytes))
    first.length += 1   # a mispredicted length
    with open(tmp_path / "f.onnx", "wb") as handle:
        io.write_parts(apart.model, parts, handle, arrays=apart.arrays)
    assert (tmp_path / "f.onnx").read_bytes() == whole.SerializeToString()


@pytest.mark.parametrize("verify", [False, True])
def test_the_command_writes_the_model_the_library_returns(tmp_path, verify):
    """The command keeps large fused weights apart and verifies the model with them; its file is
    the library's fused model, byte for byte."""
    from conftest import invoke
    model = _two_blocks_and_a_transpose_pair()
    onnx.save(model, str(tmp_path / "m.onnx"))
    args = [tmp_path / "m.onnx", "-o", tmp_path / "f.onnx", "-q"] + ([] if verify else ["--no-verify"])
    assert invoke(args) == 0
    expected = fuse_with_report(str(tmp_path / "m.onnx"), verify=verify).model
    assert (tmp_path / "f.onnx").read_bytes() == expected.SerializeToString()


def test_a_later_pass_takes_a_pending_weight_into_a_larger_block(tmp_path):
    """RepVGG then a per-channel Mul, the generic rule off: the sum fuses in the first pass (its
    weight kept apart), the next pass folds the Mul into that Conv, reading the pending weight;
    the replaced stub's array goes, and the file is the library's model."""
    channels = 64
    b = Builder(2)
    x = b.input(["N", channels, 8, 8])
    scale = b.const(np.random.default_rng(0).uniform(.5, 2, (1, channels, 1, 1)))
    model = b.model(b.node("Relu", [b.node("Mul", [repvgg_block(b, x, channels, channels), scale])]))
    whole = fuse_with_report(model, disable_rules=["generic"])
    apart = fuse_to_save(model, disable_rules=["generic"])
    assert [r.absorbed for r in apart.report.fused] == [r.absorbed for r in whole.report.fused] != [[]]
    assert apart.report.verification.passed and apart.report.verification.ran
    stubs = [t.name for t in apart.model.graph.initializer if io.pending(t, apart.arrays)]
    assert stubs == list(apart.arrays) and len(stubs) == 1
    io.save(apart.model, tmp_path / "f.onnx", arrays=apart.arrays)
    assert (tmp_path / "f.onnx").read_bytes() == whole.model.SerializeToString()
