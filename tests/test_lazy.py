"""Large weights of external data left in their files until read (io.load(lazy=True)): the
command's files are byte for byte those of a run that reads every weight into the model (in
place, over a data file another model shares, next to the input's data), the library's
models are complete, and a data file missing, short or changed under the run gives one error
line, a non-zero exit and no output."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import Builder, invoke, one_error_line, repvgg_block
from reparam_onnx import cli, fuse, fuse_with_report, io
from reparam_onnx.api import to_save
from reparam_onnx.errors import InputError

EAGER = 1 << 62   # io.LAZY_MIN that leaves nothing in its file: every weight read in, as before


def _model(channels: int = 64) -> onnx.ModelProto:
    """Two RepVGG blocks (fused) and a lone Conv (untouched): weights of 144 KiB and small ones."""
    b = Builder(3)
    x = b.input(["N", channels, 8, 8])
    y = repvgg_block(b, x, channels, channels)
    y = repvgg_block(b, y, channels, channels)
    z = b.conv(y, channels, channels, (3, 3), pads=(1, 1, 1, 1))
    return b.model(b.node("Relu", [z]))


def _write(folder: Path, name: str = "m.onnx", location: str = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(_model(), str(path), save_as_external_data=True, location=location or f"{name}.data",
                    size_threshold=1024)
    return path


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(args, eager: bool, monkeypatch) -> int:
    with monkeypatch.context() as patch:
        if eager:
            patch.setattr(io, "LAZY_MIN", EAGER)
        return invoke(args)


def test_large_weights_stay_in_their_file(tmp_path):
    path = _write(tmp_path)
    model, folder, files = io.load(path, lazy=True)
    whole, _, whole_files = io.load(path)
    assert files == whole_files and folder == tmp_path
    lazy = [t for t in model.graph.initializer if io.lazy(t)]
    assert lazy and all(math_bytes(t) >= io.LAZY_MIN for t in lazy)
    assert not any(io.lazy(t) for t in model.graph.initializer if math_bytes(t) < io.LAZY_MIN)
    for tensor in lazy:
        loaded = next(t for t in whole.graph.initializer if t.name == tensor.name)
        assert np.array_equal(io.lazy_array(tensor), numpy_helper.to_array(loaded))
    assert io.serialized_parts(model) and b"".join(
        p if isinstance(p, bytes) else p.header + p.data() for p in io.serialized_parts(model)) == \
        whole.SerializeToString()
    io.load_lazy(model)
    assert not io.has_lazy(model)
    assert model.SerializeToString() == whole.SerializeToString()


def math_bytes(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims)) * 4


def _eager_and_lazy(tmp_path, monkeypatch, options, verify: bool):
    """The files of a folder after an eager and a lazy run on its model (options: after the model,
    with the folder), and before each: {eager: (before, after)}."""
    out = {}
    for eager in (True, False):
        folder = tmp_path / ("eager" if eager else "lazy")
        path = _write(folder)
        before = _files(folder)
        args = [path] + options(folder) + ["-q"] + ([] if verify else ["--no-verify"])
        assert _run(args, eager, monkeypatch) == 0
        out[eager] = before, _files(folder)
    return out


@pytest.mark.parametrize("verify", [False, True])
def test_the_command_writes_the_same_files(tmp_path, monkeypatch, verify):
    """Lazy and eager runs: the same output model and data file, byte for byte; the input untouched."""
    runs = _eager_and_lazy(tmp_path, monkeypatch, lambda folder: ["-o", folder / "f.onnx"], verify)
    for before, files in runs.values():
        assert {k: files[k] for k in before} == before
    out = {eager: files for eager, (_, files) in runs.items()}
    assert out[True] == out[False]
    assert {"f.onnx", "f.onnx.data"} <= set(out[False])


def test_the_library_returns_complete_models(tmp_path, monkeypatch):
    path = _write(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(io, "LAZY_MIN", EAGER)
        expected = fuse(path).SerializeToString()
        unfused = fuse_with_report(path, write=False).model.SerializeToString()
    model = fuse(path)
    assert not io.has_lazy(model)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert model.SerializeToString() == expected
    analysed = fuse_with_report(path, write=False).model
    assert not io.has_lazy(analysed) and analysed.SerializeToString() == unfused


def test_inline_save_of_untouched_lazy_weights(tmp_path, monkeypatch):
    """Within to_save() the untouched weights stay in the input's file; io.save copies them, inline
    or external, as the complete model would be written."""
    path = _write(tmp_path / "in")
    with monkeypatch.context() as patch:
        patch.setattr(io, "LAZY_MIN", EAGER)
        whole = fuse(path)
    with to_save():
        apart = fuse_with_report(path)
    assert io.has_lazy(apart.model) and apart.arrays
    io.save(apart.model, tmp_path / "inline.onnx", arrays=apart.arrays)
    assert (tmp_path / "inline.onnx").read_bytes() == whole.SerializeToString()


@pytest.mark.parametrize("verify", [False, True])
def test_in_place(tmp_path, monkeypatch, verify):
    """The output over the input: the same files as an eager run, the input's data file replaced."""
    out = {eager: files for eager, (_, files) in
           _eager_and_lazy(tmp_path, monkeypatch, lambda folder: ["--in-place"], verify).items()}
    assert out[True] == out[False]
    assert "m.onnx.data" not in out[False]   # replaced by the new data file, then removed
    assert io.external_locations(tmp_path / "lazy" / "m.onnx")
    assert not any(name.endswith(".tmp") for name in out[False])


