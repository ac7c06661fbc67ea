"""Real architectures from timm, torchvision and ultralytics, exported as users do, through reparam-onnx.

Needs torch, torchvision and timm (random weights: no network), and ultralytics for the
detectors (built from their yaml, random init, heads in export mode as `yolo export` sets
them); prints, per model and exporter setting, the
blocks fused per rule, the reasons of the blocks left, the node counts against the
framework's own deploy form (timm `reparameterize_model`, ultralytics `model.fuse()`,
exported the same way) and the verification result, then a summary table. A coverage
survey, not a test.

    python benchmarks/zoo_check.py [--out DIR] [--models repvgg_a0,mobileone_s0,...] [--settings cf,nocf,dynamo]
    python benchmarks/zoo_check.py --list          # the models selected, with input size
    python benchmarks/zoo_check.py --discover      # which timm families reparameterize_model changes

The timm rows are every timm architecture family whose `reparameterize_model` changes the
TorchScript export (found by `--discover`: its smallest variant), plus LeViT and
EfficientViT-MSRA (Linear↔BN); each at the smallest input size it runs at.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name: (source, constructor name, input size). The timm part is what `--discover` finds
# (timm 1.0.31): the smallest variant (by training-form parameter count, or the family's
# conventional smallest name) of each family whose reparameterize_model changes the export.
MODELS = {
    "resnet18": ("torchvision", "resnet18", 224),
    "mobilenet_v3_small": ("torchvision", "mobilenet_v3_small", 224),
    "efficientnet_b0": ("torchvision", "efficientnet_b0", 224),
    # timm: 128 px unless the model needs more (LeViT's attention biases are sized for 224)
    "repvgg_a0": ("timm", "repvgg_a0", 128),
    "mobileone_s0": ("timm", "mobileone_s0", 128),   # s1 has fewer training-form weights; s0 is the k=4 branch form
    "repghostnet_050": ("timm", "repghostnet_050", 128),
    "repvit_m0_9": ("timm", "repvit_m0_9", 128),
    "fastvit_t8": ("timm", "fastvit_t8", 128),
    "ghostnetv3_050": ("timm", "ghostnetv3_050", 128),
    "lcnetv2_small": ("timm", "lcnetv2_small", 128),
    "efficientvim_m1": ("timm", "efficientvim_m1", 128),
    "efficientvit_m0": ("timm", "efficientvit_m0", 128),
    "levit_128s": ("timm", "levit_128s", 224),
    "iformer_t": ("timm", "iformer_t", 128),
    "shvit_s1": ("timm", "shvit_s1", 128),
    "tiny_vit_5m_224": ("timm", "tiny_vit_5m_224", 128),
    "nextvit_small": ("timm", "nextvit_small", 128),
    "yolov8n": ("ultralytics", "yolov8n.yaml", 224),
    "yolo11n": ("ultralytics", "yolo11n.yaml", 224),
    "yolov9t": ("ultralytics", "yolov9t.yaml", 224),
    "yolov10n": ("ultralytics", "yolov10n.yaml", 224),
    "rtdetr-l": ("ultralytics", "rtdetr-l.yaml", 224),
}

# what reparameterize_model calls on a child module (timm.models._manipulate)
_HOOKS = ("fuse", "reparameterize", "switch_to_deploy")
_SIZES = (128, 160, 192, 224)


def build(source: str, name: str, size: int = 224):
    import torch
    torch.manual_seed(0)
    if source == "ultralytics":
        from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel
        model = (RTDETRDetectionModel if name.startswith("rtdetr") else DetectionModel)(name, verbose=False)
        _export_mode(model, size)
    elif source == "torchvision":
        import torchvision
        model = torchvision.models.get_model(name)
    else:
        import timm
        model = timm.create_model(name, pretrained=False)
    for m in model.modules():   # default BN statistics hide bias bugs (1d too: LeViT, EfficientViT)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.5)
    return model.eval()


def _export_mode(model, size: int) -> None:
    """The heads as `yolo export format=onnx` sets them (without its fuse()): only the outputs
    a deployment reads (YOLOv10's one-to-one head, not the one-to-many training head), and C2f
    written with split as the exporter writes it."""
    from ultralytics.nn.modules import C2f, Detect, RTDETRDecoder
    for m in model.modules():
        if isinstance(m, (Detect, RTDETRDecoder)):
            m.export, m.format, m.dynamic, m.shape = True, "onnx", False, None
            anchors = m.num_queries if isinstance(m, RTDETRDecoder) else \
                sum((size // int(s)) ** 2 for s in model.stride.tolist())
            m.max_det = min(getattr(m, "max_det", 300), anchors)
        elif isinstance(m, C2f):
            m.forward = m.forward_split


def deploy_form(source: str, model):
    """The framework's own re-parameterized model, or None."""
    import copy
    if source == "timm":
        from timm.utils import reparameterize_model
        return reparameterize_model(copy.deepcopy(model))
    if source == "ultralytics":
        return copy.deepcopy(model).fuse(verbose=False)
    return None


# export setting: (exporter, constant folding)
SETTINGS = {"cf": ("ts", True), "nocf": ("ts", False), "dynamo": ("dynamo", True)}
# the op types a fused model must have no more of than the deploy form (issue 8)
COUNTED = ("Conv", "Add", "BatchNormalization", "Gemm", "MatMul")


def export(model, path: Path, setting: str, size: int = 224) -> None:
    """TorchScript at opset 17 with constant folding on or off, or dynamo at opset 18 (its
    default optimization)."""
    import torch
    exporter, fold = SETTINGS[setting]
    x = (torch.randn(1, 3, size, size),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "ts":
            torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17, do_constant_folding=fold)
        else:
            torch.onnx.export(model, x, str(path), dynamo=True, opset_version=18, verbose=False)


def node_count(path: Path) -> int:
    import onnx
    return len(onnx.load(str(path), load_external_data=False).graph.node)


# ---------------------------------------------------------------------------------------
# --discover: which timm families does reparameterize_model change?

def _hook_modules():
    """timm model modules whose namespace holds an nn.Module class with a reparameterize hook."""
    import importlib
    import inspect
    import timm
    import torch
    found = {}
    for mod in timm.list_modules():
        ns = importlib.import_module(f"timm.models.{mod}")
        classes = sorted(n for n, c in vars(ns).items()
                         if inspect.isclass(c) and issubclass(c, torch.nn.Module)
                         and any(callable(getattr(c, a, None)) for a in _HOOKS))
        if classes:
            found[mod] = classes
    return found


def smallest_size(model, sizes=_SIZES) -> int:
    """The smallest square input the model (and its deploy form) runs at."""
    import torch
    for s in sizes:
        try:
            with torch.no_grad():
                model(torch.randn(1, 3, s, s))
            return s
        except Exception:   # noqa: BLE001 — fixed-size attention biases, window sizes, ...
            continue
    return 224


def discover(out: Path) -> None:
    """Print every timm family (model name prefix within a module) whose smallest variant has a
    reparameterize hook, and whether reparameterize_model changes its TorchScript export."""
    import timm
    import torch
    from timm.models._registry import _model_to_module
    modules = _hook_modules()
    print(f"modules with a hook class: {', '.join(modules)}", flush=True)
    families = {}
    for name in timm.list_models():
        mod = _model_to_module.get(name, "")
        if mod not in modules:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
        hooks = Counter(type(c).__name__ for c in model.modules()
                        if c is not model and any(callable(getattr(c, a, None)) for a in _HOOKS))
        if not hooks:
            continue
        params = sum(p.numel() for p in model.parameters())
        key = (mod, name.split("_")[0])
        if key not in families or params < families[key][1]:
            families[key] = (name, params, hooks)
    print(f"{'module':18} {'smallest':22} {'params':>7}  size  ts nodes cf on / off: train→deploy  qualifies  hooks")
    for (mod, _fam), (name, params, hooks) in sorted(families.items()):
        model = build("timm", name)
        deploy = deploy_form("timm", model)
        size = max(smallest_size(model), smallest_size(deploy))
        counts = []
        for setting in ("cf", "nocf"):
            export(model, out / "d_train.onnx", setting, size)
            export(deploy, out / "d_deploy.onnx", setting, size)
            counts.append((node_count(out / "d_train.onnx"), node_count(out / "d_deploy.onnx")))
        changes = any(a != b for a, b in counts)
        hook_text = ", ".join(f"{n} {k}" for k, n in hooks.most_common())
        print(f"{mod:18} {name:22} {params / 1e6:6.2f}M  {size:4}  "
              f"{counts[0][0]}→{counts[0][1]} / {counts[1][0]}→{counts[1][1]}  "
              f"{'yes' if changes else 'no'}  {hook_text}", flush=True)


# ---------------------------------------------------------------------------------------

def above(after: Counter, native: Counter) -> dict:
    """Op types (of COUNTED, and all nodes) the fused graph has more of than the deploy form."""
    over = {op: after[op] - native[op] for op in COUNTED if after[op] > native[op]}
    if sum(after.values()) > sum(native.values()):
        over["nodes"] = sum(after.values()) - sum(native.values())
    return over


def survey(names, out: Path, settings=("cf", "nocf")):
    import onnx
    from reparam_onnx import ReparamError, VerificationError, fuse_with_report
    rows = []
    for name in names:
        source, ctor, size = MODELS[name]
        start = time.time()
        model = build(source, ctor, size)
        deploy = deploy_form(source, model)
        for setting in settings:
            path = out / f"{name}.{setting}.onnx"
            try:
                export(model, path, setting, size)
            except Exception as exc:   # an exporter that cannot take the model is a row, not the end
                print(f"{path.name}: export failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                rows.append((name, setting, "export failed", "", "", ""))
                continue
            native = native_ops = None
            if deploy is not None:
                deploy_path = out / f"{name}.{setting}.deploy.onnx"
                export(deploy, deploy_path, setting, size)
                native_ops = Counter(n.op_type for n in onnx.load(str(deploy_path)).graph.node)
                native = sum(native_ops.values())
            try:
                report = fuse_with_report(str(path)).report
                failure = None
            except VerificationError as exc:
                report, failure = exc.report, str(exc)
            except ReparamError as exc:
                print(f"{path.name}: {exc}", flush=True)
                rows.append((name, setting, "error", "", "", str(exc)[:60]))
                continue
            if report is None:
                print(f"{path.name}: {failure}", flush=True)
                rows.append((name, setting, "error", "", "", failure[:60]))
                continue
            v = report.verification
            if failure:
                verdict = f"FAILED: {failure}"
            elif v is None or not v.ran:
                verdict = f"not run {v.message if v else ''}"
            else:
                verdict = f"{'passed' if v.passed else 'FAILED'} {v.worst:.1e}" if v.worst is not None else \
                    ('passed' if v.passed else 'FAILED')
            before, after = sum(report.ops_before.values()), sum(report.ops_after.values())
            native_text = f" ({native})" if native is not None else ""
            over = above(Counter(report.ops_after), native_ops) if native is not None else {}
            flag = " ABOVE deploy form (" + ", ".join(f"{op} +{n}" for op, n in over.items()) + ")" if over else ""
            print(f"{path.name} [{size}px]: fused {report.per_rule()}; nodes {before}→{after}{native_text}{flag}; "
                  f"verification {verdict}", flush=True)
            if flag:   # which ops the fused graph has more or fewer of than the deploy form
                diff = Counter(report.ops_after)
                diff.subtract(native_ops)
                print("    ops against the deploy form: " + ", ".join(
                    f"{op} {n:+d}" for op, n in sorted(diff.items(), key=lambda kv: -abs(kv[1])) if n), flush=True)
            reasons = Counter(re.sub(r"'[^']*'", "'…'", b.reason) for b in report.unfused)
            for reason, n in reasons.most_common():   # quoted names elided: one line per kind
                print(f"    left {n}: {reason}")
            for note in report.notes:
                print(f"    note: {note}")
            rules = ", ".join(f"{n} {r}" for r, n in sorted(report.per_rule().items(), key=lambda kv: -kv[1]))
            rows.append((name, f"{setting} {size}", rules or "—", f"{before} → {after}{native_text}{' ABOVE' if over else ''}",
                         sum(reasons.values()), verdict))
        print(f"    ({time.time() - start:.0f} s)", flush=True)
    print("\n| model | setting | fused rules | nodes train → fused (deploy) | left | verification |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="folder for the exported models (default: a temporary one)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names from --list")
    parser.add_argument("--settings", default="cf,nocf",
                        help=f"comma-separated export settings from {', '.join(SETTINGS)} (default cf,nocf)")
    parser.add_argument("--list", action="store_true", help="print the models selected and exit")
    parser.add_argument("--discover", action="store_true",
                        help="list the timm families whose reparameterize_model changes the export, and exit")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="zoo_"))
    out.mkdir(parents=True, exist_ok=True)
    if args.discover:
        discover(out)
        return
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; see --list")
    settings = [x for x in args.settings.split(",") if x]
    if any(x not in SETTINGS for x in settings):
        parser.error(f"unknown setting in {args.settings}; choose from {', '.join(SETTINGS)}")
    if args.list:
        for n in names:
            source, ctor, size = MODELS[n]
            print(f"{n:22} {source:12} {ctor:24} {size}px")
        return
    survey(names, out, settings)


if __name__ == "__main__":
    main()
