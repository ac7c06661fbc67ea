#!/usr/bin/env python
"""RepVGG-A0 benchmark: reparam-onnx's fuse vs timm's own reparameterization.

Full run (needs torch + timm + onnx + onnxruntime; no network, weights are random):

    python benchmarks/repvgg_a0.py [--out DIR]

  1. builds timm's repvgg_a0 (pretrained=False), randomizes every BatchNorm's running
     stats and affine parameters with a fixed seed, eval();
  2. exports the train form (TorchScript exporter, opset 17, constant folding,
     input 1x3x224x224) to DIR/repvgg_a0.train.onnx;
  3. applies timm's reparameterize_model() and exports the native deploy form to
     DIR/repvgg_a0.native.onnx;
  4. if reparam_onnx is importable, fuses the train export and saves
     DIR/repvgg_a0.fused.onnx;
  5. prints op-type counts, max relative error (max|d|/max|ref|) of native and fused
     vs train on a seeded random input, and onnxruntime CPU latency (median over
     interleaved rounds, 1 thread and default threads) with the ratio fused/native.

Timing only, without torch (plain Python with onnx + onnxruntime):

    python benchmarks/repvgg_a0.py --train-onnx T.onnx --native-onnx N.onnx [--fused-onnx F.onnx]

DIR defaults to a fresh temporary folder; it may not be inside the repository.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import onnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT_SHAPE = (1, 3, 224, 224)


# --------------------------------------------------------------------------
# torch part
# --------------------------------------------------------------------------

def randomize_bn(model, seed):
    """running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.5)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    n_bn = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
                n_bn += 1
    return n_bn


