"""Numeric risk of the fused weights: the figures, the float16 and int8 warnings and their
thresholds, and where they show (-v, the default warning lines, --summary, the JSON report)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import Builder, invoke, repvgg_block
from reparam_onnx import fuse_with_report
from reparam_onnx.risk import FLOAT16, FLOAT16_MAX, INT8, SPREAD_LIMIT, numeric_risk, summary, summary_lines

SHAPE = ["N", 4, 8, 8]


def kernel_with_ranges(ranges, size=(3, 3), seed=0) -> np.ndarray:
    """A [C, 2, k, k] kernel whose channel o has max|W[o]| = ranges[o]."""
    w = np.random.default_rng(seed).uniform(-1, 1, (len(ranges), 2) + size)
    w /= np.abs(w).reshape(len(ranges), -1).max(axis=1)[:, None, None, None]
    return w * np.asarray(ranges, dtype=np.float64)[:, None, None, None]


# ---------------------------------------------------------------- the figures

def test_figures():
    w = kernel_with_ranges([1.0, 0.5, 0.25, 0.0])
    b = np.array([-3.0, 0.0, 2.0, 7.0])
    r = numeric_risk(w, b)
    assert (r.weight_min, r.weight_max) == (w.min(), w.max())
    assert (r.bias_min, r.bias_max) == (-3.0, 7.0)
    assert r.channel_spread == pytest.approx(4.0)        # the all-zero channel quantizes exactly: not counted
    assert r.warnings == []


def test_one_channel_or_all_zero_has_no_spread():
    assert numeric_risk(kernel_with_ranges([2.0]), np.zeros(1)).channel_spread == 1.0
    assert numeric_risk(np.zeros((3, 1, 1, 1)), np.zeros(3)).channel_spread == 1.0


def _whole_array_risk(w, b):
    """The figures computed on the whole kernel at once (the formulas numeric_risk takes a block
    of channels at a time): (weight and bias extremes, spread, per-tensor and per-channel error)."""
    w, b = np.asarray(w), np.asarray(b, np.float64)
    flat = w.reshape(w.shape[0], -1)
    ranges = np.max(np.abs(flat), axis=1, initial=0.0).astype(np.float64)
    live = ranges[ranges > 0]
    channels = flat.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", channels, channels, dtype=np.float64))

    def error(r):
        step = (r / 127)[:, None]
        safe = np.where(step > 0, step, 1.0)
        e = np.clip(np.round(channels / safe), -127, 127) * safe - channels
        errors = np.sqrt(np.einsum("ij,ij->i", e, e, dtype=np.float64))
        return float(np.max(np.where(norms > 0, errors / np.where(norms > 0, norms, 1.0), 0.0), initial=0.0))
    return (float(w.min()), float(w.max()), float(b.min()), float(b.max()),
            float(live.max() / live.min()) if live.size > 1 else 1.0,
            error(np.full_like(ranges, ranges.max(initial=0.0))), error(ranges))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 1, 1, 1), (64, 64, 3, 3), (7, 9000, 1, 1), (1, 70000, 1, 1),
                                   (70000, 1, 1, 1), (333, 17, 5, 5), (2, 3)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_figures_are_those_of_the_whole_array(shape, dtype):
    """numeric_risk reads a block of channels at a time; every figure is the whole-array one, bit for bit."""
    rng = np.random.default_rng(sum(shape))
    w = rng.normal(size=shape) * np.exp(rng.normal(0, 2, shape[0])).reshape((-1,) + (1,) * (len(shape) - 1))
    w, b = w.astype(dtype), rng.normal(size=shape[0])
    r = numeric_risk(w, b)
    got = (r.weight_min, r.weight_max, r.bias_min, r.bias_max, r.channel_spread, r.int8_error,
           r.int8_error_per_channel)
    assert got == _whole_array_risk(w, b)


@pytest.mark.parametrize("spread, warned", [(SPREAD_LIMIT, False), (SPREAD_LIMIT * 1.01, True), (1000.0, True)])
def test_int8_warning_past_the_spread_limit(spread, warned):
    r = numeric_risk(kernel_with_ranges([1.0, 0.7, 1.0 / spread]), np.zeros(3))
    assert r.channel_spread == pytest.approx(spread)
    assert (INT8 in r.warnings) is warned


@pytest.mark.parametrize("where, value, warned", [("weight", FLOAT16_MAX, False), ("weight", 70000.0, True),
                                                  ("weight", -70000.0, True), ("bias", 70000.0, True)])
def test_float16_warning_outside_its_range(where, value, warned):
    w = kernel_with_ranges([1.0, 1.0])
    b = np.zeros(2)
    (w if where == "weight" else b).flat[0] = value
    assert (FLOAT16 in numeric_risk(w, b).warnings) is warned


def test_int8_error_is_what_rounding_does():
    """On the int8 grid there is no error; a channel 100x narrower than the widest keeps about
    1.3 levels per tensor (its weights mostly round to 0 or ±1 step) and ~127 per channel."""
    grid = np.arange(-127, 128, dtype=np.float64).reshape(5, 1, 51, 1) / 127 * 2.0
    grid[:, :, 0] = 2.0                                     # every channel's range is 2: one step for all
    assert numeric_risk(grid, np.zeros(5)).int8_error == pytest.approx(0.0, abs=1e-12)
    r = numeric_risk(kernel_with_ranges([1.0] * 7 + [0.01], size=(7, 7)), np.zeros(8))
    assert r.int8_error > 0.3                               # the narrow channel is mostly lost
    assert r.int8_error_per_channel < 0.01                  # per channel, every channel keeps 127 levels


def test_spread_predicts_the_int8_error():
    """The module docstring's estimate: at spread S the narrowest channel's per-tensor error
    is about S/147 of its weights for bell-shaped weights (checked to within a factor 2)."""
    rng = np.random.default_rng(1)
    for spread in (4.0, 16.0, 40.0):
        w = rng.normal(0, 1, (16, 64, 3, 3))
        w /= np.abs(w).reshape(16, -1).max(axis=1)[:, None, None, None] / 3.0   # max ≈ 3σ... then exactly 3
        w[-1] /= spread
        r = numeric_risk(w, np.zeros(16))
        assert r.channel_spread == pytest.approx(spread)
        assert spread / 147 / 2 < r.int8_error < spread / 147 * 2


def test_summary_figures():
    a = numeric_risk(kernel_with_ranges([1.0, 0.5]), np.array([0.0, 1.0]))
    b = numeric_risk(kernel_with_ranges([1.0, 0.01]), np.array([-2.0, 0.0]))
    figures = summary([("a", a), ("b", b), ("c", None)])
    assert figures["blocks"] == 2
    assert figures["channel_spread_max"] == pytest.approx(100.0) and figures["channel_spread_max_block"] == "b"
    assert (figures["bias_min"], figures["bias_max"]) == (-2.0, 1.0)
    assert figures["warnings"] == {INT8: 1}
    text = "\n".join(summary_lines(figures))
    assert "numeric risk of the 2 fused block(s):" in text
    assert "up to 100x (b): above the int8 limit 16x" in text
    assert "inside the float16 range" in text
    assert "warning: 1 fused block(s): per-output-channel weight ranges spread more than 16x" in text
    assert summary([]) == {"blocks": 0}
    assert summary_lines(summary([])) == ["numeric risk: no fused blocks"]


# ---------------------------------------------------------------- on models

def block_model(gamma=None, var=None, seed=0) -> onnx.ModelProto:
    """x → RepVGG block → Relu; `gamma`/`var` replace the BN parameters of every branch."""
    b = Builder(seed)
    x = b.input(SHAPE)
    model = b.model(b.node("Relu", [repvgg_block(b, x, 4, 4)]))
    for t in model.graph.initializer:
        if gamma is not None and t.name.startswith("gamma"):
            t.CopyFrom(numpy_helper.from_array(np.asarray(gamma, np.float32), t.name))
        if var is not None and t.name.startswith("var"):
            t.CopyFrom(numpy_helper.from_array(np.asarray(var, np.float32), t.name))
    return model


def test_fused_block_carries_the_figures_of_its_weights():
    result = fuse_with_report(block_model())
    (block,) = result.report.blocks
    weight = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name.endswith("reparam.weight"))
    bias = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name.endswith("reparam.bias"))
    expected = numeric_risk(weight, bias)   # of the float32 weights; the report's are of the float64 ones
    assert block.risk.channel_spread == pytest.approx(expected.channel_spread, rel=1e-6)
    assert block.risk.weight_max == pytest.approx(expected.weight_max, rel=1e-6)
    assert block.risk.warnings == []


def test_spread_channels_warn_about_int8(tmp_path, capfd):
    """BN scales 1000x apart across channels: the fused ranges spread past the limit."""
    path = tmp_path / "m.onnx"
    onnx.save_model(block_model(gamma=[1.0, 1.0, 1.0, 1e-3]), str(path))
    report = tmp_path / "r.json"
    assert invoke([path, "-o", tmp_path / "f.onnx", "--report", report]) == 0
    out = capfd.readouterr().out
    assert "warning: 1 fused block(s): per-output-channel weight ranges spread more than 16x" in out
    assert "quantize weights per channel (or train QARepVGG-style)" in out
    data = json.loads(report.read_text())
    (block,) = data["blocks"]
    assert block["risk"]["warnings"] == [INT8] and block["risk"]["channel_spread"] > 100
    assert data["summary"]["risk"]["warnings"] == {INT8: 1}


def test_float32_weights_past_float16_warn(tmp_path, capfd):
    """A float32 model fuses (its weights fit float32) and is flagged for float16."""
    path = tmp_path / "m.onnx"
    onnx.save_model(block_model(gamma=[1e5] * 4, var=[1e-2] * 4), str(path))
    assert invoke([path, "-o", tmp_path / "f.onnx", "-v"]) == 0
    out = capfd.readouterr().out
    assert "fused 1 block(s)" in out
    assert "    warning: fused values leave the float16 range" in out       # under the block, with -v
    assert "warning: 1 fused block(s): fused values leave the float16 range" in out


def test_verbose_shows_each_blocks_figures(tmp_path, capfd):
    path = tmp_path / "m.onnx"
    onnx.save_model(block_model(), str(path))
    assert invoke([path, "-o", tmp_path / "f.onnx", "-v"]) == 0
    lines = capfd.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  fused [repvgg]"))
    assert lines[at + 1].startswith("    weights [") and "channel range spread" in lines[at + 1]
    assert not any(line.startswith("warning:") for line in lines)


def test_summary_option_prints_the_whole_model_figures(tmp_path, capfd):
    path = tmp_path / "m.onnx"
    onnx.save_model(block_model(gamma=[1.0, 1.0, 1.0, 1e-3]), str(path))
    assert invoke([path, "--check", "--summary"]) == 1
    out = capfd.readouterr().out
    assert "numeric risk of the 1 fused block(s):" in out
    assert "above the int8 limit 16x" in out and "inside the float16 range" in out
    assert "int8 weight error, worst channel:" in out


def test_nothing_fused_has_no_risk(tmp_path, capfd):
    b = Builder(5)
    x = b.input(SHAPE)
    path = tmp_path / "m.onnx"
    onnx.save_model(b.model(b.node("Relu", [b.conv(x, 4, 4, (3, 3), pads=(1, 1, 1, 1))])), str(path))
    assert invoke([path, "--check", "--summary", "--report", tmp_path / "r.json"]) == 0
    assert "numeric risk: no fused blocks" in capfd.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["risk"] == {"blocks": 0}


def test_a_block_left_unfused_has_no_risk():
    """A block refused by its isolated check (a tolerance nothing meets) carries no figures."""
    result = fuse_with_report(block_model(), rtol=1e-15)
    (block,) = result.report.blocks
    assert not block.fused and block.risk is None
