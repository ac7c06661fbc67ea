"""Real PyTorch exports (fixtures/torch, made by fixtures/export_torch.py) fuse fully and exactly."""
from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest

from conftest import FIXTURES, assert_matches_the_framework
from reparam_onnx import fuse_with_report

TORCH = FIXTURES / "torch"
MANIFEST = json.loads((TORCH / "manifest.json").read_text())
HELPER_OPS = set(MANIFEST["notes"].split("helper ops ")[1].split(","))
CASES = [(family, variant) for family, info in MANIFEST["families"].items()
         for variant in info["variants"] if variant != "deploy"]


def _counts(model):
    return {op: n for op, n in Counter(n.op_type for n in model.graph.node).items() if op not in HELPER_OPS}


@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}.{v}" for f, v in CASES])
def test_export_fuses_to_deploy_form(family, variant, tmp_path):
    info = MANIFEST["families"][family]
    path = TORCH / f"{family}.{variant}.onnx"
    result = fuse_with_report(str(path))
    assert _counts(result.model) == info["expected_fused_op_counts"]
    left = {n.op_type for n in result.model.graph.node}
    assert not left & {"Add", "BatchNormalization", "Shape", "Expand", "CastLike", "Identity"}, left
    assert not result.report.unfused, [b.reason for b in result.report.unfused]
    assert result.report.verification.passed

    assert_matches_the_framework(result.model, path, TORCH / f"{family}.io.npz")


def test_every_family_has_a_real_export():
    names = {f for f, _ in CASES}
    assert {"repvgg", "acb", "mobileone", "replknet", "yolo_repconv", "qarepvgg", "conv_bn",
            "repvgg_a0_small"} <= names


def test_a0_shaped_model_names_its_blocks():
    result = fuse_with_report(str(TORCH / "repvgg_a0_small.ts_nocf.onnx"))
    assert Counter(b.rule for b in result.report.fused) == {"repvgg": 22}


def test_external_data_export_writes_external_data(tmp_path):
    from reparam_onnx import io
    result = fuse_with_report(str(TORCH / "repvgg.ts_extdata.onnx"))
    assert result.external_data
    out = tmp_path / "deploy.onnx"
    io.save(result.model, out, external=True)
    assert (tmp_path / "deploy.onnx.data").is_file()
    reloaded = onnx.load(str(out))
    assert _counts(reloaded) == MANIFEST["families"]["repvgg"]["expected_fused_op_counts"]


@pytest.mark.parametrize("family", sorted(MANIFEST["families"]))
def test_native_deploy_export_is_untouched(family):
    """PyTorch's own re-parameterized export has nothing to fuse and comes out byte-identical."""
    path = TORCH / f"{family}.deploy.onnx"
    result = fuse_with_report(str(path))
    assert not result.report.fused
    assert result.model.SerializeToString() == onnx.load(str(path)).SerializeToString()
