"""Real TensorFlow/Keras, PaddlePaddle and JAX exports (fixtures/{tf,paddle,jax}, made by
fixtures/export_*.py) fuse to one Conv per block, exact against the framework's own output."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import FIXTURES, load_npz, max_rel_error, run_model
from reparam_onnx import fuse_with_report

FRAMEWORKS = ("tf", "paddle", "jax")


def _cases():
    for fw in FRAMEWORKS:
        path = FIXTURES / fw / "manifest.json"
        if not path.exists():
            continue
        entries = json.loads(path.read_text())["fixtures"]
        if isinstance(entries, dict):
            entries = [dict(e, file=e.get("file", k if k.endswith(".onnx") else f"{k}.onnx"))
                       for k, e in entries.items()]
        for entry in entries:
            yield pytest.param(fw, entry, id=f"{fw}/{entry['file']}")


CASES = list(_cases())


@pytest.mark.parametrize("framework,entry", CASES)
def test_export_fuses_exactly(framework, entry):
    folder = FIXTURES / framework
    path = folder / entry["file"]
    result = fuse_with_report(str(path))
    counts = Counter(n.op_type for n in result.model.graph.node)
    for op, n in entry["expected_fused_op_counts"].items():
        assert counts.get(op, 0) == n, f"{op}: {counts.get(op, 0)} != {n} in {dict(counts)}"
    expected = entry["expected_fused_op_counts"]
    assert not set(counts) - set(expected) & {"Add", "Sub", "Mul", "Div", "BatchNormalization", "Pad"}, dict(counts)
    blocks = entry.get("blocks", entry.get("repvgg_blocks"))
    unfusable = expected.get("Add", 0)   # blocks the exporter made unfusable (dynamic SAME at stride 2)
    assert len(result.report.fused) == blocks - unfusable
    assert len(result.report.unfused) == unfusable
    assert result.report.verification.passed

    io = load_npz(folder / entry["file"].replace(".onnx", ".io.npz"))
    feeds = {result.model.graph.input[0].name: io["input"]}
    (out,) = run_model(result.model, feeds).values()
    assert max_rel_error(io["output"], out) <= 1e-5


def test_every_framework_has_fixtures():
    assert {c.values[0] for c in CASES} == set(FRAMEWORKS)


@pytest.mark.parametrize("framework,entry", CASES)
def test_fused_export_fuses_to_itself(framework, entry):
    """A real export with nothing fusable (the fused one) comes out unchanged."""
    first = fuse_with_report(str(FIXTURES / framework / entry["file"])).model
    again = fuse_with_report(first)
    assert not again.report.fused
    assert again.model.SerializeToString() == first.SerializeToString()
