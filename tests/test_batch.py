"""Many models in one call: `reparam-onnx a.onnx b.onnx models/ --out-dir DIR`.

One worker process per model (up to --jobs), one line per model in input order, the exit
code the worst of them, a failing or crashing model never stops the others and leaves
nothing behind, and everything that can be refused is refused before any work.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import onnx
import pytest

from conftest import Builder, assert_equivalent, invoke, leftovers, one_error_line, repvgg_block

from reparam_onnx import batch, cli

SHAPE = ["N", 4, 8, 8]


def repvgg_model(seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    x = b.input(SHAPE)
    return b.model(b.node("Relu", [repvgg_block(b, x, 4, 4)]))


def plain_model() -> onnx.ModelProto:
    b = Builder(5)
    x = b.input(SHAPE)
    return b.model(b.node("Relu", [b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1))]))


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture
def models(tmp_path) -> list:
    """models/a.onnx (RepVGG), models/b.onnx (nothing to fuse), models/c.onnx (RepVGG)."""
    folder = tmp_path / "models"
    return [save(repvgg_model(0), folder / "a.onnx"), save(plain_model(), folder / "b.onnx"),
            save(repvgg_model(1), folder / "c.onnx")]


@pytest.fixture
def out(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the batch starts a worker."""
    def refuse(*args, **kwargs):
        raise AssertionError("a worker was started before the batch was refused")
    monkeypatch.setattr(batch, "run_job", refuse)


