"""How exact is the fused model, with runtime rounding taken out?

For every family in fixtures/torch: the training-form export (BN kept, ts_nocf) is
the reference. Each model is promoted to float64 (every float initializer, Constant
and value type) and run with onnx's reference evaluator, so the only differences
left are in the stored float32 weights. Printed per family: max|Δ|/max|ref| of
reparam-onnx's fused model and of PyTorch's own re-parameterized export, and their
ratio (below 1: reparam-onnx is closer to the training form).

    python benchmarks/float64_error.py
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from reparam_onnx import fuse  # noqa: E402

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)


def promote_to_double(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for t in g.initializer:
        if t.data_type in FLOATS:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in FLOATS:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            if node.op_type in ("Cast", "CastLike") and a.name == "to" and a.i in FLOATS:
                a.i = TensorProto.DOUBLE
    for info in list(g.input) + list(g.output) + list(g.value_info):
        if info.type.tensor_type.elem_type in FLOATS:
            info.type.tensor_type.elem_type = TensorProto.DOUBLE
    return out


def run64(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    ev = ReferenceEvaluator(promote_to_double(model))
    return ev.run(None, {model.graph.input[0].name: x.astype(np.float64)})[0]


def rel(ref, out):
    return float(np.max(np.abs(ref - out)) / np.max(np.abs(ref)))


def main():
    torch_dir = ROOT / "fixtures" / "torch"
    manifest = json.loads((torch_dir / "manifest.json").read_text())
    ratios = []
    print(f"{'family':18} {'fused err':>10} {'torch deploy err':>17} {'ratio':>7}")
    for family in manifest["families"]:
        train = onnx.load(str(torch_dir / f"{family}.ts_nocf.onnx"))
        native = onnx.load(str(torch_dir / f"{family}.deploy.onnx"))
        x = np.load(torch_dir / f"{family}.io.npz")["input"]
        fused = fuse(train, verify=False)
        ref = run64(train, x)
        e_fused, e_native = rel(ref, run64(fused, x)), rel(ref, run64(native, x))
        ratios.append(e_fused / e_native)
        print(f"{family:18} {e_fused:10.2e} {e_native:17.2e} {ratios[-1]:7.3f}")
    print(f"median ratio fused/torch: {statistics.median(ratios):.3f} over {len(ratios)} families")


if __name__ == "__main__":
    main()
