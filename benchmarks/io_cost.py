"""Fusing at the cost of reading and writing the file?

Compares, each in a fresh process (median of N runs, peak RSS from getrusage):
  bare   onnx.load + onnx.save of the model
  fuse   reparam-onnx MODEL -o OUT --no-verify
  verify reparam-onnx MODEL -o OUT (with the onnxruntime check)
Time and peak RSS are given against the bare load+save's, and the peak RSS against the
model's size on disk (model file and its data).

Targets (issue 9): --no-verify ≤ 1.5× bare time and ≤ 1.0× bare peak RSS; verified ≤ 4× bare
time; a model over 2 GB (external data) the same time ratios, peak RSS ≤ 1.5× its size under
--no-verify and ≤ 2.5× verified.

    python benchmarks/io_cost.py MODEL.onnx [--runs 5]
    python benchmarks/io_cost.py --build 400 [--runs 3]     # a ~400 MB RepVGG-style train model it builds
    python benchmarks/io_cost.py --build 2300 --external    # the same, wider, weights in external data
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
    import onnx, os, sys
    model = onnx.load(sys.argv[1])
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(sys.argv[1], load_external_data=False).graph.initializer)
    onnx.save(model, sys.argv[2], save_as_external_data=external,
              location=os.path.basename(sys.argv[2]) + ".data" if external else None)
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


def build_model(megabytes: float, path: Path, external: bool) -> None:
    """A RepVGG-style training-form model: 28 blocks of 3×3 Conv-BN + 1×1 Conv-BN (+ identity BN),
    widths growing geometrically, scaled so the weights take about `megabytes` MB; input 1×3×32×32."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    blocks, rng = 28, np.random.default_rng(0)
    base = [2 ** (i / 4) for i in range(blocks)]
    scale = (megabytes * 1e6 / (4 * 10 * sum(b * b for b in base))) ** 0.5   # 10·C² float32 weights per block
    widths = [max(4, int(scale * b)) for b in base]
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def bn(x, c, tag):
        out = f"{tag}_bn"
        nodes.append(helper.make_node("BatchNormalization", [
            x, const(f"{tag}.g", rng.uniform(0.5, 1.5, c)), const(f"{tag}.b", rng.normal(0, 0.5, c)),
            const(f"{tag}.m", rng.normal(0, 0.5, c)), const(f"{tag}.v", rng.uniform(0.5, 2, c))], [out], name=out))
        return out

    x, c_in = "x", 3
    for i, c in enumerate(widths):
        stride = 2 if i in (0, 4, 10, 20) else 1
        terms = []
        for k in (3, 1):
            w = const(f"b{i}.k{k}", rng.normal(0, 1 / np.sqrt(c_in * k * k), (c, c_in, k, k)).astype(np.float32))
            conv = f"b{i}_conv{k}"
            nodes.append(helper.make_node("Conv", [x, w], [conv], name=conv, kernel_shape=[k, k],
                                          strides=[stride] * 2, pads=[k // 2] * 4))
            terms.append(bn(conv, c, conv))
        if stride == 1 and c == c_in:
            terms.append(bn(x, c, f"b{i}_id"))
        total = terms[0]
        for j, t in enumerate(terms[1:]):
            nodes.append(helper.make_node("Add", [total, t], [f"b{i}_add{j}"], name=f"b{i}_add{j}"))
            total = f"b{i}_add{j}"
        nodes.append(helper.make_node("Relu", [total], [f"b{i}_out"], name=f"b{i}_relu"))
        x, c_in = f"b{i}_out", c
    graph = helper.make_graph(nodes, "synthetic_repvgg", [helper.make_tensor_value_info("x", 1, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info(x, 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=external, location=path.name + ".data" if external else None,
              size_threshold=1024)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--build", type=float, metavar="MB", help="build a RepVGG-style model of about MB megabytes")
    parser.add_argument("--external", action="store_true", help="with --build: weights in external data")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if bool(args.model) == bool(args.build):
        parser.error("give MODEL or --build MB")
    with tempfile.TemporaryDirectory() as tmp:
        if args.build:
            args.model = str(Path(tmp) / "built.onnx")
            build_model(args.build, Path(args.model), args.external)
            print(f"built {args.model}")
        size = model_size(Path(args.model))
        print(f"{args.model}: {size:.0f} MB on disk (model and its data)")
        out = str(Path(tmp) / "out.onnx")
        rows = {
            "bare load+save": [sys.executable, "-c", BARE, args.model, out],
            "fuse --no-verify": [sys.executable, "-c", CLI, args.model, "-o", out, "--no-verify", "-q"],
            "fuse (verified)": [sys.executable, "-c", CLI, args.model, "-o", out, "-q"],
        }
        results = {name: measure(cmd, args.runs) for name, cmd in rows.items()}
    base_t, base_m = results["bare load+save"]
    print(f"{'':18} {'time s':>8} {'× bare':>7} {'peak MB':>8} {'× bare':>7} {'× size':>7}")
    for name, (t, m) in results.items():
        print(f"{name:18} {t:8.3f} {t / base_t:7.2f} {m:8.1f} {m / base_m:7.2f} {m * 1.048576 / size:7.2f}")


def model_size(path: Path) -> float:
    """MB (10^6 bytes) of the model file and the external data files it names."""
    import onnx
    head = onnx.load(str(path), load_external_data=False)
    files = {path} | {path.parent / e.value for t in head.graph.initializer for e in t.external_data
                      if e.key == "location"}
    return sum(f.stat().st_size for f in files) / 1e6


if __name__ == "__main__":
    main()
