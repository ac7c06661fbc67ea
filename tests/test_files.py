"""The files a run touches: external data entries checked at load, file modes, the report
never written over a file of the run, --in-place never deleting what another model uses."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st
from onnx import helper

from conftest import (PERMISSIVE_RULE, SETTINGS, Builder, assert_equivalent, invoke, leftovers, one_error_line,
                      random_feeds, repvgg_block, run_cli)
from reparam_onnx import InputError, cli, io, validate


def repvgg(seed: int = 0, channels: int = 8) -> onnx.ModelProto:
    """x → RepVGG block → Relu; with 8 channels the fused kernel (2304 bytes) goes to the data file."""
    b = Builder(seed)
    x = b.input(["N", channels, 8, 8])
    return b.model(b.node("Relu", [repvgg_block(b, x, channels, channels)]))


def save_external(model: onnx.ModelProto, path: Path, location: str = None) -> Path:
    """`model` at `path`, every initializer in one data file (default '<name>.data')."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or f"{path.name}.data", size_threshold=0)
    return path


def rewrite_head(path: Path, change) -> None:
    """Apply change(model) to the model file only (its data file stays as it is)."""
    model = onnx.load(str(path), load_external_data=False)
    change(model)
    path.write_bytes(model.SerializeToString())


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- external data entries, checked at load


def _set(key, value):
    """Set (or add) `key` on the first initializer's external data."""
    def change(model):
        tensor = model.graph.initializer[0]
        entries = [e for e in tensor.external_data if e.key == key]
        entry = entries[0] if entries else tensor.external_data.add()
        entry.key, entry.value = key, value
    return change


def _drop(key):
    def change(model):
        tensor = model.graph.initializer[0]
        kept = [(e.key, e.value) for e in tensor.external_data if e.key != key]
        del tensor.external_data[:]
        for k, v in kept:
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v
    return change


def _twice(key):
    def change(model):
        tensor = model.graph.initializer[0]
        value = next(e.value for e in tensor.external_data if e.key == key)
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return change


