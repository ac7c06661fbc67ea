"""Fusing at the cost of reading and writing the file?

Compares, each in a fresh process (median of N runs, peak RSS from getrusage):
  bare   onnx.load + onnx.save of the model
  fuse   reparam-onnx MODEL -o OUT --no-verify
  verify reparam-onnx MODEL -o OUT (with the onnxruntime check)

    python benchmarks/io_cost.py MODEL.onnx [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

BARE = textwrap.dedent("""
    import onnx, sys
    onnx.save(onnx.load(sys.argv[1]), sys.argv[2])
""")
CLI = "import sys; from reparam_onnx.cli import main; main(sys.argv[1:])"
MEASURE = textwrap.dedent("""
    import resource, subprocess, sys, time
    t = time.perf_counter()
    code = subprocess.call(sys.argv[1:])
    dt = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{dt:.4f} {rss:.1f} {code}")
""")


def measure(cmd, runs):
    times, rss = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", MEASURE] + cmd, capture_output=True, text=True, check=True)
        t, m, code = out.stdout.split()
        if code != "0":
            raise SystemExit(f"command failed: {' '.join(cmd)}")
        times.append(float(t))
        rss.append(float(m))
    return statistics.median(times), max(rss)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.onnx")
        rows = {
            "bare load+save": [sys.executable, "-c", BARE, args.model, out],
            "fuse --no-verify": [sys.executable, "-c", CLI, args.model, "-o", out, "--no-verify", "-q"],
            "fuse (verified)": [sys.executable, "-c", CLI, args.model, "-o", out, "-q"],
        }
        results = {name: measure(cmd, args.runs) for name, cmd in rows.items()}
    base_t, base_m = results["bare load+save"]
    print(f"{'':18} {'time s':>8} {'× bare':>7} {'peak MB':>8} {'× bare':>7}")
    for name, (t, m) in results.items():
        print(f"{name:18} {t:8.3f} {t / base_t:7.2f} {m:8.1f} {m / base_m:7.2f}")


if __name__ == "__main__":
    main()
