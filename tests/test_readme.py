"""The README stays true: its first two commands, its rule table, the tests it cites, and
its examples: shell lines, `$ command` outputs and Python blocks run as they are written."""
from __future__ import annotations

import re

import pytest

from conftest import MY_RULE, ROOT
from reparam_onnx.rulebook import load_rules

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_opens_with_the_two_commands():
    first_block = README.split("```sh", 1)[1].split("```", 1)[0].strip().splitlines()
    assert first_block[0].startswith("pip install . && reparam-onnx fixtures/")
    model = first_block[0].split("reparam-onnx ", 1)[1].split()[0]
    assert (ROOT / model).is_file()
    assert first_block[1] == 'pip install ".[test]" && python -m pytest -q'
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_rule_table_lists_every_rule():
    for rule in load_rules():
        assert re.search(rf"^\| `{rule.name}` \| {rule.priority} \|", README, re.M), rule.name


def test_reason_code_table_lists_every_code():
    from reparam_onnx.report import REASON_CODES
    for code, meaning in REASON_CODES.items():
        assert f"| `{code}` | {meaning} |" in README, code


def test_cited_tests_exist():
    cited = re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?`", README)
    assert len(cited) >= 10
    for module, name in cited:
        text = (ROOT / "tests" / module).read_text()
        if name:
            assert re.search(rf"^def {name}\(", text, re.M), f"{module}::{name}"


def test_short_citations_exist():
    """`::test_name` after a full citation refers to the same module."""
    for line in README.splitlines():
        modules = re.findall(r"`(test_\w+\.py)::", line)
        for name in re.findall(r"`::(test_\w+)`", line):
            text = (ROOT / "tests" / modules[-1]).read_text()
            assert re.search(rf"^def {name}\(", text, re.M), f"{modules[-1]}::{name}"


# ---------------------------------------------------------------- the README's examples run

RUNNABLE_SECTIONS = ["Use", "Python", "Many models", "Numeric risk: float16 and int8", "pre-commit"]


def section(title: str) -> str:
    """The text under a '## title' or '### title' heading, up to the next heading."""
    match = re.search(rf"^#{{2,3}} {re.escape(title)}\n(.*?)(?=^#{{2,3}} )", README, re.M | re.S)
    assert match, title
    return match[1]


def blocks(text: str):
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w+)\n(.*?)^```", text, re.M | re.S)


def expected_code(line: str) -> int:
    """What a command line's comment promises: '# ... exit N ...', else 0."""
    comment = line.split("#", 1)[1] if "#" in line else ""
    found = re.search(r"\bexit (\d)\b", comment)
    return int(found[1]) if found else 0


def masked(text: str) -> list:
    """Output lines with the float figures that vary with the machine (verification errors) masked."""
    return [re.sub(r"\d\.\d+e[-+]\d+", "<figure>", line) for line in text.rstrip("\n").splitlines()]


@pytest.fixture
def workspace(tmp_path):
    """The files the README's examples name: training-form models, a folder of them, deploy
    models, a rule folder, verification inputs."""
    import numpy as np
    import shutil
    torch = ROOT / "fixtures" / "torch"
    shutil.copy(torch / "repvgg_a0_small.ts_cf.onnx", tmp_path / "model_train.onnx")
    shutil.copy(torch / "repvgg.ts_cf.onnx", tmp_path / "m.onnx")
    shutil.copy(ROOT / "fixtures" / "tf" / "keras3_dynhw_op17_opt.onnx", tmp_path / "keras_model.onnx")
    for folder, variant in (("models", "ts_cf"), ("deploy", "deploy")):
        (tmp_path / folder).mkdir()
        for family in ("repvgg", "acb", "mobileone"):
            shutil.copy(torch / f"{family}.{variant}.onnx", tmp_path / folder / f"{family}.onnx")
    (tmp_path / "my_rules").mkdir()
    (tmp_path / "my_rules" / "my_rule.toml").write_text(MY_RULE)
    np.savez(tmp_path / "sample.npz", input=np.random.default_rng(0).standard_normal((1, 3, 33, 31), np.float32))
    return tmp_path


@pytest.mark.parametrize("title", RUNNABLE_SECTIONS)
def test_examples_run(title, workspace, monkeypatch):
    """Every shell line exits as its comment says (0 unless '# ... exit N'); every '$ command'
    output block is what the command prints; the Python examples run."""
    from shell import sh, user_env
    env = user_env(workspace / ".bin")
    ran = 0
    for language, body in blocks(section(title)):
        if language == "sh":
            for line in filter(str.strip, body.splitlines()):
                proc = sh(line, workspace, env)
                assert proc.returncode == expected_code(line), f"{line}\n{proc.stdout}{proc.stderr}"
                assert "Traceback" not in proc.stderr, line
                ran += 1
        elif language == "text" and body.startswith("$ "):
            command, *expected = body.rstrip("\n").splitlines()
            proc = sh(command[2:], workspace, env)
            assert proc.returncode == 0, proc.stderr
            assert masked(proc.stdout) == masked("\n".join(expected)), command
            ran += 1
        elif language == "python":
            monkeypatch.chdir(workspace)
            exec(compile(body, f"README.md ({title})", "exec"), {})
            ran += 1
    assert ran, f"nothing runnable under {title!r}"


def test_examples_cover_the_entry_points():
    """The runnable examples show `python -m`, a folder batch, --check, --report - and the
    pre-commit hook's entry on several files."""
    lines = [line for title in RUNNABLE_SECTIONS for language, body in blocks(section(title)) if language == "sh"
             for line in body.splitlines()]
    for needle in ("python -m reparam_onnx ", "models/ --out-dir deploy/", "--check", "--report -", "--summary"):
        assert any(needle in line for line in lines), needle
    assert any(line.startswith("reparam-onnx --check ") and line.count(".onnx") >= 2 for line in lines)


def test_readme_yaml_hook_is_the_repositorys():
    """The remote configuration names the hook this repository offers."""
    import importlib.util
    if importlib.util.find_spec("yaml") is None:
        pytest.skip("PyYAML is in the test extra")
    import yaml
    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    configs = [yaml.safe_load(body) for language, body in blocks(section("pre-commit")) if language == "yaml"]
    ids = {h["id"] for config in configs for repo in config["repos"] for h in repo["hooks"]}
    assert ids == {hook["id"]}
