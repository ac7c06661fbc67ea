"""The command line: exit codes, what is printed, what is (and is not) written.

Most cases run in-process through reparam_onnx.cli.main (fast, and monkeypatching
works); a few run `python -m reparam_onnx.cli` in a subprocess to check the module
entry point and what a real process prints.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import MY_RULE, Builder, assert_equivalent, invoke, leftovers, one_error_line, repvgg_block, run_cli

import reparam_onnx
from reparam_onnx import api
from reparam_onnx.report import Verification

SHAPE = ["N", 4, 8, 8]


# ---------------------------------------------------------------- models and helpers

def repvgg_model(seed: int = 0) -> onnx.ModelProto:
    """x → RepVGG block → Relu."""
    b = Builder(seed)
    x = b.input(SHAPE)
    r = b.node("Relu", [repvgg_block(b, x, 4, 4)])
    b.output(r, SHAPE)
    return b.model()


def mixed_model() -> onnx.ModelProto:
    """A RepVGG block, then a sum no rule accepts (two 3×3 convs + identity)."""
    b = Builder(3)
    x = b.input(SHAPE)
    r = b.node("Relu", [repvgg_block(b, x, 4, 4)])
    a1 = b.conv(r, 4, 4, (3, 3), pads=(1, 1, 1, 1))
    a2 = b.conv(r, 4, 4, (3, 3), pads=(1, 1, 1, 1))
    s = b.add(a1, a2, r)
    b.output(s, SHAPE)
    return b.model()


def plain_model() -> onnx.ModelProto:
    """Nothing to fuse: Conv → Relu."""
    b = Builder(5)
    x = b.input(SHAPE)
    r = b.node("Relu", [b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1))])
    b.output(r, SHAPE)
    return b.model()


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


@pytest.fixture
def model_path(tmp_path) -> Path:
    return save(repvgg_model(), tmp_path / "model.onnx")


@pytest.fixture
def outdir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


# ---------------------------------------------------------------- fusing

def test_fuse_writes_output_and_summary(model_path, outdir, capfd):
    out = outdir / "fused.onnx"
    assert invoke([model_path, "-o", out]) == 0
    captured = capfd.readouterr()
    assert captured.err == ""
    assert "repvgg" in captured.out
    assert "fused 1 block(s)" in captured.out
    assert f"wrote {out}" in captured.out
    fused = onnx.load(str(out))
    onnx.checker.check_model(fused)
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Relu"]
    assert_equivalent(onnx.load(str(model_path)), fused)
    assert leftovers(outdir) == ["fused.onnx"]


def test_subprocess_module_entry_point(model_path, outdir):
    out = outdir / "fused.onnx"
    proc = run_cli([model_path, "-o", out], cwd=outdir)
    assert proc.returncode == 0, proc.stderr
    assert "repvgg" in proc.stdout
    assert out.is_file()
    assert proc.stderr == ""


def test_subprocess_usage_error_is_one_line(tmp_path):
    proc = run_cli(["--definitely-not-an-option"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert "--definitely-not-an-option" in line


def test_subprocess_version():
    proc = run_cli(["--version"])
    assert proc.returncode == 0
    assert reparam_onnx.__version__ in proc.stdout


def test_version_in_process(capsys):
    assert invoke(["--version"]) == 0
    assert reparam_onnx.__version__ in capsys.readouterr().out


def test_help(capsys):
    assert invoke(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--check", "--report", "--no-verify", "--rules", "--seed", "--rtol", "--inputs",
                   "--initializers-as-constants"):
        assert option in out


def test_quiet_prints_nothing(model_path, outdir, capfd):
    out = outdir / "fused.onnx"
    assert invoke([model_path, "-o", out, "-q"]) == 0
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert out.is_file()


def test_verbose_lists_blocks(model_path, outdir, capfd):
    assert invoke([model_path, "-o", outdir / "fused.onnx", "-v"]) == 0
    out = capfd.readouterr().out
    assert "fused [repvgg]" in out
    assert "3x3 conv+bn + 1x1 conv+bn + identity+bn" in out


def test_not_verbose_has_no_block_lines(model_path, outdir, capfd):
    assert invoke([model_path, "-o", outdir / "fused.onnx"]) == 0
    assert "fused [repvgg]" not in capfd.readouterr().out


def test_nothing_to_fuse_writes_identical_model(tmp_path, outdir, capfd):
    src = save(plain_model(), tmp_path / "plain.onnx")
    out = outdir / "plain.out.onnx"
    assert invoke([src, "-o", out]) == 0
    assert "fused 0 block(s)" in capfd.readouterr().out
    assert onnx.load(str(out)).SerializeToString() == onnx.load(str(src)).SerializeToString()


# ---------------------------------------------------------------- --check

def test_check_fusable_model_exits_1_and_writes_nothing(model_path, outdir, capfd, monkeypatch):
    monkeypatch.chdir(outdir)
    before = model_path.read_bytes()
    assert invoke([model_path, "--check"]) == 1
    out = capfd.readouterr().out
    assert "check: 1 fusable block(s) remain" in out
    assert leftovers(outdir) == []
    assert model_path.read_bytes() == before


def test_check_ignores_output_option(model_path, outdir):
    # -o with --check: still analysis only, nothing written.
    assert invoke([model_path, "--check", "-o", outdir / "x.onnx"]) == 1
    assert leftovers(outdir) == []


def test_check_on_fused_output_exits_0(model_path, outdir, capfd):
    out = outdir / "fused.onnx"
    assert invoke([model_path, "-o", out, "-q"]) == 0
    assert invoke([out, "--check"]) == 0
    assert "check: 0 fusable block(s) remain" in capfd.readouterr().out
    assert leftovers(outdir) == ["fused.onnx"]


def test_check_subprocess(model_path, outdir):
    proc = run_cli([model_path, "--check", "-q"], cwd=outdir)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert leftovers(outdir) == []


def test_check_report(model_path, tmp_path):
    report = tmp_path / "check.json"
    assert invoke([model_path, "--check", "-q", "--report", report]) == 1
    data = json.loads(report.read_text())
    assert data["exit_code"] == 1 and data["error"] is None
    assert [b["rule"] for b in data["blocks"] if b["reason"] is None] == ["repvgg"]


# ---------------------------------------------------------------- --report

def test_report_lists_every_block(tmp_path, outdir):
    src = save(mixed_model(), tmp_path / "mixed.onnx")
    report = tmp_path / "report.json"
    assert invoke([src, "-o", outdir / "mixed.out.onnx", "--report", report, "-q", "--disable-rule", "generic"]) == 0
    data = json.loads(report.read_text())
    assert data["exit_code"] == 0 and data["error"] is None
    assert data["version"] == reparam_onnx.__version__
    blocks = data["blocks"]
    for b in blocks:
        assert {"output", "input", "fused", "rule", "reason", "nodes", "shape", "kernel", "error"} <= set(b)
        assert b["nodes"] and all(isinstance(n, str) and n for n in b["nodes"])
    fused = [b for b in blocks if b["fused"]]
    unfused = [b for b in blocks if not b["fused"]]
    repvgg = next(b for b in fused if b["input"] == "x")
    assert repvgg["rule"] == "repvgg" and repvgg["reason"] is None
    assert set(repvgg["nodes"]) == {"add1", "add2", "conv1", "conv2", "batchnormalization1",
                                    "batchnormalization2", "batchnormalization3"}
    assert repvgg["kernel"] == [3, 3]
    assert 0 <= repvgg["error"] < 1e-5
    assert any("no enabled rule accepts" in (b["reason"] or "") for b in unfused)
    for b in unfused:
        assert b["reason"] and b["error"] is None
    v = data["verification"]
    assert v["ran"] is True and v["passed"] is True
    assert v["tolerance"]["rtol"] == 1e-5
    assert v["inputs"] == {"x": [2, 4, 8, 8]}
    assert all(b["output"] in v["errors"] for b in fused)
    assert all(0 <= e < 1e-5 for e in v["errors"].values())
    assert data["summary"]["fused"] == len(fused)
    assert data["summary"]["not_fused"] == len(unfused)
    assert data["ops_before"]["BatchNormalization"] == 3 and "BatchNormalization" not in data["ops_after"]
    assert data["written"] is True


def test_report_written_on_missing_input(tmp_path, outdir, capfd):
    report = tmp_path / "report.json"
    code = invoke([tmp_path / "nope.onnx", "-o", outdir / "x.onnx", "--report", report])
    assert code == 2
    line = one_error_line(capfd.readouterr().err)
    assert "nope.onnx" in line and "does not exist" in line
    data = json.loads(report.read_text())
    assert data["exit_code"] == 2
    assert "does not exist" in data["error"]
    assert leftovers(outdir) == []


def test_report_to_missing_folder_fails(model_path, tmp_path, outdir, capfd):
    code = invoke([model_path, "-o", outdir / "x.onnx", "--report", tmp_path / "no" / "r.json", "-q"])
    assert code == 2
    assert "report" in one_error_line(capfd.readouterr().err)


# ---------------------------------------------------------------- verification options

def test_no_verify(model_path, outdir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):  # pragma: no cover - must not be called
        raise AssertionError("compare called despite --no-verify")
    monkeypatch.setattr(api, "compare", boom)
    report = tmp_path / "r.json"
    out = outdir / "fused.onnx"
    assert invoke([model_path, "-o", out, "--no-verify", "--report", report, "-q"]) == 0
    assert out.is_file()
    v = json.loads(report.read_text())["verification"]
    assert v["ran"] is False and "no-verify" in v["message"]


@pytest.fixture
def compare_calls(monkeypatch):
    calls = []
    real = api.compare

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(api, "compare", spy)
    return calls


def test_seed_is_passed_and_changes_inputs(model_path, outdir, tmp_path, compare_calls):
    errors = {}
    for seed in (0, 7, 7):
        report = tmp_path / f"r{seed}.json"
        assert invoke([model_path, "-o", outdir / "f.onnx", "--seed", seed, "--report", report, "-q"]) == 0
        errors.setdefault(seed, []).append(json.loads(report.read_text())["verification"]["errors"])
    assert [c["seed"] for c in compare_calls] == [0, 7, 7]
    assert errors[7][0] == errors[7][1]          # same seed, same inputs, same figures
    assert errors[0][0] != errors[7][0]          # another seed, other inputs


def test_seed_must_be_an_integer(model_path, outdir, capfd):
    assert invoke([model_path, "-o", outdir / "f.onnx", "--seed", "abc"]) == 2
    assert "--seed" in one_error_line(capfd.readouterr().err)
    assert leftovers(outdir) == []


def test_rtol_loose(model_path, outdir, tmp_path):
    report = tmp_path / "r.json"
    assert invoke([model_path, "-o", outdir / "f.onnx", "--rtol", "1e-3", "--report", report, "-q"]) == 0
    assert json.loads(report.read_text())["verification"]["tolerance"]["rtol"] == 1e-3


def test_rtol_too_tight_leaves_blocks_unfused(model_path, outdir, tmp_path, capfd):
    """Each block is first run alone against its conv: past the tolerance it stays as it was."""
    report = tmp_path / "r.json"
    out = outdir / "f.onnx"
    assert invoke([model_path, "-o", out, "--rtol", "1e-15", "--report", report]) == 0
    (block,) = json.loads(report.read_text())["blocks"]
    assert not block["fused"] and "run alone differs" in block["reason"] and block["check"] > 1e-15


def test_rtol_too_tight_fails_verification(model_path, outdir, tmp_path, capfd):
    report = tmp_path / "r.json"
    out = outdir / "f.onnx"
    assert invoke([model_path, "-o", out, "--rtol", "1e-15", "--no-block-checks", "--report", report]) == 3
    captured = capfd.readouterr()
    line = one_error_line(captured.err)
    assert "verification failed" in line
    assert "FAILED" in captured.out
    assert not out.exists() and leftovers(outdir) == []
    data = json.loads(report.read_text())
    assert data["exit_code"] == 3 and data["verification"]["passed"] is False


def test_inputs_npz(model_path, outdir, tmp_path, compare_calls):
    x = np.random.default_rng(9).standard_normal((3, 4, 8, 8)).astype(np.float32)
    npz = tmp_path / "inputs.npz"
    np.savez(npz, x=x)
    report = tmp_path / "r.json"
    assert invoke([model_path, "-o", outdir / "f.onnx", "--inputs", npz, "--report", report, "-q"]) == 0
    assert np.array_equal(compare_calls[0]["runs"][0]["x"], x)
    v = json.loads(report.read_text())["verification"]
    assert v["passed"] and v["inputs"] == {"x": [3, 4, 8, 8]}


@pytest.mark.parametrize("content", [None, b"not a zip file", b""], ids=["missing", "garbage", "empty"])
def test_inputs_npz_unreadable(model_path, outdir, tmp_path, capfd, content):
    npz = tmp_path / "inputs.npz"
    if content is not None:
        npz.write_bytes(content)
    assert invoke([model_path, "-o", outdir / "f.onnx", "--inputs", npz]) == 2
    assert "inputs.npz" in one_error_line(capfd.readouterr().err)
    assert leftovers(outdir) == []


def test_verification_failure_exit_3_writes_nothing(model_path, outdir, tmp_path, monkeypatch, capfd):
    def failing(original, fused, block_outputs, types, **kwargs):
        names = list(block_outputs)
        return Verification(ran=True, passed=False, tolerance={"rtol": 1e-5, "atol": 0.0},
                            errors={n: 0.5 for n in names}, inputs={"x": [2, 4, 8, 8]})
    monkeypatch.setattr(api, "compare", failing)
    out = outdir / "fused.onnx"
    report = tmp_path / "r.json"
    assert invoke([model_path, "-o", out, "--report", report]) == 3
    line = one_error_line(capfd.readouterr().err)
    assert "verification failed" in line and "add2_out" in line
    assert not out.exists()
    assert leftovers(outdir) == []
    data = json.loads(report.read_text())
    assert data["exit_code"] == 3 and data["verification"]["passed"] is False
    assert data["written"] is False


def test_verification_could_not_run_exit_3(model_path, outdir, monkeypatch, capfd):
    monkeypatch.setattr(api, "compare", lambda *a, **k: Verification(ran=False, passed=False, message="no runtime"))
    assert invoke([model_path, "-o", outdir / "f.onnx", "-q"]) == 3
    assert "could not run" in one_error_line(capfd.readouterr().err)
    assert leftovers(outdir) == []


# ---------------------------------------------------------------- usage errors

def test_unknown_option(model_path, capfd):
    assert invoke([model_path, "--frobnicate"]) == 2
    captured = capfd.readouterr()
    assert "--frobnicate" in one_error_line(captured.err)
    assert captured.out == ""


def test_missing_output(model_path, capfd):
    assert invoke([model_path]) == 2
    assert "--output" in one_error_line(capfd.readouterr().err)


def test_missing_model_argument(capfd):
    assert invoke([]) == 2
    one_error_line(capfd.readouterr().err)


@pytest.mark.parametrize("spelling", ["same", "dotted"])
def test_output_equal_to_input(model_path, capfd, spelling):
    before = model_path.read_bytes()
    out = model_path if spelling == "same" else model_path.parent / "." / model_path.name
    assert invoke([model_path, "-o", out]) == 2
    assert "input" in one_error_line(capfd.readouterr().err)
    assert model_path.read_bytes() == before
    assert leftovers(model_path.parent) == ["model.onnx"]


def test_output_folder_missing(model_path, tmp_path, capfd):
    assert invoke([model_path, "-o", tmp_path / "missing" / "f.onnx"]) == 2
    assert "does not exist" in one_error_line(capfd.readouterr().err)
    assert not (tmp_path / "missing").exists()


def test_output_is_a_directory(model_path, outdir, capfd):
    assert invoke([model_path, "-o", outdir]) == 2
    assert "directory" in one_error_line(capfd.readouterr().err)
    assert leftovers(outdir) == []


# ---------------------------------------------------------------- bad inputs

def _truncated(path: Path) -> None:
    data = repvgg_model().SerializeToString()
    path.write_bytes(data[: len(data) * 2 // 3])


BAD_INPUTS = {
    "missing": (None, "does not exist"),
    "directory": ("dir", "directory"),
    "empty": (b"", "empty"),
    "random": (np.random.default_rng(0).bytes(4096), "not an ONNX model"),
    "text": (b"hello, this is not a model\nsecond line\n", "not"),
    "truncated": (_truncated, "not"),
}


def _make_bad(kind: str, folder: Path) -> Path:
    content, _ = BAD_INPUTS[kind]
    path = folder / f"bad_{kind}.onnx"
    if content == "dir":
        path.mkdir()
    elif callable(content):
        content(path)
    elif content is not None:
        path.write_bytes(content)
    return path


def _snapshot(path: Path):
    if path.is_file():
        return path.read_bytes()
    return path.is_dir()


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_in_process(kind, tmp_path, outdir, capfd):
    src = _make_bad(kind, tmp_path)
    before = _snapshot(src)
    assert invoke([src, "-o", outdir / "f.onnx"]) == 2
    captured = capfd.readouterr()
    line = one_error_line(captured.err)
    assert src.name in line
    assert BAD_INPUTS[kind][1] in line
    assert "internal error" not in line
    assert _snapshot(src) == before
    assert leftovers(outdir) == []     # neither the output nor a '.'-prefixed temp file


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_bad_input_subprocess(kind, tmp_path, outdir):
    src = _make_bad(kind, tmp_path)
    before = src.read_bytes()
    proc = run_cli([src, "-o", outdir / "f.onnx"], cwd=tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert src.name in line
    assert src.read_bytes() == before
    assert leftovers(outdir) == []


# ---------------------------------------------------------------- --rules



def test_user_rule_dir(model_path, outdir, tmp_path, capfd):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "my_rule.toml").write_text(MY_RULE, encoding="utf-8")
    report = tmp_path / "r.json"
    assert invoke([model_path, "-o", outdir / "f.onnx", "--rules", rules, "--report", report]) == 0
    assert "my_rule" in capfd.readouterr().out
    data = json.loads(report.read_text())
    assert [b["rule"] for b in data["blocks"]] == ["my_rule"]
    assert data["summary"]["per_rule"] == {"my_rule": 1}


@pytest.mark.parametrize("text, words", [
    (MY_RULE + 'colour = "blue"\n', ["unknown key", "colour"]),
    (MY_RULE.replace('name = "my_rule"', 'name = "repvgg"'), ["defined twice"]),
    ("name = [unclosed\n", ["not valid TOML"]),
    (MY_RULE.replace('kind = "identity"', 'kind = "magic"'), ["kind"]),
], ids=["unknown-key", "duplicate-name", "bad-toml", "bad-kind"])
def test_invalid_user_rule(model_path, outdir, tmp_path, capfd, text, words):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "broken.toml").write_text(text, encoding="utf-8")
    assert invoke([model_path, "-o", outdir / "f.onnx", "--rules", rules]) == 2
    line = one_error_line(capfd.readouterr().err)
    for word in words:
        assert word in line
    assert leftovers(outdir) == []


def test_rules_dir_missing(model_path, outdir, tmp_path, capfd):
    assert invoke([model_path, "-o", outdir / "f.onnx", "--rules", tmp_path / "nowhere"]) == 2
    assert "does not exist" in one_error_line(capfd.readouterr().err)


def test_user_rule_dir_subprocess(model_path, outdir, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "my_rule.toml").write_text(MY_RULE.replace("priority = 1000\n", "priority = 1000\nbogus = 1\n"),
                                        encoding="utf-8")
    proc = run_cli([model_path, "-o", outdir / "f.onnx", "--rules", rules], cwd=tmp_path)
    assert proc.returncode == 2
    assert "bogus" in one_error_line(proc.stderr)


@pytest.mark.parametrize("args", [["--seed", "-1"], ["--rtol", "-1e-5"], ["--atol", "-1"]],
                         ids=["seed", "rtol", "atol"])
def test_negative_numbers_are_usage_errors(model_path, outdir, capfd, args):
    assert invoke([model_path, "-o", outdir / "f.onnx", *args]) == 2
    assert args[0] in one_error_line(capfd.readouterr().err)
    assert leftovers(outdir) == []


# ---------------------------------------------------------------- a report never overwrites the input or the model

def test_report_path_equal_to_input_is_rejected(model_path, outdir):
    before = model_path.read_bytes()
    code = invoke([model_path, "-o", outdir / "f.onnx", "--report", model_path, "-q"])
    assert model_path.read_bytes() == before
    assert code == 2


def test_report_path_equal_to_output_is_rejected(model_path, outdir):
    out = outdir / "f.onnx"
    code = invoke([model_path, "-o", out, "--report", out, "-q"])
    assert code == 2
    assert not out.exists()


# ---------------------------------------------------------------- python -m reparam_onnx

def run_module(args, cwd=None):
    """`python -m reparam_onnx ARGS` in a subprocess."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "reparam_onnx", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_python_dash_m_fuses(model_path, outdir):
    out = outdir / "fused.onnx"
    proc = run_module([model_path, "-o", out])
    assert proc.returncode == 0, proc.stderr
    assert "fused 1 block(s): 1 repvgg" in proc.stdout and proc.stderr == ""
    assert_equivalent(onnx.load(str(model_path)), onnx.load(str(out)))


