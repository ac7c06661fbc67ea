"""The README's "Compared with" table is what benchmarks/compare_tools.py measures: for every
tool installed, its row (figures exact when the installed version is the README's, the
verdict whatever the version)."""
from __future__ import annotations

import re
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_tools  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")
SECTION = README.split("## Compared with", 1)[1].split("\n## ", 1)[0]
TABLE = [line for line in SECTION.splitlines() if line.startswith("| ")][1:]   # without the header


def readme_row(label: str) -> str:
    """The README's row of a tool, by its label (the version follows it)."""
    (line,) = [line for line in TABLE if re.match(rf"\| {re.escape(label)}( [\w.+-]+)? \|", line)]
    return line


@pytest.fixture(scope="module")
def measured():
    return compare_tools.measure()


def test_readme_table_has_every_tool_and_the_header():
    assert compare_tools.HEADER[0] in SECTION
    for label, _, _ in compare_tools.TOOLS:
        readme_row(label)
    assert len(TABLE) == len(compare_tools.TOOLS) + 1


def test_input_row(measured):
    (row,) = [r for key, r in measured.items() if key == "input"]
    assert row.markdown() in TABLE


@pytest.mark.parametrize("label", [label for label, _, _ in compare_tools.TOOLS])
def test_tool_row(label, measured):
    if label not in measured:
        pytest.skip(f"{label} is not installed (the test extra installs it)")
    row, line = measured[label], readme_row(label)
    if f"| {label} {row.version} |" in line:
        assert row.markdown() == line
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert (row.merged, cells[-1]) == (label == "reparam-onnx", "yes" if label == "reparam-onnx" else "no")


def test_only_reparam_onnx_merges_the_branches(measured):
    blocks = measured["input"].left
    assert blocks == 22
    for label, row in measured.items():
        if label in ("input", "reparam-onnx"):
            continue
        assert row.convs > blocks and not row.merged, label
        assert row.left in (blocks, None), label
    assert measured["reparam-onnx"].convs == blocks and measured["reparam-onnx"].left == 0