MALFORMED = {
    "offset negative": (_set("offset", "-5"), ["'offset'", "'-5'"]),
    "offset not a number": (_set("offset", "abc"), ["'offset'", "'abc'"]),
    "offset with a space": (_set("offset", " 5"), ["'offset'"]),
    "offset with a plus": (_set("offset", "+0"), ["'offset'"]),
    "offset with an underscore": (_set("offset", "1_0"), ["'offset'"]),
    "offset of a million digits": (_set("offset", "9" * 10**6), ["'offset'"]),
    "length negative": (_set("length", "-1"), ["'length'", "'-1'"]),
    "length not a number": (_set("length", "x"), ["'length'", "'x'"]),
    "length empty": (_set("length", ""), ["'length'"]),
    "offset past the end": (_set("offset", "100000"), ["offset 100000", "past the end", "m.onnx.data"]),
    "length past the end": (_set("length", "100000"), ["length 100000", "past the end", "m.onnx.data"]),
    "offset without length past the end": (lambda m: (_drop("length")(m), _set("offset", "99999")(m)),
                                           ["offset 99999", "past the end"]),
    "no location": (_drop("location"), ["'location'"]),
    "empty location": (_set("location", ""), ["'location'"]),
    "unknown key": (_set("colour", "blue"), ["unknown key", "'colour'"]),
    "location twice": (_twice("location"), ["'location'", "twice"]),
    "offset twice": (_twice("offset"), ["'offset'", "twice"]),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_external_data_entry(kind, tmp_path, capfd):
    """Exit 2, one line naming the tensor and the field; the input untouched, nothing written."""
    change, words = MALFORMED[kind]
    src = save_external(repvgg(), tmp_path / "m.onnx")
    rewrite_head(src, change)
    name = onnx.load(str(src), load_external_data=False).graph.initializer[0].name
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert invoke([src, "-o", out / "f.onnx"]) == 2
    line = one_error_line(capfd.readouterr().err)
    assert f"'{name}'" in line
    for word in words:
        assert word in line
    assert len(line) < 300
    assert snapshot(tmp_path) == before and leftovers(out) == []


def test_external_data_of_a_constant_is_checked_and_read(tmp_path, capfd):
    """A Constant node's tensor may live in a data file too: checked like an initializer's
    (exit 2 on a bad entry), and read when it is fine (the block is fused)."""
    model = repvgg()
    weight = model.graph.initializer[0]
    model.graph.initializer.remove(weight)
    (tmp_path / "c.bin").write_bytes(weight.raw_data)
    constant = onnx.TensorProto()
    constant.CopyFrom(weight)
    constant.ClearField("raw_data")
    constant.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "c.bin"), ("offset", "abc"), ("length", str(len(weight.raw_data)))):
        entry = constant.external_data.add()
        entry.key, entry.value = key, value
    model.graph.node.insert(0, helper.make_node("Constant", [], [weight.name], value=constant, name="c"))
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    assert invoke([src, "-o", tmp_path / "f.onnx", "-q"]) == 2
    assert f"'{weight.name}'" in one_error_line(capfd.readouterr().err)
    assert not (tmp_path / "f.onnx").exists()

    model.graph.node[0].attribute[0].t.external_data[1].value = "0"
    src.write_bytes(model.SerializeToString())
    assert invoke([src, "-o", tmp_path / "f.onnx", "-q"]) == 0
    fused = onnx.load(str(tmp_path / "f.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in fused.graph.node}


@pytest.fixture(scope="module")
def external_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("external")
    return save_external(repvgg(), folder / "m.onnx")


TEXT = st.one_of(st.text(max_size=12), st.integers(-10, 5000).map(str), st.sampled_from(["0", "", "00", "4096"]))


@settings(max_examples=150, **SETTINGS)
@given(key=st.sampled_from(["offset", "length", "location", "checksum", "other"]), value=TEXT)
def test_any_external_data_entry_loads_or_is_an_input_error(external_model, key, value):
    """Whatever an entry says, loading (and the checks at load) give a model or an InputError,
    never another exception."""
    model = onnx.load(str(external_model), load_external_data=False)
    _set(key, value)(model)
    path = external_model.parent / "edited.onnx"
    path.write_bytes(model.SerializeToString())
    try:
        loaded, _, _ = io.load(path)
        validate.check_model(loaded)
    except InputError as exc:
        assert "\n" not in str(exc)


# ---------------------------------------------------------------- file modes


@pytest.fixture
def umask():
    """set(mask): the process umask for this test; restored afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027], ids=lambda m: f"umask-{m:03o}")
def test_new_files_follow_the_umask(mask, tmp_path, umask):
    """The model, its data file and the report get 0666 & ~umask, as open() gives them."""
    src = save_external(repvgg(), tmp_path / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    umask(mask)
    assert invoke([src, "-o", out / "f.onnx", "--report", out / "r.json", "-q"]) == 0
    assert leftovers(out) == ["f.onnx", "f.onnx.data", "r.json"]
    assert {p.name: mode(p) for p in out.iterdir()} == dict.fromkeys(leftovers(out), 0o666 & ~mask)


def test_new_files_follow_the_umask_subprocess(tmp_path, umask):
    src = tmp_path / "m.onnx"
    onnx.save_model(repvgg(), str(src))
    umask(0o002)
    proc = run_cli([src, "-o", tmp_path / "f.onnx", "--report", tmp_path / "r.json", "-q"])
    assert proc.returncode == 0, proc.stderr
    assert mode(tmp_path / "f.onnx") == mode(tmp_path / "r.json") == 0o664


def test_in_place_keeps_the_modes(tmp_path, umask):
    """The model keeps its mode, the new data file takes the old one's, whatever the umask."""
    src = save_external(repvgg(), tmp_path / "m.onnx")
    os.chmod(src, 0o640)
    os.chmod(tmp_path / "m.onnx.data", 0o604)
    umask(0o077)
    assert invoke([src, "--in-place", "-q"]) == 0
    assert leftovers(tmp_path) == ["m.onnx", "m.onnx.1.data"]
    assert mode(src) == 0o640 and mode(tmp_path / "m.onnx.1.data") == 0o604


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    """An existing output, data file or report is replaced with its mode, like `>` would."""
    src = save_external(repvgg(), tmp_path / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    umask(0o022)
    args = [src, "-o", out / "f.onnx", "--report", out / "r.json", "-q"]
    assert invoke(args) == 0
    modes = {"f.onnx": 0o600, "f.onnx.data": 0o640, "r.json": 0o444}
    for name, m in modes.items():
        os.chmod(out / name, m)
    assert invoke(args) == 0
    assert {p.name: mode(p) for p in out.iterdir()} == modes


# ---------------------------------------------------------------- the report and -o overwrite no file of the run


@pytest.fixture
def run_tree(tmp_path):
    """A run's files under one root: src/m.onnx (+ m.onnx.data, inputs.npz), rules/r.toml, an
    earlier output out/f.onnx with its data in out/old.data, and 'via', a symlink to the root."""
    root = tmp_path / "root"
    (root / "src").mkdir(parents=True)
    (root / "rules").mkdir()
    (root / "out").mkdir()
    save_external(repvgg(), root / "src" / "m.onnx")
    np.savez(root / "src" / "inputs.npz", x=np.ones((1, 8, 8, 8), np.float32))
    (root / "rules" / "r.toml").write_text(PERMISSIVE_RULE)
    save_external(repvgg(1), root / "out" / "f.onnx", location="old.data")
    os.symlink(root, root / "via")
    return root


def run_args(root: Path, output: str, report: str):
    return [root / "src" / "m.onnx", "-o", output, "--inputs", root / "src" / "inputs.npz",
            "--rules", root / "rules", "--report", report, "-q"]


def tree(root: Path) -> dict:
    """Every file under root (symlinks not followed) with its bytes; symlinks by target."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            found[str(p.relative_to(root))] = os.readlink(p) if p.is_symlink() else \
                p.read_bytes() if p.is_file() else "dir"
    return found


def spell(root: Path, rel: str, how: str) -> str:
    """`rel` (under root) spelled another way; the hard link is made here."""
    folder, _, name = rel.rpartition("/")
    if how == "plain":
        return f"{root}/{rel}"
    if how == "dot":
        return f"{root}/./{folder}/./{name}"
    if how == "dotdot":
        return f"{root}/src/../{folder}/../{folder}/{name}"
    if how == "symlinked folder":
        return f"{root}/via/{rel}"
    if how == "relative":
        return rel     # the test runs in root
    if how == "hard link":
        os.link(root / rel, root / folder / f"alias-{name}")
        return f"{root}/{folder}/alias-{name}"
    raise ValueError(how)


SPELLINGS = ["plain", "dot", "dotdot", "symlinked folder", "relative", "hard link"]
# what the report would overwrite: (the file, the output of the run)
RUN_FILES = {
    "input model": ("src/m.onnx", "out/f.onnx"),
    "input data": ("src/m.onnx.data", "out/f.onnx"),
    "inputs file": ("src/inputs.npz", "out/f.onnx"),
    "rule file": ("rules/r.toml", "out/f.onnx"),
    "output model": ("out/f.onnx", "out/f.onnx"),
    "output data": ("out/f.onnx.data", "out/f.onnx"),
    "data of the output replaced": ("out/old.data", "out/f.onnx"),
    "new output model": ("out/g.onnx", "out/g.onnx"),
    "new output data": ("out/g.onnx.data", "out/g.onnx"),
}
NOT_YET = {"output data", "new output model", "new output data"}   # no hard link to a file to be written


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the run gets as far as fusing."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run started working before refusing")
    monkeypatch.setattr(cli, "fuse_with_report", refuse)


@pytest.mark.parametrize("role, how", [(role, how) for role in sorted(RUN_FILES) for how in SPELLINGS
                                       if how != "hard link" or role not in NOT_YET])
def test_report_is_never_a_file_of_the_run(role, how, run_tree, capfd, monkeypatch, no_work):
    """Any spelling of any file the run reads or writes as --report: exit 2 before any work,
    one line, every file as it was, nothing new (no output, no temporary file)."""
    rel, output = RUN_FILES[role]
    monkeypatch.chdir(run_tree)
    report = spell(run_tree, rel, how)
    before = tree(run_tree)
    assert invoke(run_args(run_tree, f"{run_tree}/{output}", report)) == 2
    line = one_error_line(capfd.readouterr().err)
    assert "the report" in line and "choose another name" in line
    assert tree(run_tree) == before


@pytest.mark.parametrize("swap", [False, True], ids=["report-through-link", "output-through-link"])
@pytest.mark.parametrize("how", ["plain", "dotdot", "relative"])
def test_new_output_through_a_symlinked_folder_is_not_the_report(how, swap, run_tree, capfd, monkeypatch, no_work):
    """A new output and the report name one file, one of them through the symlinked folder."""
    monkeypatch.chdir(run_tree)
    output, report = spell(run_tree, "out/g.onnx", how), f"{run_tree}/via/out/g.onnx"
    if swap:
        output, report = report, output
    before = tree(run_tree)
    assert invoke(run_args(run_tree, output, report)) == 2
    assert "the report" in one_error_line(capfd.readouterr().err)
    assert tree(run_tree) == before


def test_report_of_the_run_tree_is_fine(run_tree):
    """The tree of the matrix above runs cleanly with the report elsewhere."""
    assert invoke(run_args(run_tree, f"{run_tree}/out/g.onnx", f"{run_tree}/out/r.json")) == 0
    assert json.loads((run_tree / "out" / "r.json").read_text())["exit_code"] == 0
    assert leftovers(run_tree / "out") == ["f.onnx", "g.onnx", "g.onnx.data", "old.data", "r.json"]


def test_report_over_the_input_data_subprocess(tmp_path):
    """The reviewer's case: exit 0 and a JSON file in place of the weights."""
    src = save_external(repvgg(), tmp_path / "m.onnx")
    before = tree(tmp_path)
    proc = run_cli([src, "-o", tmp_path / "f.onnx", "--report", tmp_path / "m.onnx.data"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "external data" in one_error_line(proc.stderr)
    assert tree(tmp_path) == before


def test_check_report_is_not_a_file_of_the_run(run_tree, capfd, no_work):
    before = tree(run_tree)
    assert invoke([run_tree / "src" / "m.onnx", "--check", "--report", run_tree / "src" / "m.onnx.data"]) == 2
    assert "the report" in one_error_line(capfd.readouterr().err)
    assert tree(run_tree) == before


def test_looking_for_the_files_of_the_run_reads_no_fifo(tmp_path):
    """The input's data files are looked up in regular files only: a FIFO is refused as
    before, not read (which would block until a writer comes)."""
    os.mkfifo(tmp_path / "m.onnx")
    proc = run_cli([tmp_path / "m.onnx", "-o", tmp_path / "f.onnx", "--report", tmp_path / "r.json"])
    assert proc.returncode == 2
    assert "empty" in one_error_line(proc.stderr)
    assert leftovers(tmp_path) == ["m.onnx", "r.json"]


@pytest.mark.parametrize("how", ["plain", "dotdot", "symlinked folder"])
@pytest.mark.parametrize("rel", ["src/m.onnx.data", "src/inputs.npz", "rules/r.toml"])
def test_output_is_never_a_file_the_run_reads(rel, how, run_tree, capfd, no_work):
    before = tree(run_tree)
    assert invoke(run_args(run_tree, spell(run_tree, rel, how), f"{run_tree}/out/r.json")) == 2
    line = one_error_line(capfd.readouterr().err)
    assert "the output" in line and "choose another name" in line
    assert tree(run_tree) == {**before, "out/r.json": (run_tree / "out" / "r.json").read_bytes()}
    assert json.loads((run_tree / "out" / "r.json").read_text())["exit_code"] == 2


@pytest.mark.parametrize("kind", ["directory", "missing folder"])
def test_report_that_cannot_be_written_is_refused_before_work(kind, run_tree, capfd, no_work):
    report = run_tree / "out" if kind == "directory" else run_tree / "nowhere" / "r.json"
    before = tree(run_tree)
    assert invoke(run_args(run_tree, f"{run_tree}/out/g.onnx", report)) == 2
    assert "report" in one_error_line(capfd.readouterr().err)
    assert tree(run_tree) == before


def test_report_is_written_atomically(tmp_path, monkeypatch, capfd):
    """A report that cannot be written leaves the previous one whole, no temporary file, and
    an error exit even when the run itself would exit 1 (--check)."""
    src = tmp_path / "m.onnx"
    onnx.save_model(repvgg(), str(src))
    report = tmp_path / "r.json"
    report.write_text('{"previous": true}\n')

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    assert invoke([src, "--check", "--report", report, "-q"]) == 2
    monkeypatch.undo()
    line = one_error_line(capfd.readouterr().err)
    assert "report" in line and "No space left" in line
    assert report.read_text() == '{"previous": true}\n'
    assert leftovers(tmp_path) == ["m.onnx", "r.json"]


# ---------------------------------------------------------------- shared data files; in place with nothing fused


def computes(path: Path) -> dict:
    """What onnxruntime computes with the model file at `path` (it follows symlinked data, onnx does not)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = random_feeds(onnx.load(str(path), load_external_data=False))
    return {o.name: v.tobytes() for o, v in zip(session.get_outputs(), session.run(None, feeds))}


def _same_folder(folder):
    save_external(repvgg(), folder / "m.onnx", location="shared.data")
    save_external(repvgg(), folder / "n.onnx", location="shared.data")


def _unreadable_neighbour(folder):
    save_external(repvgg(), folder / "m.onnx")
    (folder / "broken.onnx").write_bytes(b"not a model")


def _subfolder(folder):
    """m.onnx and n.onnx refer to weights/w.bin; o.onnx, inside weights/, to w.bin."""
    (folder / "weights").mkdir()
    save_external(repvgg(), folder / "m.onnx", location="weights/w.bin")
    save_external(repvgg(), folder / "weights" / "o.onnx", location="w.bin")


def _through_a_symlink(folder):
    save_external(repvgg(), folder / "m.onnx")
    save_external(repvgg(), folder / "n.onnx", location="alias.data")
    (folder / "alias.data").unlink()
    os.symlink("m.onnx.data", folder / "alias.data")


# the input's data file is shared: (lay out the folder, the data file that must stay)
SHARED = {
    "another model in the folder": (_same_folder, "shared.data"),
    "an unreadable .onnx in the folder": (_unreadable_neighbour, "m.onnx.data"),
    "a model in the data file's subfolder": (_subfolder, "weights/w.bin"),
    "another model through a symlink": (_through_a_symlink, "m.onnx.data"),
}


@pytest.mark.parametrize("kind", sorted(SHARED))
def test_in_place_keeps_a_data_file_another_model_may_use(kind, tmp_path, capfd):
    """The input is fused in place; every other model loads with the same weights as before,
    and the shared data file keeps its bytes."""
    make, shared = SHARED[kind]
    make(tmp_path)
    src = tmp_path / "m.onnx"
    original = onnx.load(str(src))
    others = {p: computes(p) for p in tmp_path.rglob("*.onnx") if p != src and io.external_locations(p)}
    data_before = (tmp_path / shared).read_bytes()
    assert invoke([src, "--in-place"]) == 0
    assert f"kept {(tmp_path / shared).resolve()}" in capfd.readouterr().out
    assert (tmp_path / shared).read_bytes() == data_before
    assert {p: computes(p) for p in others} == others
    fused = onnx.load(str(src))
    assert "BatchNormalization" not in {n.op_type for n in fused.graph.node}
    assert_equivalent(original, fused)


def test_in_place_removes_a_data_file_nothing_else_uses(tmp_path, capfd):
    src = save_external(repvgg(), tmp_path / "m.onnx")
    save_external(repvgg(1), tmp_path / "n.onnx")      # a neighbour with its own data
    assert invoke([src, "--in-place"]) == 0
    assert "kept" not in capfd.readouterr().out
    assert leftovers(tmp_path) == ["m.onnx", "m.onnx.1.data", "n.onnx", "n.onnx.data"]


def test_output_does_not_reuse_a_data_file_another_model_uses(tmp_path):
    """-o over an earlier output whose data file another model shares: new data under a new name."""
    src = save_external(repvgg(), tmp_path / "m.onnx")
    out = save_external(repvgg(1), tmp_path / "f.onnx")
    save_external(repvgg(1), tmp_path / "n.onnx", location="f.onnx.data")
    neighbour = computes(tmp_path / "n.onnx")
    assert invoke([src, "-o", out, "-q"]) == 0
    assert computes(tmp_path / "n.onnx") == neighbour
    assert {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
            for e in t.external_data if e.key == "location"} == {"f.onnx.1.data"}


def test_output_reuses_its_own_data_file(tmp_path):
    src = save_external(repvgg(), tmp_path / "m.onnx")
    out = tmp_path / "f.onnx"
    for _ in range(2):
        assert invoke([src, "-o", out, "-q"]) == 0
    assert leftovers(tmp_path) == ["f.onnx", "f.onnx.data", "m.onnx", "m.onnx.data"]


def files_state(folder: Path) -> dict:
    """Bytes, inode, mtime and mode of every file: what 'not written at all' leaves."""
    return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_mode)
            for p in folder.iterdir()}


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_in_place_with_nothing_to_fuse_writes_nothing(external, tmp_path, capfd):
    b = Builder(5)
    x = b.input(["N", 8, 8, 8])
    model = b.model(b.node("Relu", [b.conv(x, 8, 8, (3, 3), pads=(1, 1, 1, 1))]))
    src = save_external(model, tmp_path / "p.onnx") if external else tmp_path / "p.onnx"
    if not external:
        onnx.save_model(model, str(src))
    before = files_state(tmp_path)
    assert invoke([src, "--in-place"]) == 0
    assert f"nothing fused: left {src} as it was" in capfd.readouterr().out
    assert files_state(tmp_path) == before