def export_torch(out_dir, seed):
    import warnings

    import timm
    import torch
    from timm.utils import reparameterize_model

    torch.manual_seed(seed)
    model = timm.create_model("repvgg_a0", pretrained=False)
    n_bn = randomize_bn(model, seed)
    model.eval()
    x = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))
    print(f"timm {timm.__version__}, torch {torch.__version__}: repvgg_a0 with {n_bn} "
          f"BatchNorms randomized (seed {seed})")

    train_path = os.path.join(out_dir, "repvgg_a0.train.onnx")
    native_path = os.path.join(out_dir, "repvgg_a0.native.onnx")
    kw = dict(dynamo=False, opset_version=17, do_constant_folding=True,
              input_names=["input"], output_names=["output"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            y_train = model(x)
            torch.onnx.export(model, (x,), train_path, **kw)
            deploy = reparameterize_model(model)  # a reparameterized deep copy
            deploy.eval()
            y_native = deploy(x)
            torch.onnx.export(deploy, (x,), native_path, **kw)
    rel = float((y_native - y_train).abs().max() / y_train.abs().max())
    print(f"torch: native deploy vs train max rel err {rel:.3e} (float32, in torch)")
    return train_path, native_path


# --------------------------------------------------------------------------
# fuse part
# --------------------------------------------------------------------------

def try_fuse(train_path, out_dir):
    try:
        from reparam_onnx import fuse
    except ImportError:
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        try:
            from reparam_onnx import fuse
        except Exception as e:  # noqa: BLE001
            print(f"reparam_onnx not importable ({type(e).__name__}: {e}); skipping the fuse")
            return None
    fused_path = os.path.join(out_dir, "repvgg_a0.fused.onnx")
    try:
        t0 = time.perf_counter()
        fused = fuse(onnx.load(train_path))
        dt = time.perf_counter() - t0
        onnx.save(fused, fused_path)
    except Exception as e:  # noqa: BLE001 - the engine is young; report and go on
        print(f"reparam_onnx.fuse failed: {type(e).__name__}: {e}")
        traceback.print_exc(limit=3)
        return None
    print(f"reparam_onnx.fuse: {dt:.2f} s (including its own verification, if any)")
    return fused_path


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------

def op_counts(path):
    m = onnx.load(path, load_external_data=False)
    return collections.Counter(n.op_type for n in m.graph.node)


def session(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # 0 = onnxruntime's default
    so.inter_op_num_threads = 1 if threads == 1 else 0
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def feed_for(sess, seed):
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    rng = np.random.default_rng(seed)
    return {inp.name: rng.standard_normal(shape).astype(np.float32)}


def latency(paths, threads, rounds, warmup, seed):
    """Median seconds per run for each model; each round runs every model once,
    in an order rotated round by round, so drifts hit all models alike."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    feed = feed_for(next(iter(sessions.values())), seed)
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times = {k: [] for k in sessions}
    names = list(sessions)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def max_rel_errors(paths, seed):
    sessions = {k: session(p, 0) for k, p in paths.items()}
    feed = feed_for(sessions["train"], seed)
    ref = sessions["train"].run(None, feed)[0].astype(np.float64)
    scale = float(np.abs(ref).max())
    out = {}
    for k, s in sessions.items():
        if k != "train":
            y = s.run(None, feed)[0].astype(np.float64)
            out[k] = float(np.abs(y - ref).max() / scale)
    return out


def print_op_table(paths):
    counts = {k: op_counts(p) for k, p in paths.items()}
    ops = sorted(set().union(*counts.values()))
    print("\nop-type counts")
    print(f"  {'op':<22}" + "".join(f"{k:>10}" for k in counts))
    for op in ops:
        print(f"  {op:<22}" + "".join(f"{counts[k].get(op, 0):>10}" for k in counts))
    print(f"  {'(total nodes)':<22}" + "".join(f"{sum(c.values()):>10}" for c in counts.values()))
    print(f"  {'(file MB)':<22}" + "".join(
        f"{os.path.getsize(p) / 1e6:>10.2f}" for p in paths.values()))


def inside_repo(path):
    path = os.path.realpath(path)
    return os.path.commonpath([path, os.path.realpath(REPO)]) == os.path.realpath(REPO)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder (default: a new temporary folder)")
    ap.add_argument("--train-onnx", help="skip torch: use this train-form export")
    ap.add_argument("--native-onnx", help="skip torch: use this native deploy export")
    ap.add_argument("--fused-onnx", help="use this fused model instead of running the fuse")
    ap.add_argument("--no-fuse", action="store_true", help="do not run reparam_onnx")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                    help="intra-op thread counts to time (0 = onnxruntime default)")
    args = ap.parse_args(argv)

    if bool(args.train_onnx) != bool(args.native_onnx):
        ap.error("--train-onnx and --native-onnx go together")
    if args.out and inside_repo(args.out):
        ap.error("--out must not be inside the repository")
    needs_out = not args.train_onnx or not (args.fused_onnx or args.no_fuse)
    out_dir = None
    if needs_out:
        out_dir = args.out or tempfile.mkdtemp(prefix="repvgg_a0_bench_")
        os.makedirs(out_dir, exist_ok=True)
        print(f"output folder: {out_dir}")

    if args.train_onnx:
        train_path, native_path = args.train_onnx, args.native_onnx
    else:
        train_path, native_path = export_torch(out_dir, args.seed)

    paths = {"train": train_path, "native": native_path}
    if args.fused_onnx:
        paths["fused"] = args.fused_onnx
    elif not args.no_fuse:
        fused = try_fuse(train_path, out_dir)
        if fused:
            paths["fused"] = fused

    import onnxruntime as ort
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, {os.cpu_count()} CPUs")
    print_op_table(paths)

    print("\nmax relative error vs train (max|d| / max|train|, onnxruntime, seeded input)")
    for k, e in max_rel_errors(paths, args.seed).items():
        print(f"  {k:<8} {e:.3e}")

    print(f"\nonnxruntime CPU latency, median of {args.rounds} interleaved rounds "
          f"(ms, input {'x'.join(map(str, INPUT_SHAPE))})")
    for threads in args.threads:
        med = latency(paths, threads, args.rounds, args.warmup, args.seed)
        label = "default threads" if threads == 0 else f"{threads} thread(s)"
        line = "  ".join(f"{k} {v * 1e3:8.2f}" for k, v in med.items())
        ratio = (f"  fused/native {med['fused'] / med['native']:.3f}"
                 if "fused" in med else "")
        print(f"  {label:<16} {line}{ratio}  train/native {med['train'] / med['native']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