def test_in_place_over_a_data_file_another_model_shares(tmp_path, monkeypatch):
    """Another model reads the input's data file: it is kept as it was, the fused model gets its own."""
    out = {}
    for eager in (True, False):
        folder = tmp_path / ("eager" if eager else "lazy")
        path = _write(folder)
        shutil.copy(path, folder / "other.onnx")
        data = _digest(folder / "m.onnx.data")
        assert _run([path, "--in-place", "-q"], eager, monkeypatch) == 0
        assert _digest(folder / "m.onnx.data") == data
        out[eager] = _files(folder)
    assert out[True] == out[False]
    other = fuse(tmp_path / "lazy" / "other.onnx", verify=False)
    assert other is not None


def test_output_next_to_the_input_data_it_would_name(tmp_path, monkeypatch):
    """a.onnx keeps its weights in b.onnx.data; -o b.onnx would name the same data file: the
    output's goes elsewhere, the input's is read as it was."""
    out = {}
    for eager in (True, False):
        folder = tmp_path / ("eager" if eager else "lazy")
        path = _write(folder, "a.onnx", location="b.onnx.data")
        data = _digest(folder / "b.onnx.data")
        assert _run([path, "-o", folder / "b.onnx", "-q"], eager, monkeypatch) == 0
        assert _digest(folder / "b.onnx.data") == data
        assert io.external_locations(folder / "b.onnx") != io.external_locations(path)
        out[eager] = _files(folder)
    assert out[True] == out[False]


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_a_missing_or_short_data_file(tmp_path, capsys, damage):
    path = _write(tmp_path)
    data = tmp_path / "m.onnx.data"
    if damage == "missing":
        data.unlink()
    else:
        with open(data, "r+b") as handle:
            handle.truncate(data.stat().st_size - 4096)
    assert invoke([path, "-o", tmp_path / "f.onnx", "-q"]) == cli.EXIT_INPUT
    line = one_error_line(capsys.readouterr().err)
    assert "external data" in line
    assert not (tmp_path / "f.onnx").exists() and not (tmp_path / "f.onnx.data").exists()


@pytest.mark.parametrize("change", ["shortened", "rewritten", "removed"])
def test_a_data_file_changed_during_the_run(tmp_path, capsys, monkeypatch, change):
    """The input's data file changes after the weights were looked at and before they are copied:
    one error line, exit 2, and no output (nor a temporary file) left behind."""
    path = _write(tmp_path)
    data = tmp_path / "m.onnx.data"
    real = cli.fuse_with_report

    def fuse_then_change(*args, **kwargs):
        result = real(*args, **kwargs)
        if change == "shortened":
            with open(data, "r+b") as handle:
                handle.truncate(data.stat().st_size // 2)
        elif change == "rewritten":
            content = data.read_bytes()
            data.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
            info = data.stat()
            os.utime(data, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
        else:
            data.unlink()
        return result
    monkeypatch.setattr(cli, "fuse_with_report", fuse_then_change)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert invoke([path, "-o", tmp_path / "f.onnx", "-q", "--no-verify"]) == cli.EXIT_INPUT
    line = one_error_line(capsys.readouterr().err)
    assert "external data" in line
    after = sorted(p.name for p in tmp_path.iterdir())
    assert not (tmp_path / "f.onnx").exists() and not (tmp_path / "f.onnx.data").exists()
    assert [n for n in after if n not in before] == []


def test_a_lazy_read_past_the_end_is_refused(tmp_path):
    path = _write(tmp_path)
    model, _, _ = io.load(path, lazy=True)
    tensor = next(t for t in model.graph.initializer if io.lazy(t))
    with open(tmp_path / "m.onnx.data", "r+b") as handle:
        handle.truncate(0)
    io._sources.clear()   # as if load() had not seen the file: the read itself must notice
    with pytest.raises(InputError, match="past the end"):
        io.lazy_bytes(tensor)
