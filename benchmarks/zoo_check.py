"""Real architectures from timm and torchvision, exported as users do, through reparam-onnx.

Needs torch, torchvision and timm (random weights: no network); prints, per model and
exporter setting, the blocks fused per rule, the reasons of the blocks left, the op counts
and the verification result. A coverage survey, not a test.

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
}


def build(source: str, name: str):
    import timm
    import torch
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.get_model(name) if source == "torchvision" else timm.create_model(name)
    for m in model.modules():   # default BN statistics hide bias bugs
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.5)
    return model.eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    import torch
    from reparam_onnx import ReparamError, fuse_with_report
    out = Path(args.out or tempfile.mkdtemp(prefix="zoo_"))
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        model = build(*MODELS[name])
        for fold in (True, False):
            path = out / f"{name}.{'cf' if fold else 'nocf'}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False,
                                  opset_version=17, do_constant_folding=fold)
            try:
                report = fuse_with_report(str(path)).report
            except ReparamError as exc:
                print(f"{path.name}: {exc}")
                continue
            v = report.verification
            print(f"{path.name}: fused {report.per_rule()}; nodes {sum(report.ops_before.values())}"
                  f"→{sum(report.ops_after.values())}; verification "
                  f"{'passed' if v.passed else 'FAILED'} {v.worst if v.worst is not None else ''}")
            reasons = Counter(re.sub(r"'[^']*'", "'…'", b.reason) for b in report.unfused)
            for reason, n in reasons.most_common():
                print(f"    left {n}: {reason}")


if __name__ == "__main__":
    main()