def lines_of(text: str) -> list:
    return [line for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------- fusing many models

def test_out_dir_fuses_each_model_under_its_name(models, out, capfd):
    assert invoke([*models, "--out-dir", out]) == 0
    captured = capfd.readouterr()
    assert captured.err == ""
    lines = lines_of(captured.out)
    assert len(lines) == 4                                   # one per model, then the tally
    for line, model in zip(lines, models):
        assert line.startswith(f"{model}: ") and line.endswith(f"→ {out / model.name}")
    assert "fused 1 block(s) (1 repvgg)" in lines[0] and "verified" in lines[0]
    assert "fused 0 block(s)" in lines[1]
    assert lines[3] == "3 model(s): 3 ok; exit code 0"
    assert leftovers(out) == ["a.onnx", "b.onnx", "c.onnx"]
    for model in models:
        assert_equivalent(onnx.load(str(model)), onnx.load(str(out / model.name)))
    assert [n.op_type for n in onnx.load(str(out / "a.onnx")).graph.node] == ["Conv", "Relu"]


def test_batch_output_is_the_single_model_output(models, out, tmp_path):
    """Same bytes as one model at a time, whatever the number of workers."""
    single = tmp_path / "single"
    single.mkdir()
    for model in models:
        assert invoke([model, "-o", single / model.name, "-q"]) == 0
    assert invoke([*models, "--out-dir", out, "-q", "-j", "1"]) == 0
    for model in models:
        assert (out / model.name).read_bytes() == (single / model.name).read_bytes()


def test_a_folder_is_its_onnx_files(tmp_path, out, capfd):
    folder = tmp_path / "models"
    save(repvgg_model(0), folder / "z.onnx")
    save(plain_model(), folder / "a.ONNX")
    save(repvgg_model(1), folder / ".hidden.onnx")
    save(repvgg_model(2), folder / "sub" / "deeper.onnx")
    (folder / "notes.txt").write_text("not a model")
    assert invoke([folder, "--out-dir", out]) == 0
    lines = lines_of(capfd.readouterr().out)
    assert [line.split(": ")[0] for line in lines[:2]] == [str(folder / "a.ONNX"), str(folder / "z.onnx")]
    assert lines[2].startswith("2 model(s)")
    assert leftovers(out) == ["a.ONNX", "z.onnx"]


def test_out_dir_is_created(models, tmp_path):
    assert invoke([*models, "--out-dir", tmp_path / "deploy", "-q"]) == 0
    assert leftovers(tmp_path / "deploy") == ["a.onnx", "b.onnx", "c.onnx"]


def test_report_inside_a_created_out_dir(models, tmp_path):
    assert invoke([*models, "--out-dir", tmp_path / "deploy", "-q", "--report", tmp_path / "deploy" / "r.json"]) == 0
    assert leftovers(tmp_path / "deploy") == ["a.onnx", "b.onnx", "c.onnx", "r.json"]


def test_refused_batch_removes_the_out_dir_it_created(models, tmp_path, capfd):
    assert invoke([models[0], models[0], "--out-dir", tmp_path / "deploy"]) == 2
    assert "given twice" in one_error_line(capfd.readouterr().err)
    assert not (tmp_path / "deploy").exists()


def test_out_dir_created_for_nothing_is_removed(tmp_path, capfd):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    assert invoke([bad, "--out-dir", tmp_path / "deploy"]) == 2
    assert not (tmp_path / "deploy").exists()


def test_one_model_with_out_dir(models, out, capfd):
    assert invoke([models[0], "--out-dir", out]) == 0
    assert len(lines_of(capfd.readouterr().out)) == 2
    assert leftovers(out) == ["a.onnx"]


def test_a_failing_model_does_not_stop_the_others(models, out, tmp_path, capfd):
    bad = tmp_path / "models" / "bad.onnx"
    bad.write_bytes(b"not a model")
    missing = tmp_path / "models" / "missing.onnx"
    assert invoke([models[0], bad, missing, models[2], "--out-dir", out]) == 2
    captured = capfd.readouterr()
    errors = lines_of(captured.err)
    assert len(errors) == 2 and "Traceback" not in captured.err
    assert errors[0].startswith(f"reparam-onnx: error: {bad}: ") and "not an ONNX model" in errors[0]
    assert errors[1].startswith(f"reparam-onnx: error: {missing}: ") and "does not exist" in errors[1]
    lines = lines_of(captured.out)
    assert [line.split(": ")[0] for line in lines[:2]] == [str(models[0]), str(models[2])]
    assert lines[2] == "4 model(s): 2 ok, 2 bad input; exit code 2"
    assert leftovers(out) == ["a.onnx", "c.onnx"]


def test_verification_failures_write_nothing_for_those_models(models, out, tmp_path, capfd):
    report = tmp_path / "r.json"
    code = invoke([*models, "--out-dir", out, "--rtol", "1e-15", "--no-block-checks", "--report", report])
    assert code == 3
    errors = lines_of(capfd.readouterr().err)
    assert len(errors) == 2 and all("verification failed" in e for e in errors)
    assert leftovers(out) == ["b.onnx"]      # nothing fused, nothing to verify: written
    data = json.loads(report.read_text())
    assert data["exit_code"] == 3
    assert [m["exit_code"] for m in data["models"]] == [3, 0, 3]


def test_report_lists_every_model_in_input_order(models, out, tmp_path):
    report = tmp_path / "r.json"
    assert invoke([*models, "--out-dir", out, "-q", "--report", report]) == 0
    data = json.loads(report.read_text())
    assert data["exit_code"] == 0 and data["error"] is None and "version" in data
    entries = data["models"]
    assert [m["model"] for m in entries] == [str(m) for m in models]
    assert [m["output"] for m in entries] == [str(out / m.name) for m in models]
    assert [m["summary"]["fused"] for m in entries] == [1, 0, 1]
    assert all(m["exit_code"] == 0 and m["error"] is None for m in entries)
    assert entries[0]["blocks"][0]["rule"] == "repvgg" and entries[0]["verification"]["passed"]


def test_report_to_stdout(models, out):
    proc = run_module([*models, "--out-dir", out, "--report", "-"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [m["exit_code"] for m in data["models"]] == [0, 0, 0]
    assert len(lines_of(proc.stderr)) == 4 and str(models[0]) in proc.stderr


def test_quiet_prints_only_errors(models, out, tmp_path, capfd):
    bad = tmp_path / "models" / "bad.onnx"
    bad.write_bytes(b"")
    assert invoke([*models, bad, "--out-dir", out, "-q"]) == 2
    captured = capfd.readouterr()
    assert captured.out == ""
    assert str(bad) in one_error_line(captured.err)


def test_verbose_shows_every_block_under_its_model(models, out, capfd):
    assert invoke([*models, "--out-dir", out, "-v"]) == 0
    text = capfd.readouterr().out
    first, second = text.index(f"{models[0]}: "), text.index(f"{models[1]}: ")
    assert "  fused [repvgg]" in text[first:second]
    assert "channel range spread" in text[first:second]


def test_summary_under_each_model(models, out, capfd):
    assert invoke([*models, "--out-dir", out, "--summary"]) == 0
    text = capfd.readouterr().out
    assert text.count("numeric risk of the 1 fused block(s):") == 2
    assert text.count("numeric risk: no fused blocks") == 1


# ---------------------------------------------------------------- --check and --in-place

def test_check_many_exit_1_when_any_has_fusable_blocks(models, tmp_path, capfd):
    before = {m: m.read_bytes() for m in models}
    assert invoke([*models, "--check"]) == 1
    lines = lines_of(capfd.readouterr().out)
    assert lines[0].startswith(f"{models[0]}: 1 fusable block(s) remain (1 repvgg), nodes 8→2, verified")
    assert lines[1].startswith(f"{models[1]}: no fusable blocks")
    assert lines[3] == "3 model(s): 1 ok, 2 with fusable blocks; exit code 1"
    assert {m: m.read_bytes() for m in models} == before
    assert leftovers(tmp_path / "models") == ["a.onnx", "b.onnx", "c.onnx"]


def test_check_many_exit_0_when_all_are_fused(models, out):
    assert invoke([*models, "--out-dir", out, "-q"]) == 0
    assert invoke([out, "--check", "-q"]) == 0


def test_in_place_many(models, capfd):
    assert invoke([*models, "--in-place"]) == 0
    lines = lines_of(capfd.readouterr().out)
    assert lines[0].endswith("(in place)") and lines[1].endswith("(left as it was)")
    assert [n.op_type for n in onnx.load(str(models[2])).graph.node] == ["Conv", "Relu"]


# ---------------------------------------------------------------- refused before any work

@pytest.mark.parametrize("case, words", [
    ("same name", ["would both be written to", "a.onnx"]),
    ("same name, other case", ["would both be written to"]),
    ("given twice", ["given twice"]),
    ("folder and a file in it", ["given twice"]),
    ("out-dir is the models' folder", ["would replace it", "--in-place"]),
    ("out-dir's folder missing", ["does not exist"]),
    ("out-dir is a file", ["not a directory"]),
    ("no out-dir", ["missing --out-dir"]),
    ("-o", ["--out-dir", "-o"]),
    ("--in-place and --out-dir", ["--in-place", "--out-dir"]),
    ("--in-place and --check", ["--check", "--in-place"]),
    ("empty folder", ["no *.onnx models"]),
    ("report is an input", ["the report", "choose another name"]),
    ("report is an output", ["the report", "choose another name"]),
])
def test_refused_before_any_work(case, words, models, out, tmp_path, capfd, no_work):
    other = save(repvgg_model(3), tmp_path / "other" / "a.onnx")
    upper = save(repvgg_model(3), tmp_path / "third" / "A.onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "same name": [models[0], other, "--out-dir", out],
        "same name, other case": [models[0], upper, "--out-dir", out],
        "given twice": [models[0], models[1], tmp_path / "models" / "." / "a.onnx", "--out-dir", out],
        "folder and a file in it": [models[0].parent, models[1], "--out-dir", out],
        "out-dir is the models' folder": [*models, "--out-dir", models[0].parent],
        "out-dir's folder missing": [*models, "--out-dir", tmp_path / "nowhere" / "out"],
        "out-dir is a file": [*models, "--out-dir", models[0]],
        "no out-dir": [*models],
        "-o": [*models, "-o", out / "x.onnx"],
        "--in-place and --out-dir": [*models, "--in-place", "--out-dir", out],
        "--in-place and --check": [*models, "--in-place", "--check"],
        "empty folder": [empty, "--out-dir", out],
        "report is an input": [*models, "--out-dir", out, "--report", models[1]],
        "report is an output": [*models, "--out-dir", out, "--report", out / "c.onnx"],
    }[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert invoke(args) == 2
    captured = capfd.readouterr()
    line = one_error_line(captured.err)
    for word in words:
        assert word in line, line
    assert captured.out == ""
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert leftovers(out) == []


def test_refusal_is_reported(models, out, tmp_path, no_work):
    report = tmp_path / "r.json"
    assert invoke([models[0], tmp_path / "models" / "." / "a.onnx", "--out-dir", out, "--report", report]) == 2
    data = json.loads(report.read_text())
    assert data["exit_code"] == 2 and "given twice" in data["error"] and data["models"] == []


# ---------------------------------------------------------------- worker processes

def record_then_work(options):
    """A worker that notes its pid and when it ran (in the out-dir's sibling 'log'), then works."""
    log = Path(options["output"]).parent.parent / "log"
    start = time.monotonic()
    time.sleep(0.3)
    with open(log, "a") as handle:
        handle.write(json.dumps({"pid": os.getpid(), "start": start, "end": time.monotonic()}) + "\n")
    batch.work(options)


def crash_or_work(options):
    """Killed halfway through writing a model named 'crash*', raises in one named 'boom*'."""
    name = Path(options["model"]).name
    if name.startswith("crash"):
        output = Path(options["output"])
        (output.parent / f".{output.name}.x1y2.tmp").write_bytes(b"half a model")
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("boom"):
        def boom(*args, **kwargs):
            raise RuntimeError("kaboom")
        cli.fuse_with_report = boom
    batch.work(options)


def test_one_process_per_model_up_to_jobs(models, out, tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "WORKER", record_then_work)
    assert invoke([*models, "--out-dir", out, "-q", "-j", "2"]) == 0
    runs = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert len({r["pid"] for r in runs}) == 3 and os.getpid() not in {r["pid"] for r in runs}
    for r in runs:   # never more than 2 at once
        assert sum(o["start"] < r["end"] and r["start"] < o["end"] for o in runs) <= 2
    (tmp_path / "log").unlink()
    assert invoke([*models, "--out-dir", out, "-q", "-j", "1"]) == 0
    runs = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert all(sum(o["start"] < r["end"] and r["start"] < o["end"] for o in runs) == 1 for r in runs)


def test_default_jobs_is_the_core_count(monkeypatch, models, out):
    seen = []
    real = batch.run_jobs

    def spy(work, options, verbose, workers):
        seen.append(workers)
        return real(work, options, verbose, workers)
    monkeypatch.setattr(batch, "run_jobs", spy)
    monkeypatch.setattr(batch, "available_cores", lambda: 2)
    assert invoke([*models, "--out-dir", out, "-q"]) == 0
    assert invoke([models[0], "--out-dir", out, "-q"]) == 0
    assert seen == [2, 1]


def test_a_crashed_or_raising_worker_fails_only_its_model(models, out, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(batch, "WORKER", crash_or_work)
    crash = save(repvgg_model(4), tmp_path / "models" / "crash.onnx")
    boom = save(repvgg_model(5), tmp_path / "models" / "boom.onnx")
    report = tmp_path / "r.json"
    assert invoke([models[0], crash, boom, models[2], "--out-dir", out, "--report", report]) == 4
    captured = capfd.readouterr()
    errors = lines_of(captured.err)
    assert len(errors) == 2 and "Traceback" not in captured.err
    assert errors[0].startswith(f"reparam-onnx: error: {crash}: internal error") and "SIGKILL" in errors[0]
    assert errors[1].startswith(f"reparam-onnx: error: {boom}: internal error") and "kaboom" in errors[1]
    assert lines_of(captured.out)[-1] == "4 model(s): 2 ok, 2 internal error; exit code 4"
    assert leftovers(out) == ["a.onnx", "c.onnx"]           # the crashed write's temporary file is gone
    assert [m["exit_code"] for m in json.loads(report.read_text())["models"]] == [0, 4, 4, 0]


# ---------------------------------------------------------------- a real process

def run_module(args, cwd=None):
    import subprocess
    return subprocess.run([sys.executable, "-m", "reparam_onnx", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_python_dash_m_batch(models, out, tmp_path):
    bad = tmp_path / "models" / "bad.onnx"
    bad.write_bytes(b"garbage")
    proc = run_module([tmp_path / "models", "--out-dir", out])
    assert proc.returncode == 2
    assert str(bad) in one_error_line(proc.stderr)
    assert len(lines_of(proc.stdout)) == 4
    assert leftovers(out) == ["a.onnx", "b.onnx", "c.onnx"]


def test_interrupt_stops_the_batch(tmp_path, out):
    """Ctrl-C (SIGINT to the process group): no further model starts, the running one is
    interrupted, nothing half-written, one error line, exit 130."""
    import subprocess
    folder = tmp_path / "many"
    for i in range(6):
        save(repvgg_model(i), folder / f"m{i}.onnx")
    proc = subprocess.Popen([sys.executable, "-m", "reparam_onnx", folder, "--out-dir", out, "-j", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()
    os.killpg(proc.pid, signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert first.startswith(f"{folder / 'm0.onnx'}: fused 1 block(s)")
    assert one_error_line(err) == "reparam-onnx: error: aborted"
    written = leftovers(out)
    assert "m0.onnx" in written and len(written) < 6 and all(name.endswith(".onnx") for name in written)
    printed = len(lines_of(first + rest))                   # no tally; the model running may have just finished
    assert printed <= len(written) <= printed + 1


def test_workers_share_the_cores_among_their_sessions(monkeypatch):
    """Each worker's onnxruntime sessions get cores // jobs threads, so a batch never oversubscribes."""
    from reparam_onnx import batch
    seen = []
    real = batch.subprocess.Popen

    def spy(*args, **kwargs):
        seen.append(kwargs.get("env", {}).get(batch.THREADS_ENV))
        return real(*args, **kwargs)
    monkeypatch.setattr(batch.subprocess, "Popen", spy)
    monkeypatch.setattr(batch, "available_cores", lambda: 4)
    b = Builder(seed=3)
    x = b.input([1, 4, 7, 7])
    model = b.model(b.bn(b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1)), 4))
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name in ("a", "b"):
            paths.append(Path(tmp) / f"{name}.onnx")
            onnx.save(model, paths[-1])
        out = Path(tmp) / "out"
        assert invoke([*paths, "--out-dir", out, "-j", "2", "-q"]) == 0
    assert seen == ["2", "2"]
