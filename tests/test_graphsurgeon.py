"""Why reparam-onnx keeps its own graph index rather than onnx-graphsurgeon: the README's
figures (benchmarks/graphsurgeon_roundtrip.py) hold, and its graphsurgeon pipeline example
runs."""
from __future__ import annotations

import re
import shutil
import sys

import onnx
import pytest

from conftest import FIXTURES, ROOT, assert_equivalent

pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon is in the test extra")
sys.path.insert(0, str(ROOT / "benchmarks"))
import graphsurgeon_roundtrip as roundtrip  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")
SECTION = README.split("### onnx-graphsurgeon", 1)[1].split("\n## ", 1)[0]


def test_readme_table_is_the_measured_round_trip():
    fixture = "torch/repvgg.dynamo.onnx"
    for line in roundtrip.markdown(fixture, roundtrip.compare(fixture)):
        assert line in SECTION, line


@pytest.mark.parametrize("fixture, order", [("torch/repvgg_a0_small.ts_cf.onnx", "changed"),
                                            ("tf/keras3_nhwc_op17_opt.onnx", "kept")])
def test_initializer_order_as_the_readme_says(fixture, order):
    rows = {r["fact"]: r for r in roundtrip.compare(fixture)}
    assert rows["initializer order"]["graphsurgeon"] == order
    assert rows["initializer order"]["reparam-onnx"] == "kept"
    n = len(onnx.load(str(FIXTURES / fixture)).graph.initializer)
    assert (f"{n} initializers are reordered" in SECTION) == (order == "changed")


def test_round_trip_losses_are_what_reparam_onnx_keeps():
    """Across the fixtures the round trip keeps none of the annotations reparam-onnx keeps on
    every node and tensor that survives the fuse."""
    for fixture in roundtrip.FIXTURES:
        for r in roundtrip.compare(fixture):
            fused = r["reparam-onnx"]
            assert fused == "kept" or re.fullmatch(r"kept (\d+) of \1", fused), (fixture, r)


def test_export_copies_every_weight(tmp_path):
    gs, ours = (roundtrip.memory(tool, tmp_path) for tool in ("graphsurgeon", "reparam-onnx"))
    assert gs["added"] > 1.8 * gs["weights"]          # the loaded weights and the export's copy
    assert ours["added"] < 1.5 * ours["weights"]      # the loaded weights, edited in place
    quoted = re.search(r"holds ([\d.]+)x their bytes, reparam-onnx's load and fuse ([\d.]+)x", SECTION)
    assert quoted, "the README's memory figures"
    assert abs(float(quoted[1]) - gs["added"] / gs["weights"]) < 0.3
    assert abs(float(quoted[2]) - ours["added"] / ours["weights"]) < 0.3


def test_readme_pipeline_example_runs(tmp_path, monkeypatch):
    (code,) = re.findall(r"```python\n(.*?)```", SECTION, re.S)
    shutil.copy(FIXTURES / "torch" / "repvgg.ts_cf.onnx", tmp_path / "model_train.onnx")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (onnx-graphsurgeon)", "exec"), {})
    deploy = onnx.load("model_deploy.onnx")
    assert sorted({n.op_type for n in deploy.graph.node}) == ["Conv", "Relu"]
    assert_equivalent(onnx.load("model_train.onnx"), deploy)
