"""Bad input, bad destinations, hostile external data: one line, a documented exit code, the
input untouched, nothing left behind. (Malformed files of every kind: see test_cli and test_fuzz.)"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import Builder, assert_equivalent, invoke, leftovers, one_error_line, repvgg_block
from reparam_onnx import io


def repvgg(seed=0) -> onnx.ModelProto:
    b = Builder(seed)
    x = b.input(["N", 4, 9, 7])
    return b.model(b.node("Relu", [repvgg_block(b, x, 4, 4)]))


def _undefined(m):
    m.graph.node[0].input[0] = "nowhere"


def _cycle(m):
    m.graph.node[0].input[0] = m.graph.node[-1].output[0]


def _opset(version):
    def change(m):
        m.opset_import[0].version = version
    return change


def _no_default_opset(m):
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("com.example", 1))


def _unknown_op(m):
    m.graph.node[-1].op_type = "NoSuchOp"


BROKEN = {
    "undefined tensor": (_undefined, "'nowhere'"),
    "cycle": (_cycle, "cycle"),
    "future opset": (_opset(99), "opset 99"),
    "no default opset": (_no_default_opset, "no opset import"),
    "unknown op": (_unknown_op, "NoSuchOp"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_graph(kind, tmp_path, capfd):
    model = repvgg()
    change, words = BROKEN[kind]
    change(model)
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    before = src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    assert invoke([src, "-o", out / "f.onnx"]) in (2, 3)
    line = one_error_line(capfd.readouterr().err)
    assert words in line
    assert src.read_bytes() == before and leftovers(out) == []


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "No space left"), (errno.EACCES, "Permission denied")])
def test_write_failure_leaves_nothing(code, words, tmp_path, monkeypatch, capfd):
    """A full or read-only destination (simulated: CI runs as root) fails cleanly, without partial files."""
    src = tmp_path / "m.onnx"
    onnx.save_model(repvgg(), str(src))
    out = tmp_path / "out"
    out.mkdir()
    real = os.fsync

    def failing(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "fsync", failing)
    assert invoke([src, "-o", out / "f.onnx"]) == 2
    monkeypatch.setattr(os, "fsync", real)
    line = one_error_line(capfd.readouterr().err)
    assert "f.onnx" in line and words in line
    assert leftovers(out) == []


def test_cannot_create_temp_file(tmp_path, monkeypatch, capfd):
    src = tmp_path / "m.onnx"
    onnx.save_model(repvgg(), str(src))
    out = tmp_path / "out"
    out.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    assert invoke([src, "-o", out / "f.onnx"]) == 2
    assert "Permission denied" in one_error_line(capfd.readouterr().err)
    assert leftovers(out) == []


def test_output_folder_is_not_created(tmp_path, capfd):
    """Documented choice: a missing output folder is an error (a typo should not create folders)."""
    src = tmp_path / "m.onnx"
    onnx.save_model(repvgg(), str(src))
    assert invoke([src, "-o", tmp_path / "no" / "such" / "f.onnx"]) == 2
    assert "does not exist" in one_error_line(capfd.readouterr().err)
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------- --in-place


def test_in_place(tmp_path):
    src = tmp_path / "m.onnx"
    model = repvgg()
    onnx.save_model(model, str(src))
    assert invoke([src, "--in-place", "-q"]) == 0
    fused = onnx.load(str(src))
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Relu"]
    assert_equivalent(model, fused)
    assert leftovers(tmp_path) == ["m.onnx"]


def test_in_place_with_external_data_rewrites_the_pair(tmp_path):
    """The input's data file is still referenced while the new pair is written: the new data
    goes under a fresh name, the model is replaced, then the old data file is removed."""
    src = tmp_path / "m.onnx"
    model = repvgg()
    onnx.save_model(repvgg(), str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert invoke([src, "--in-place", "-q"]) == 0
    fused = onnx.load(str(src))
    assert_equivalent(model, fused)
    assert leftovers(tmp_path) == ["m.onnx", "m.onnx.1.data"]
    assert invoke([src, "--in-place", "-q"]) == 0       # nothing left to fuse: still a consistent pair
    assert_equivalent(model, onnx.load(str(src)))


@pytest.mark.parametrize("args,words", [
    (["--in-place", "--check"], "--check"),
    (["--in-place", "-o", "other.onnx"], "--in-place"),
])
def test_in_place_conflicts(args, words, tmp_path, capfd):
    src = tmp_path / "m.onnx"
    onnx.save_model(repvgg(), str(src))
    before = src.read_bytes()
    assert invoke([src] + args) == 2
    assert words in one_error_line(capfd.readouterr().err)
    assert src.read_bytes() == before


# ---------------------------------------------------------------- external data


def _external(tmp_path: Path, location: str, make_data) -> Path:
    """A model whose first initializer points at `location`; make_data(folder, bytes) lays out the file."""
    folder = tmp_path / "model"
    folder.mkdir()
    model = repvgg()
    tensor = model.graph.initializer[0]
    data = tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes()
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    make_data(folder, data)
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _outside(folder, data):
    (folder.parent / "secret.bin").write_bytes(data)


def _inside(name):
    def make(folder, data):
        (folder / name).write_bytes(data)
    return make


def _symlink(folder, data):
    (folder.parent / "real.bin").write_bytes(data)
    os.symlink(folder.parent / "real.bin", folder / "w.bin")


def _hardlink(folder, data):
    (folder.parent / "real.bin").write_bytes(data)
    os.link(folder.parent / "real.bin", folder / "w.bin")


EXTERNAL = {
    "parent traversal": ("../secret.bin", _outside, "outside the model's folder"),
    "absolute": (None, _outside, "outside the model's folder"),
    "symlink": ("w.bin", _symlink, "symlink"),
    "hard link": ("w.bin", _hardlink, "hard-linked"),
    "missing": ("w.bin", lambda folder, data: None, "missing"),
    "directory": ("sub", lambda folder, data: (folder / "sub").mkdir(), "not a regular file"),
}


@pytest.mark.parametrize("kind", sorted(EXTERNAL))
def test_hostile_external_data(kind, tmp_path, capfd):
    location, make, words = EXTERNAL[kind]
    location = location or str(tmp_path / "secret.bin")
    src = _external(tmp_path, location, make)
    before = src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    assert invoke([src, "-o", out / "f.onnx"]) == 2
    line = one_error_line(capfd.readouterr().err)
    assert words in line
    if kind in ("symlink", "hard link", "parent traversal", "absolute"):
        assert "copy" in line
    assert src.read_bytes() == before and leftovers(out) == []


def test_external_data_inside_a_subfolder_is_fine(tmp_path):
    def make(folder, data):
        (folder / "weights").mkdir()
        (folder / "weights" / "w.bin").write_bytes(data)
    src = _external(tmp_path, "weights/w.bin", make)
    out = tmp_path / "f.onnx"
    assert invoke([src, "-o", out, "-q"]) == 0
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 9, 7)).astype(np.float32)}
    assert_equivalent(onnx.load(str(src)), onnx.load(str(out)), feeds)
