"""Newer re-parameterization families (fixtures/families, made by fixtures/export_families.py):
the exact ones fuse to (at most) their deploy form, matching PyTorch in float64; the inexact
ones keep their unsafe step and the report says why."""
from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest

from conftest import FIXTURES, assert_matches_the_framework, load_npz, max_rel_error, run_model
from reparam_onnx import fuse_with_report

FAMILIES = FIXTURES / "families"
MANIFEST = json.loads((FAMILIES / "manifest.json").read_text())
CASES = [(family, variant) for family, info in MANIFEST["families"].items()
         for variant in info["variants"]]
# TorchScript writes DBB's BNAndPadLayer border writes as ScatterND over an index grid of the
# data's dims; traced at batch 2 with a dynamic batch, it also expands the updates to the traced
# [2, C, 1, W] and reshapes them to the grid (those exports run at batch 2 only): all fuse.
EXACT = [(f, v) for f, v in CASES if MANIFEST["families"][f]["exact"]]
EXACT_IDS = [f"{f}.{v}" for f, v in CASES if MANIFEST["families"][f]["exact"]]
INEXACT = [c for c in CASES if not MANIFEST["families"][c[0]]["exact"]]


def _ids(cases):
    return [f"{f}.{v}" for f, v in cases]


def _counts(model):
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("family,variant", EXACT, ids=EXACT_IDS)
def test_exact_family_fuses_to_deploy_form(family, variant):
    info = MANIFEST["families"][family]
    path = FAMILIES / f"{family}.{variant}.onnx"
    result = fuse_with_report(str(path))
    counts = _counts(result.model)
    deploy = info["deploy_op_counts"]
    over = {op: (counts[op], limit) for op, limit in deploy.items() if counts[op] > limit}
    assert not over, f"op (fused, deploy): {over}"
    assert not result.report.unfused, [b.reason for b in result.report.unfused]
    assert result.report.verification.passed

    assert_matches_the_framework(result.model, path, FAMILIES / f"{family}.io.npz")


@pytest.mark.parametrize("family,variant", INEXACT, ids=_ids(INEXACT))
def test_inexact_family_keeps_its_unsafe_step(family, variant):
    info = MANIFEST["families"][family]
    path = FAMILIES / f"{family}.{variant}.onnx"
    original = onnx.load(str(path))
    result = fuse_with_report(str(path))
    counts = _counts(result.model)
    short = {op: (counts[op], n) for op, n in info["must_keep"].items() if counts[op] < n}
    assert not short, f"{info['condition']}: op (left, must keep): {short}"
    assert any(b.reason for b in result.report.blocks), \
        f"no block names why it stays ({info['condition']})"

    io = load_npz(FAMILIES / f"{family}.io.npz")
    feeds = {original.graph.input[0].name: io["input"]}
    (out,) = run_model(result.model, feeds).values()
    assert max_rel_error(io["output_f64"], out) <= 1e-5


@pytest.mark.parametrize("family", sorted(f for f, i in MANIFEST["families"].items() if i["exact"]))
def test_native_deploy_export_is_untouched(family):
    """The family's own re-parameterized export has nothing to fuse and comes out byte-identical."""
    path = FAMILIES / f"{family}.deploy.onnx"
    result = fuse_with_report(str(path))
    assert not result.report.fused
    assert result.model.SerializeToString() == onnx.load(str(path)).SerializeToString()


def test_manifest_covers_the_families():
    fams = MANIFEST["families"]
    assert {"dbb", "dbb_s2", "dbb_padop", "dbb_naive", "avgpool_branch", "avgpool_exclude",
            "orepa", "prebn", "prebn_padded", "prebn_linear", "linear_bn", "bn_linear",
            "repvit_head", "mobileone_dense", "mobileone_dense_s2"} <= set(fams)
    for family, info in fams.items():
        assert info["exact"] == (info["deploy_op_counts"] is not None), family
        assert info["exact"] or (info["condition"] and info["must_keep"]), family
        for variant in info["variants"]:
            assert (FAMILIES / f"{family}.{variant}.onnx").is_file(), (family, variant)
            assert variant in info["train_op_counts"], (family, variant)
