"""Numeric risk of a fused conv: whether its weights survive float16 and int8.

Fusing adds the branches' kernels, each scaled by its BN's gamma/sqrt(var + eps), so the
fused weights can grow past the float16 range, and the per-output-channel weight ranges
can spread far apart: a channel whose BN scales are small ends up with tiny weights next
to channels with large ones. Per-tensor int8 quantization gives every channel one step,
set by the largest channel, and the narrow channels lose their precision (the int8
accuracy drop RepVGG users report; QARepVGG, Chu et al. 2022).

Figures, from the fused kernel W[o, i, ...] and bias b (float64, before the cast to the
model's dtype):
  range of a channel  r_o = max |W[o]| (what symmetric int8 quantization scales by)
  spread              S = max_o r_o / min_o r_o over channels with r_o > 0 (1 when fewer than two)
  int8 error          per channel ||q(W[o]) - W[o]|| / ||W[o]||, worst channel, where q rounds
                      to the symmetric int8 grid of step max_o r_o / 127 (per tensor) or
                      r_o / 127 (per channel)

Thresholds, and why:
  FLOAT16_MAX = 65504: the largest finite float16; a weight or bias past it is inf in a
      float16 model.
  SPREAD_LIMIT = 16: under per-tensor int8 the narrowest channel keeps 127/S of its 127
      levels per sign: under 8 at S = 16. Its rounding noise (uniform, std step/sqrt(12))
      against its weights (std about r_o/3 for bell-shaped weights) is about S/147 of the
      signal: 11% (19 dB) at S = 16, against 0.7% (43 dB) per channel. Past that the
      channel's outputs are visibly wrong; per-channel weight quantization (every channel
      its own step) or QARepVGG-style training removes the problem.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

FLOAT16_MAX = 65504.0
INT8_LEVELS = 127
SPREAD_LIMIT = 16.0

FLOAT16 = "float16_range"
INT8 = "int8_per_tensor"
ADVICE = {
    FLOAT16: f"fused values leave the float16 range (|x| > {FLOAT16_MAX:g}): keep this model in float32",
    INT8: (f"per-output-channel weight ranges spread more than {SPREAD_LIMIT:g}x: per-tensor int8 quantization "
           f"will lose precision; quantize weights per channel (or train QARepVGG-style)"),
}


@dataclass
class NumericRisk:
    """The numeric figures of one fused conv (see the module docstring)."""
    weight_min: float
    weight_max: float
    bias_min: float
    bias_max: float
    channel_spread: float             # max/min of the per-output-channel ranges max|W[o]|
    int8_error: float                 # worst channel's relative weight error, per-tensor int8
    int8_error_per_channel: float     # the same with one int8 step per channel
    warnings: List[str] = field(default_factory=list)   # FLOAT16, INT8


CHUNK_ELEMENTS = 1 << 16   # output channels are taken a block of rows at a time, of about this many weights


def numeric_risk(kernel: np.ndarray, bias: np.ndarray) -> NumericRisk:
    """The figures and warnings of a fused conv's kernel (C_out first) and bias.

    The kernel is read a block of output channels at a time (every figure is per channel, or
    an extreme over channels): the float64 temporaries stay in the cache, and a large kernel
    needs no float64 copy of itself. Each channel's figures are those of the whole-array
    computation, bit for bit (tests/test_risk.py compares them)."""
    w = np.asarray(kernel)
    b = np.asarray(bias, dtype=np.float64)
    flat = w.reshape(w.shape[0], -1) if w.ndim else w.reshape(1, 1)
    rows = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
    blocks = [slice(i, min(i + rows, flat.shape[0])) for i in range(0, flat.shape[0], rows)]
    ranges = np.zeros(flat.shape[0], np.float64)
    norms = np.zeros(flat.shape[0], np.float64)
    for block in blocks:
        part = flat[block]
        ranges[block] = np.max(np.abs(part), axis=1, initial=0.0)
        channels = part.astype(np.float64, copy=False)
        norms[block] = np.einsum("ij,ij->i", channels, channels, dtype=np.float64)
    np.sqrt(norms, out=norms)
    live = ranges[ranges > 0]
    spread = float(live.max() / live.min()) if live.size > 1 else 1.0
    largest = float(max(ranges.max(initial=0.0), np.max(np.abs(b), initial=0.0)))
    warnings = [FLOAT16] if largest > FLOAT16_MAX else []
    if spread > SPREAD_LIMIT:
        warnings.append(INT8)
    per_tensor = np.full_like(ranges, ranges.max(initial=0.0))
    errors = np.zeros(flat.shape[0], np.float64)
    errors_per_channel = np.zeros(flat.shape[0], np.float64)
    for block in blocks:
        channels = flat[block].astype(np.float64, copy=False)
        errors[block] = _int8_errors(channels, per_tensor[block])
        errors_per_channel[block] = _int8_errors(channels, ranges[block])
    return NumericRisk(
        weight_min=_min(w), weight_max=_max(w), bias_min=_min(b), bias_max=_max(b), channel_spread=spread,
        int8_error=_worst(errors, norms), int8_error_per_channel=_worst(errors_per_channel, norms), warnings=warnings)


def _int8_errors(channels: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """||q(w) - w|| per channel, q the symmetric int8 grid of step range/127; computed in one
    temporary."""
    step = (ranges / INT8_LEVELS)[:, None]
    safe = np.where(step > 0, step, 1.0).astype(channels.dtype)
    error = channels / safe
    np.round(error, out=error)
    np.clip(error, -INT8_LEVELS, INT8_LEVELS, out=error)
    error *= safe
    error -= channels
    errors: np.ndarray = np.sqrt(np.einsum("ij,ij->i", error, error, dtype=np.float64))
    return errors


def _worst(errors: np.ndarray, norms: np.ndarray) -> float:
    """Worst ||q(w) - w|| / ||w|| over channels (norms: ||w|| per channel; 0 for a zero channel)."""
    return float(np.max(np.where(norms > 0, errors / np.where(norms > 0, norms, 1.0), 0.0), initial=0.0))


def _min(a: np.ndarray) -> float:
    return float(a.min()) if a.size else 0.0


def _max(a: np.ndarray) -> float:
    return float(a.max()) if a.size else 0.0


# ---------------------------------------------------------------- the whole model

def summary(named: Sequence[Tuple[str, Optional[NumericRisk]]]) -> Dict[str, Any]:
    """Whole-model figures over the fused blocks (block output name, its risk): the extremes,
    the block with the widest spread, and how many blocks carry each warning."""
    risks = [(name, r) for name, r in named if r is not None]
    if not risks:
        return {"blocks": 0}
    widest = max(risks, key=lambda nr: nr[1].channel_spread)
    return {
        "blocks": len(risks),
        "weight_min": min(r.weight_min for _, r in risks),
        "weight_max": max(r.weight_max for _, r in risks),
        "bias_min": min(r.bias_min for _, r in risks),
        "bias_max": max(r.bias_max for _, r in risks),
        "channel_spread_max": widest[1].channel_spread,
        "channel_spread_max_block": widest[0],
        "int8_error_max": max(r.int8_error for _, r in risks),
        "int8_error_per_channel_max": max(r.int8_error_per_channel for _, r in risks),
        "warnings": {w: sum(w in r.warnings for _, r in risks) for w in ADVICE if any(w in r.warnings for _, r in risks)},
    }


def summary_lines(figures: Dict[str, Any]) -> List[str]:
    """--summary: the whole-model figures of summary(), as text."""
    if not figures.get("blocks"):
        return ["numeric risk: no fused blocks"]
    f = figures
    verdict16 = "outside" if FLOAT16 in f["warnings"] else "inside"
    verdict8 = "above" if INT8 in f["warnings"] else "within"
    return [
        f"numeric risk of the {f['blocks']} fused block(s):",
        f"  weights in [{f['weight_min']:.4g}, {f['weight_max']:.4g}], biases in [{f['bias_min']:.4g}, "
        f"{f['bias_max']:.4g}]: {verdict16} the float16 range (±{FLOAT16_MAX:g})",
        f"  per-channel weight range spread up to {f['channel_spread_max']:.3g}x ({f['channel_spread_max_block']}): "
        f"{verdict8} the int8 limit {SPREAD_LIMIT:g}x",
        f"  int8 weight error, worst channel: {f['int8_error_max']:.2%} per tensor, "
        f"{f['int8_error_per_channel_max']:.2%} per channel",
    ] + warning_lines(f)


def warning_lines(figures: Dict[str, Any]) -> List[str]:
    """One line per kind of warning, with how many fused blocks carry it."""
    return [f"warning: {n} fused block(s): {ADVICE[w]}" for w, n in figures.get("warnings", {}).items()]


def block_lines(risk: Optional[NumericRisk]) -> List[str]:
    """-v: the figures of one fused block, and its warnings."""
    if risk is None:
        return []
    r = risk
    return [f"    weights [{r.weight_min:.4g}, {r.weight_max:.4g}], bias [{r.bias_min:.4g}, {r.bias_max:.4g}], "
            f"channel range spread {r.channel_spread:.3g}x, int8 error {r.int8_error:.2%} per tensor / "
            f"{r.int8_error_per_channel:.2%} per channel"] + [f"    warning: {ADVICE[w]}" for w in r.warnings]


def flags(figures: Dict[str, Any]) -> str:
    """A short mention of the warnings for a one-line summary ('' when none)."""
    found = figures.get("warnings", {})
    return ", ".join(f"{w} in {n} block(s)" for w, n in found.items())
