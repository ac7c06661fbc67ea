"""What fusing keeps: model and graph properties, value_info of surviving tensors,
byte-identical results (nothing to fuse, idempotence, determinism across hash seeds),
external data, and the caller's ModelProto."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from conftest import (SETTINGS, Builder, assert_equivalent, assert_untouched, fuse_and_check, invoke, op_counts,
                      repvgg_block)

from reparam_onnx import fuse, fuse_with_report

SHAPE = ["N", 4, 8, 8]


def repvgg_model(seed: int = 0, opset: int = 17, ir_version=None) -> onnx.ModelProto:
    """x → RepVGG block → Relu → 1×1 Conv (no BN: not a block) → Relu."""
    b = Builder(seed, opset=opset)
    x = b.input(SHAPE)
    r = b.node("Relu", [repvgg_block(b, x, 4, 4)])
    z = b.node("Relu", [b.conv(r, 4, 4, (1, 1))])
    b.output(z, SHAPE)
    return b.model(ir_version=ir_version)


def two_block_model(seed: int = 1) -> onnx.ModelProto:
    b = Builder(seed)
    x = b.input(SHAPE)
    r = b.node("Relu", [repvgg_block(b, x, 4, 4)])
    r = b.node("Relu", [repvgg_block(b, r, 4, 8, stride=2)])
    b.output(r, ["N", 8, 4, 4])
    return b.model()


def decorated_model() -> onnx.ModelProto:
    """IR 7, an unused custom opset, metadata, doc strings, producer, value_info."""
    m = repvgg_model(opset=13, ir_version=7)
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    helper.set_model_props(m, {"author": "tests", "license": "none", "zz": "last"})
    m.doc_string = "model doc"
    m.graph.doc_string = "graph doc"
    m.graph.node[-1].doc_string = "last relu doc"           # survives
    m.graph.node[0].doc_string = "first conv doc"           # inside the block: removed
    m.producer_name, m.producer_version = "test-producer", "1.2.3"
    m.model_version = 42
    m.domain = "org.example.tests"
    m.graph.value_info.extend([
        helper.make_tensor_value_info("relu1_out", TensorProto.FLOAT, SHAPE),               # survives
        helper.make_tensor_value_info("add2_out", TensorProto.FLOAT, SHAPE),                # block output: kept
        helper.make_tensor_value_info("conv1_out", TensorProto.FLOAT, SHAPE),               # removed
        helper.make_tensor_value_info("batchnormalization3_out", TensorProto.FLOAT, SHAPE),  # removed
    ])
    onnx.checker.check_model(m)
    return m


def tensor_names(graph: onnx.GraphProto) -> set:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    return names


# ---------------------------------------------------------------- properties

def test_properties_are_kept():
    m = decorated_model()
    result = fuse_and_check(m, ops={"Conv": 2, "BatchNormalization": 0, "Add": 0, "Relu": 2})
    f = result.model
    onnx.checker.check_model(f, full_check=True)
    assert f.ir_version == 7
    assert [(o.domain, o.version) for o in f.opset_import] == [("", 13), ("com.example", 1)]
    assert [(p.key, p.value) for p in f.metadata_props] == [("author", "tests"), ("license", "none"),
                                                             ("zz", "last")]
    assert f.doc_string == "model doc"
    assert f.graph.doc_string == "graph doc"
    assert f.graph.name == m.graph.name
    assert f.producer_name == "test-producer" and f.producer_version == "1.2.3"
    assert f.model_version == 42
    assert f.domain == "org.example.tests"
    last = [n for n in f.graph.node if n.name == m.graph.node[-1].name]
    assert len(last) == 1 and last[0].doc_string == "last relu doc"
    assert "first conv doc" not in {n.doc_string for n in f.graph.node}
    assert [i.name for i in f.graph.input] == ["x"]
    assert list(f.graph.output) == list(m.graph.output)


def test_value_info_of_surviving_tensors_only():
    f = fuse(decorated_model())
    infos = {v.name: v for v in f.graph.value_info}
    assert "relu1_out" in infos and "add2_out" in infos
    assert "conv1_out" not in infos and "batchnormalization3_out" not in infos
    original = {v.name: v for v in decorated_model().graph.value_info}
    assert infos["relu1_out"] == original["relu1_out"]
    live = tensor_names(f.graph)
    assert all(name in live for name in infos), "value_info of a tensor that is gone"


def test_dead_weights_are_removed():
    m = repvgg_model()
    f = fuse(m)
    used = {name for n in f.graph.node for name in n.input}
    assert {t.name for t in f.graph.initializer} <= used
    assert f.ByteSize() < m.ByteSize()


def aliased_bias_model(case: str) -> onnx.ModelProto:
    """Conv(bias b) → BN, fused; a second Conv (not a block) reads b through an Identity, as
    TorchScript aliases equal weights (one zero bias, Identity copies for the others)."""
    b = Builder(5)
    x = b.input(SHAPE)
    bias = b.const(np.zeros(4), "b")
    fused = b.bn(b.node("Conv", [x, b.const(b.rng.normal(0, 0.5, (4, 4, 3, 3))), bias], kernel_shape=[3, 3],
                        pads=[1, 1, 1, 1]), 4)
    alias = b.node("Identity", [bias])
    relu = b.node("Relu", [fused])

    def pointwise(bias_name: str) -> str:
        return b.node("Conv", [relu, b.const(b.rng.normal(0, 0.5, (4, 4, 1, 1))), bias_name], kernel_shape=[1, 1])

    outputs = [pointwise(alias)]
    if case == "alias_is_an_output":
        b.output(alias, [4])
    elif case == "read_by_another_node":
        outputs.append(pointwise(bias))
    elif case == "two_aliases":
        outputs.append(pointwise(b.node("Identity", [bias])))
    return b.model(*outputs)


def test_an_alias_left_alone_by_the_fusion_takes_the_weight_name():
    """Once the fused Conv that read b is gone, b is read only through its alias: b takes the
    alias' name and the Identity goes (what exporting the deploy form writes)."""
    for case, left in (("one_alias", 0), ("two_aliases", 1)):
        m = aliased_bias_model(case)
        f = fuse_and_check(m).model
        assert op_counts(f).get("Identity", 0) == left, case
        assert "identity1_out" in {t.name for t in f.graph.initializer}
        assert all(n.input[0] == "identity1_out" for n in f.graph.node if n.op_type == "Identity")


