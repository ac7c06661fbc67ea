"""The README stays true: its first two commands, its rule table, the tests it cites."""
from __future__ import annotations

import re

from conftest import ROOT
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
