"""Real architectures from timm, torchvision and ultralytics, exported as users do, through reparam-onnx.

Needs torch, torchvision and timm (random weights: no network), and ultralytics for the
detectors (built from their yaml, random init); prints, per model and exporter setting, the
blocks fused per rule, the reasons of the blocks left, the node counts against the
framework's own deploy form (timm `reparameterize_model`, ultralytics `model.fuse()`,
exported the same way) and the verification result. A coverage survey, not a test.

    python benchmarks/zoo_check.py [--out DIR] [--models resnet18,mobileone_s0,...]
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {
    "resnet18": ("torchvision", "resnet18"),
    "mobilenet_v3_small": ("torchvision", "mobilenet_v3_small"),
    "efficientnet_b0": ("torchvision", "efficientnet_b0"),
    "repvgg_a0": ("timm", "repvgg_a0"),
    "mobileone_s0": ("timm", "mobileone_s0"),
    "repghostnet_050": ("timm", "repghostnet_050"),
    "repvit_m0_9": ("timm", "repvit_m0_9"),
    "fastvit_t8": ("timm", "fastvit_t8"),
    "yolov8n": ("ultralytics", "yolov8n.yaml"),
    "yolo11n": ("ultralytics", "yolo11n.yaml"),
    "yolov9t": ("ultralytics", "yolov9t.yaml"),
    "yolov10n": ("ultralytics", "yolov10n.yaml"),
    "rtdetr-l": ("ultralytics", "rtdetr-l.yaml"),
}


def build(source: str, name: str):
    import torch
    torch.manual_seed(0)
    if source == "ultralytics":
        from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel
        model = (RTDETRDetectionModel if name.startswith("rtdetr") else DetectionModel)(name, verbose=False)
    elif source == "torchvision":
        import torchvision
        model = torchvision.models.get_model(name)
    else:
        import timm
        model = timm.create_model(name)
    for m in model.modules():   # default BN statistics hide bias bugs
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.5)
    return model.eval()


def deploy_form(source: str, model):
    """The framework's own re-parameterized model, or None."""
    import copy
    if source == "timm":
        from timm.utils import reparameterize_model
        return reparameterize_model(copy.deepcopy(model))
    if source == "ultralytics":
        return copy.deepcopy(model).fuse(verbose=False)
    return None


def export(model, path: Path, fold: bool) -> None:
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False,
                          opset_version=17, do_constant_folding=fold)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    from reparam_onnx import ReparamError, fuse_with_report
    out = Path(args.out or tempfile.mkdtemp(prefix="zoo_"))
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        source = MODELS[name][0]
        model = build(*MODELS[name])
        deploy = deploy_form(source, model)
        for fold in (True, False):
            path = out / f"{name}.{'cf' if fold else 'nocf'}.onnx"
            export(model, path, fold)
            native = ""
            if deploy is not None:
                export(deploy, out / "deploy.onnx", fold)
                import onnx
                native = f" (deploy form {len(onnx.load(str(out / 'deploy.onnx')).graph.node)})"
            try:
                report = fuse_with_report(str(path)).report
            except ReparamError as exc:
                print(f"{path.name}: {exc}")
                continue
            v = report.verification
            print(f"{path.name}: fused {report.per_rule()}; nodes {sum(report.ops_before.values())}"
                  f"→{sum(report.ops_after.values())}{native}; verification "
                  f"{'passed' if v.passed else 'FAILED'} {v.worst if v.worst is not None else ''}", flush=True)
            reasons = Counter(re.sub(r"'[^']*'", "'…'", b.reason) for b in report.unfused)
            for reason, n in reasons.most_common():
                print(f"    left {n}: {reason}")

if __name__ == "__main__":
    main()