@pytest.mark.parametrize("case", ["alias_is_an_output", "read_by_another_node"])
def test_an_alias_still_needed_stays(case):
    m = aliased_bias_model(case)
    f = fuse_and_check(m).model
    assert op_counts(f)["Identity"] == 1
    assert "b1" in {t.name for t in f.graph.initializer}


def test_an_alias_of_a_weight_no_fused_node_read_stays():
    """b aliased, but the fused block never read b itself: that part of the graph is not the
    fusion's to tidy."""
    b = Builder(6)
    x = b.input(SHAPE)
    bias = b.const(np.zeros(4), "b")
    y = b.bn(b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1)), 4)
    z = b.node("Conv", [b.node("Relu", [y]), b.const(b.rng.normal(0, 0.5, (4, 4, 1, 1))),
                        b.node("Identity", [bias])], kernel_shape=[1, 1])
    f = fuse_and_check(b.model(z)).model
    assert op_counts(f)["Identity"] == 1


# ---------------------------------------------------------------- byte-identical results

def nothing_to_fuse() -> onnx.ModelProto:
    b = Builder(4)
    x = b.input(SHAPE)
    r = b.node("Relu", [b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1))])
    s = b.add(b.node("Relu", [b.conv(r, 4, 4, (1, 1))]), r)    # a sum, but through a Relu: not linear
    b.output(s, SHAPE)
    m = b.model()
    m.doc_string = "keep me"
    helper.set_model_props(m, {"a": "b"})
    return m


