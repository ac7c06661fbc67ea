"""--progress: a one-line indicator on stderr, automatic on a terminal for runs over a second,
never on a pipe unless asked for, erased before the run's own lines, and free."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import textwrap
import time

import onnx
import pytest

from conftest import ROOT, Builder, invoke, repvgg_block
from reparam_onnx import fuse_with_report, io, progress


def model(channels=8) -> onnx.ModelProto:
    b = Builder(0)
    x = b.input([1, channels, 8, 8])
    return b.model(b.node("Relu", [repvgg_block(b, x, channels, channels)]))


# the CLI in a child whose stderr is a terminal; DELAY is set first (0: every run is "long")
CHILD = textwrap.dedent("""
    import sys
    from reparam_onnx import progress
    progress.DELAY = float(sys.argv[1])
    from reparam_onnx.cli import main
    main(sys.argv[2:])
""")


def on_a_terminal(args, delay: float):
    """(exit code, what reached the terminal, stdout) of the CLI with stderr on a pty."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(delay), *map(str, args)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:   # the child closed its end
                break
            if not data:
                break
            seen += data
        elif child.poll() is not None:
            break
    os.close(master)
    out = child.stdout.read().decode()
    child.stdout.close()
    return child.wait(timeout=60), seen.decode(), out


def test_drawn_on_a_terminal_and_erased(tmp_path):
    onnx.save(model(), str(tmp_path / "m.onnx"))
    code, seen, out = on_a_terminal([tmp_path / "m.onnx", "-o", tmp_path / "f.onnx"], delay=0)
    assert code == 0
    assert "reparam-onnx: " in seen and "\r" in seen
    assert seen.endswith("\r\x1b[K"), repr(seen[-80:])   # the last thing on the line: erased
    assert "wrote" in out and "reparam-onnx:" not in out


def test_a_quick_run_draws_nothing_on_a_terminal(tmp_path):
    onnx.save(model(), str(tmp_path / "m.onnx"))
    code, seen, _ = on_a_terminal([tmp_path / "m.onnx", "-o", tmp_path / "f.onnx"], delay=60)
    assert code == 0 and seen == ""


@pytest.mark.parametrize("flag", ["--no-progress", "-q"])
def test_turned_off_on_a_terminal(flag, tmp_path):
    onnx.save(model(), str(tmp_path / "m.onnx"))
    code, seen, _ = on_a_terminal([tmp_path / "m.onnx", "-o", tmp_path / "f.onnx", flag], delay=0)
    assert code == 0 and seen == ""


def test_an_error_line_is_alone_on_its_line(tmp_path):
    code, seen, _ = on_a_terminal([tmp_path / "missing.onnx", "-o", tmp_path / "f.onnx"], delay=0)
    assert code == 2
    line = seen.replace("\r\x1b[K", "\n").split("\n")
    errors = [part for part in line if "error:" in part]
    assert errors and all(e.startswith("reparam-onnx: error:") for e in errors), repr(seen)


def test_never_on_a_pipe(tmp_path):
    onnx.save(model(), str(tmp_path / "m.onnx"))
    out = subprocess.run([sys.executable, "-c", CHILD, "0", tmp_path / "m.onnx", "-o", tmp_path / "f.onnx"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         timeout=120)
    assert out.returncode == 0 and out.stderr == ""


def test_never_in_process_when_stderr_is_captured(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0)
    onnx.save(model(), str(tmp_path / "m.onnx"))
    assert invoke([tmp_path / "m.onnx", "-o", tmp_path / "f.onnx"]) == 0
    assert capfd.readouterr().err == ""


def test_asked_for_on_a_pipe_is_one_plain_line_per_stage(tmp_path, capfd):
    onnx.save(model(), str(tmp_path / "m.onnx"))
    assert invoke([tmp_path / "m.onnx", "-o", tmp_path / "f.onnx", "--progress"]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert err.splitlines() == [f"reparam-onnx: {s}" for s in ("read", "load", "analyse and fuse", "verify", "save")]


def test_a_batch_has_none(tmp_path, capfd):
    for name in ("a", "b"):
        onnx.save(model(), str(tmp_path / f"{name}.onnx"))
    assert invoke([tmp_path / "a.onnx", tmp_path / "b.onnx", "--out-dir", tmp_path / "out", "--progress", "-q"]) == 0
    assert capfd.readouterr().err == ""


class FakeTerminal:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_the_line_counts_and_is_erased(monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0)
    monkeypatch.setattr(progress, "INTERVAL", 0.01)
    terminal = FakeTerminal()
    with progress.Progress(stream=terminal) as bar:
        bar.stage("save", total=3 << 20, unit=" MB", scale=1 << 20)
        bar.advance(2 << 20)
        deadline = time.monotonic() + 10
        while "save 2/3 MB" not in terminal.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "\rreparam-onnx: save 2/3 MB · " in terminal.text
    assert terminal.text.endswith("\r\x1b[K")


def test_api_and_save_report_their_stages(tmp_path):
    stages, written = [], []
    result = fuse_with_report(model(64), progress=stages.append)
    assert stages == ["load", "analyse and fuse", "verify"]
    io.save(result.model, tmp_path / "f.onnx", progress=lambda done, total: written.append((done, total)))
    size = (tmp_path / "f.onnx").stat().st_size
    assert written[-1] == (size, size) and all(d <= t == size for d, t in written)
    written.clear()
    io.save(result.model, tmp_path / "e.onnx", external=True, progress=lambda done, total: written.append((done, total)))
    done, total = written[-1]
    assert done == total > (tmp_path / "e.onnx").stat().st_size
    assert (tmp_path / "e.onnx.data").stat().st_size >= total - (tmp_path / "e.onnx").stat().st_size


def test_costs_nothing_measurable(tmp_path, monkeypatch):
    """The drawing thread sleeps between redraws: a run with it is no slower than one without."""
    monkeypatch.setattr(progress, "DELAY", 0)
    onnx.save(model(32), str(tmp_path / "m.onnx"))

    def timed(bar):
        start = time.perf_counter()
        with bar:
            for _ in range(3):
                fuse_with_report(str(tmp_path / "m.onnx"), verify=False, progress=bar.stage)
        return time.perf_counter() - start
    timed(progress.Progress(enabled=False))
    plain = min(timed(progress.Progress(enabled=False)) for _ in range(3))
    drawn = min(timed(progress.Progress(stream=FakeTerminal())) for _ in range(3))
    assert drawn < plain * 1.5 + 0.05
