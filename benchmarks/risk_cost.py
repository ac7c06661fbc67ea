"""The numeric risk figures of a large fused kernel: time, block by block against whole-array.

reparam_onnx.risk.numeric_risk reads a kernel a block of output channels at a time; this
times it against the same figures computed on the whole float64 kernel at once (the
formulas of tests/test_risk.py's _whole_array_risk), checks they agree bit for bit, and
prints the best of a few runs of each.

    python benchmarks/risk_cost.py [--shape 1024 1024 3 3] [--runs 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from reparam_onnx.risk import numeric_risk  # noqa: E402
from test_risk import _whole_array_risk  # noqa: E402


def best(f, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - start)
    return min(times), out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs="+", default=[1024, 1024, 3, 3])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w = rng.standard_normal(args.shape)
    b = rng.standard_normal(args.shape[0])
    t_blocks, r = best(lambda: numeric_risk(w, b), args.runs)
    t_whole, whole = best(lambda: _whole_array_risk(w, b), args.runs)
    got = (r.weight_min, r.weight_max, r.bias_min, r.bias_max, r.channel_spread, r.int8_error,
           r.int8_error_per_channel)
    print(f"kernel {args.shape} float64 ({w.nbytes / 2**20:.0f} MB): block by block {t_blocks:.3f} s, "
          f"whole array {t_whole:.3f} s ({t_whole / t_blocks:.1f}x); figures identical: {got == whole}")


if __name__ == "__main__":
    main()