def test_nothing_to_fuse_is_byte_identical():
    m = nothing_to_fuse()
    result = fuse_with_report(m)
    assert not result.report.fused
    assert result.model.SerializeToString() == m.SerializeToString()


@pytest.mark.parametrize("make", [repvgg_model, two_block_model, decorated_model])
def test_idempotent(make):
    once = fuse(make())
    twice = fuse_with_report(once)
    assert not twice.report.fused
    assert not [b for b in twice.report.blocks if b.fusable]
    assert twice.model.SerializeToString() == once.SerializeToString()


@pytest.mark.parametrize("make", [repvgg_model, two_block_model, decorated_model])
def test_deterministic_in_process(make):
    assert fuse(make()).SerializeToString() == fuse(make()).SerializeToString()


def test_input_proto_not_modified():
    m = decorated_model()
    before = m.SerializeToString()
    copy = onnx.ModelProto()
    copy.CopyFrom(m)
    result = fuse_with_report(m)
    assert result.report.fused
    assert m.SerializeToString() == before
    assert m == copy
    assert result.model is not m


def test_deterministic_across_hash_seeds(tmp_path):
    src = tmp_path / "two.onnx"
    onnx.save_model(two_block_model(), str(src))
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"out{hash_seed}.onnx"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        proc = subprocess.run([sys.executable, "-m", "reparam_onnx.cli", str(src), "-o", str(out), "-q"],
                              env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


# ---------------------------------------------------------------- external data

def _folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_external_data(tmp_path, monkeypatch, capfd):
    src_dir, out_dir, elsewhere = tmp_path / "src", tmp_path / "out", tmp_path / "cwd"
    for d in (src_dir, out_dir, elsewhere):
        d.mkdir()
    onnx.save_model(two_block_model(), str(src_dir / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    before = _folder_bytes(src_dir)
    assert set(before) == {"m.onnx", "m.onnx.data"}
    monkeypatch.chdir(elsewhere)           # relative locations resolve against the model, not the cwd
    out = out_dir / "fused.onnx"
    assert invoke([src_dir / "m.onnx", "-o", out, "-q"]) == 0
    assert capfd.readouterr().err == ""
    assert _folder_bytes(src_dir) == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["fused.onnx", "fused.onnx.data"]
    assert list(elsewhere.iterdir()) == []
    head = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in head.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"fused.onnx.data"}
    fused = onnx.load(str(out))
    onnx.checker.check_model(fused)
    assert sum(n.op_type == "BatchNormalization" for n in fused.graph.node) == 0
    assert_equivalent(two_block_model(), fused)


def test_external_data_input_missing_data_file(tmp_path, capfd):
    onnx.save_model(repvgg_model(), str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    (tmp_path / "m.onnx.data").unlink()
    out = tmp_path / "out"
    out.mkdir()
    assert invoke([tmp_path / "m.onnx", "-o", out / "f.onnx"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "m.onnx.data" in err[0] and "missing" in err[0]
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- initializers listed as graph inputs

def weights_as_inputs() -> onnx.ModelProto:
    """IR 3 style: every initializer is also a graph input."""
    m = repvgg_model()
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(m)
    return m


def test_graph_input_weights_are_not_constants_by_default():
    result = assert_untouched(weights_as_inputs(), "graph input")
    assert not result.report.notes


def test_graph_input_weights_fused_when_asked():
    m = weights_as_inputs()
    result = fuse_and_check(m, initializers_as_constants=True, ops={"BatchNormalization": 0, "Add": 0})
    assert [b.rule for b in result.report.fused] == ["repvgg"]
    assert any("graph inputs" in note for note in result.report.notes)
    onnx.checker.check_model(result.model)


def test_graph_input_weights_cli(tmp_path, capfd):
    src = tmp_path / "m.onnx"
    onnx.save_model(weights_as_inputs(), str(src))
    report = tmp_path / "r.json"
    assert invoke([src, "-o", tmp_path / "a.onnx", "--report", report, "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["summary"]["fused"] == 0
    assert any("graph input" in (b["reason"] or "") for b in data["blocks"])
    assert not data["notes"]
    assert (tmp_path / "a.onnx").read_bytes() == src.read_bytes()

    assert invoke([src, "-o", tmp_path / "b.onnx", "--initializers-as-constants", "--report", report]) == 0
    out = capfd.readouterr().out
    assert "note:" in out
    data = json.loads(report.read_text())
    assert data["summary"]["per_rule"] == {"repvgg": 1}
    assert any("initializers-as-constants" in note for note in data["notes"])
    assert_equivalent(onnx.load(str(src)), onnx.load(str(tmp_path / "b.onnx")))


def test_output_data_file_does_not_clobber_input_data(tmp_path):
    onnx.save_model(two_block_model(), str(tmp_path / "a.onnx"), save_as_external_data=True,
                    location="b.onnx.data", size_threshold=0)
    before = _folder_bytes(tmp_path)
    code = invoke([tmp_path / "a.onnx", "-o", tmp_path / "b.onnx", "-q"])
    assert {k: v for k, v in _folder_bytes(tmp_path).items() if k in before} == before
    assert code == 0
    # '<output>.data' is the input's: the output's data takes the next free derived name
    assert (tmp_path / "b.onnx.1.data").is_file()
    assert_equivalent(onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx")))


def test_output_data_never_overwrites_an_unrelated_file(tmp_path):
    onnx.save_model(two_block_model(), str(tmp_path / "a.onnx"), save_as_external_data=True,
                    location="a.onnx.data", size_threshold=0)
    (tmp_path / "b.onnx.data").write_bytes(b"somebody else's file")
    assert invoke([tmp_path / "a.onnx", "-o", tmp_path / "b.onnx", "-q"]) == 0
    assert (tmp_path / "b.onnx.data").read_bytes() == b"somebody else's file"
    locations = {e.value for t in onnx.load(str(tmp_path / "b.onnx"), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"b.onnx.1.data"}
    # the output's own data file is replaced when the output is written again
    assert invoke([tmp_path / "a.onnx", "-o", tmp_path / "b.onnx", "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.onnx.data", "b.onnx", "b.onnx.1.data",
                                                         "b.onnx.data"]


# ---------------------------------------------------------------- the report matches the result

def new_convs(original: onnx.ModelProto, fused: onnx.ModelProto) -> list:
    """The Conv nodes of `fused` that `original` does not have: the fused blocks."""
    before = {n.name for n in original.graph.node}
    return [n.name for n in fused.graph.node if n.op_type == "Conv" and n.name not in before]


def unread_initializers(model: onnx.ModelProto) -> list:
    live = {o.name for o in model.graph.output}
    for n in model.graph.node:
        live.update(n.input)
    return [t.name for t in model.graph.initializer if t.name not in live]


def assert_report_matches(model: onnx.ModelProto, result) -> None:
    """One reported fused block per fused Conv; each original node in at most one fused block;
    no initializer left that nothing reads (the inputs have none)."""
    fused = result.report.fused
    assert len(fused) == len(new_convs(model, result.model)), (fused, new_convs(model, result.model))
    names = [name for b in fused for name in b.nodes]
    assert len(names) == len(set(names)), names
    assert set(names) <= {n.name for n in model.graph.node}
    assert not {o for b in fused for o in [b.output]} - {o for n in model.graph.node for o in n.output}
    assert unread_initializers(result.model) == []


def block_then_post_op() -> onnx.ModelProto:
    """RepVGG then a per-channel Mul: without the generic rule no rule takes both, so the sum
    fuses first; the next pass folds the Mul into that Conv (a Conv→affine chain)."""
    b = Builder(2)
    x = b.input(SHAPE)
    y = b.node("Mul", [repvgg_block(b, x, 4, 4), b.const(np.random.default_rng(0).uniform(.5, 2, (1, 4, 1, 1)))])
    return b.model(b.node("Relu", [y]))


def test_block_taken_into_a_larger_one_is_reported_once():
    model = block_then_post_op()
    result = fuse_and_check(model, {"Conv": 1, "Add": 0, "Mul": 0, "BatchNormalization": 0}, disable_rules=["generic"])
    (block,) = result.report.fused
    assert block.output == "mul1_out" and block.rule == "conv_bn"
    assert block.absorbed == [{"rule": "repvgg", "output": "add2_out"}]
    assert sorted(block.nodes) == sorted(n.name for n in model.graph.node if n.op_type != "Relu")
    assert result.report.to_text().startswith("fused 1 block(s): 1 conv_bn")
    assert "taking in [repvgg] add2_out" in result.report.to_text(verbose=True)
    assert_report_matches(model, result)


def test_generic_rule_takes_block_and_post_op_at_once():
    model = block_then_post_op()
    result = fuse_and_check(model, {"Conv": 1, "Add": 0, "Mul": 0, "BatchNormalization": 0})
    (block,) = result.report.fused
    assert (block.output, block.rule, block.absorbed) == ("mul1_out", "generic", [])
    assert_report_matches(model, result)


def nhwc_block_then_spatial_mul() -> onnx.ModelProto:
    """An NHWC block, a Relu, a Mul by a spatially varying constant, back to NCHW: the pair of
    Transposes around the Relu and Mul cancels, the constant is transposed, and the original
    constant is read by nothing any more."""
    from test_layouts import TO_NCHW, nhwc_block
    b = Builder(seed=5)
    x = b.input([1, 9, 9, 4])
    h = b.node("Mul", [b.node("Relu", [nhwc_block(b, x, 4, 4)]),
                       b.const(np.random.default_rng(0).uniform(.5, 2, (1, 9, 9, 4)))])
    h = b.node("Transpose", [h], perm=TO_NCHW)
    return b.model(b.node("Relu", [b.conv(h, 4, 4, (1, 1))]))


def test_cancelled_transposes_leave_no_unread_initializer():
    model = nhwc_block_then_spatial_mul()
    result = fuse_and_check(model)
    assert any("Transposes" in note for note in result.report.notes)
    assert_report_matches(model, result)


# the segments of a random multi-block model: channels 4 in and out, NCHW in and out
def _seg_repvgg(b, h):
    return b.node("Relu", [repvgg_block(b, h, 4, 4)])


def _seg_repvgg_mul(b, h):
    return b.node("Mul", [repvgg_block(b, h, 4, 4), b.const(b.rng.uniform(.5, 2, (1, 4, 1, 1)))])


def _seg_repvgg_bn(b, h):
    return b.bn(repvgg_block(b, h, 4, 4), 4)


def _seg_conv_bn(b, h):
    return b.bn(b.conv(h, 4, 4, (3, 3), pads=(1,) * 4), 4)


def _seg_conv_bn_mul(b, h):
    return b.node("Mul", [_seg_conv_bn(b, h), b.const(b.rng.uniform(.5, 2, (1, 4, 1, 1)))])


def _seg_nested_sum(b, h):
    """Add(Add(3×3-BN, 1×1-BN), Add(BN, 1×1-BN)): one bag of four terms."""
    inner = b.add(_seg_conv_bn(b, h), b.bn(b.conv(h, 4, 4, (1, 1)), 4))
    return b.add(inner, b.add(b.bn(h, 4), b.bn(b.conv(h, 4, 4, (1, 1)), 4)))


def _seg_chain_into_sum(b, h):
    """Conv→BN, then a RepVGG block on its output."""
    return repvgg_block(b, _seg_conv_bn(b, h), 4, 4)


def _seg_sequential_branch(b, h):
    """A branch of two Conv→BN in a row beside a 1×1 Conv→BN: the sum is not one conv."""
    two = _seg_conv_bn(b, _seg_conv_bn(b, h))
    return b.add(two, b.bn(b.conv(h, 4, 4, (1, 1)), 4))


def _seg_nhwc(b, h):
    from test_layouts import TO_NCHW, TO_NHWC, nhwc_block
    t = b.node("Transpose", [h], perm=TO_NHWC)
    return b.node("Transpose", [b.node("Relu", [nhwc_block(b, t, 4, 4)])], perm=TO_NCHW)


SEGMENTS = {f.__name__[5:]: f for f in (_seg_repvgg, _seg_repvgg_mul, _seg_repvgg_bn, _seg_conv_bn, _seg_conv_bn_mul,
                                        _seg_nested_sum, _seg_chain_into_sum, _seg_sequential_branch, _seg_nhwc)}


def stacked(names, seed=0) -> onnx.ModelProto:
    b = Builder(seed)
    h = b.input([1, 4, 7, 6])
    for name in names:
        h = SEGMENTS[name](b, h)
    return b.model(h)


@pytest.mark.parametrize("names", [["repvgg_mul", "repvgg_bn"], ["chain_into_sum", "nested_sum"],
                                   ["nhwc", "nhwc", "conv_bn_mul"], ["sequential_branch", "repvgg"]],
                         ids="+".join)
def test_report_matches_the_result(names):
    model = stacked(names)
    assert_report_matches(model, fuse_and_check(model))


@settings(max_examples=60, **SETTINGS)
@given(st.lists(st.sampled_from(sorted(SEGMENTS)), min_size=1, max_size=4), st.booleans())
def test_report_matches_the_result_property(permissive_rules, names, permissive):
    """Any stack of blocks, nested sums, chains and NHWC blocks: count(reported fused) equals
    the number of Convs the fusion made, and no initializer is left unread."""
    model = stacked(names)
    rules = dict(rules=[permissive_rules], builtin_rules=False) if permissive else {}
    assert_report_matches(model, fuse_and_check(model, **rules))


# ---------------------------------------------------------------- IR < 4

def ir3_model() -> onnx.ModelProto:
    """IR 3, every initializer a graph input: an NHWC block whose Transposes cancel around a
    spatial Mul (whose constant is transposed), then a RepVGG block."""
    from test_layouts import TO_NCHW, nhwc_block
    b = Builder(seed=5, opset=8)
    x = b.input([1, 9, 9, 4])
    h = b.node("Mul", [b.node("Relu", [nhwc_block(b, x, 4, 4)]),
                       b.const(np.random.default_rng(0).uniform(.5, 2, (1, 9, 9, 4)))])
    h = b.node("Relu", [repvgg_block(b, b.node("Transpose", [h], perm=TO_NCHW), 4, 4)])
    b.output(h, [1, 4, 9, 9])
    m = b.model(ir_version=3)
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_ir3_initializers_as_constants_passes_the_checker():
    """IR < 4 requires every initializer to be a graph input: the new weights, biases and
    transposed constants are listed, with their types and shapes; dropped ones go with their entries."""
    m = ir3_model()
    result = fuse_and_check(m, initializers_as_constants=True, ops={"Conv": 2, "BatchNormalization": 0})
    assert any("Transposes" in note for note in result.report.notes)
    f = result.model
    assert f.ir_version == 3
    onnx.checker.check_model(f, full_check=True)
    inputs = {i.name: i for i in f.graph.input}
    for t in f.graph.initializer:
        info = inputs.pop(t.name).type.tensor_type
        assert info.elem_type == t.data_type and [d.dim_value for d in info.shape.dim] == list(t.dims)
    assert list(inputs) == ["x"]
    assert_report_matches(m, result)