@pytest.mark.parametrize("args, code", [(["--check"], 1), (["-o", "{out}"], 0), (["--bogus"], 2),
                                        (["--version"], 0)], ids=["check", "fuse", "usage", "version"])
def test_python_dash_m_has_the_commands_exit_codes(args, code, model_path, outdir):
    args = [a.format(out=outdir / "f.onnx") for a in args]
    via_module = run_module([model_path, *args])
    via_cli = run_cli([model_path, *args])
    assert via_module.returncode == via_cli.returncode == code
    assert via_module.stdout.replace(str(outdir), "") == via_cli.stdout.replace(str(outdir), "")
    if code == 2:
        assert one_error_line(via_module.stderr) == one_error_line(via_cli.stderr)


def test_python_dash_m_bad_input_is_one_line(tmp_path, outdir):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    proc = run_module([bad, "-o", outdir / "f.onnx"])
    assert proc.returncode == 2
    assert "bad.onnx" in one_error_line(proc.stderr)
    assert leftovers(outdir) == []


# ---------------------------------------------------------------- --report - and --summary

def test_report_to_stdout_puts_the_lines_on_stderr(model_path, outdir):
    proc = run_module([model_path, "-o", outdir / "f.onnx", "--report", "-", "-v"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["exit_code"] == 0 and data["blocks"][0]["rule"] == "repvgg"
    assert data["model"] == str(model_path) and data["output"] == str(outdir / "f.onnx")
    assert "fused [repvgg]" in proc.stderr and f"wrote {outdir / 'f.onnx'}" in proc.stderr


def test_report_to_stdout_on_error(tmp_path, outdir):
    proc = run_module([tmp_path / "nope.onnx", "-o", outdir / "f.onnx", "--report", "-"])
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["exit_code"] == 2
    assert "does not exist" in one_error_line(proc.stderr)


def test_report_to_stdout_quiet_check(model_path, capfd):
    assert invoke([model_path, "--check", "-q", "--report", "-"]) == 1
    captured = capfd.readouterr()
    assert json.loads(captured.out)["exit_code"] == 1 and captured.err == ""


def test_report_names_a_file_called_dash_with_a_path(model_path, outdir, monkeypatch):
    monkeypatch.chdir(outdir)
    assert invoke([model_path, "--check", "-q", "--report", "./-"]) == 1
    assert json.loads((outdir / "-").read_text())["exit_code"] == 1


def test_summary_prints_the_numeric_risk(model_path, outdir, capfd):
    assert invoke([model_path, "-o", outdir / "f.onnx", "--summary"]) == 0
    out = capfd.readouterr().out
    assert "numeric risk of the 1 fused block(s):" in out
    assert "float16 range" in out and "int8 limit 16x" in out
    assert out.index("numeric risk") < out.index("wrote ")


def test_report_has_the_numeric_risk(model_path, outdir, tmp_path):
    report = tmp_path / "r.json"
    assert invoke([model_path, "-o", outdir / "f.onnx", "--report", report, "-q"]) == 0
    data = json.loads(report.read_text())
    risk = data["blocks"][0]["risk"]
    assert set(risk) == {"weight_min", "weight_max", "bias_min", "bias_max", "channel_spread", "int8_error",
                         "int8_error_per_channel", "warnings"}
    assert data["summary"]["risk"]["blocks"] == 1
    assert data["summary"]["risk"]["channel_spread_max"] == risk["channel_spread"]


def test_help_lists_the_batch_and_risk_options(capsys):
    assert invoke(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("MODEL...", "--out-dir", "-j, --jobs", "--summary", "--report"):
        assert option in out
