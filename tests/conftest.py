"""Shared builders: hand-made ONNX graphs with random weights and BN statistics, and
the equivalence assertion every fusing test uses."""
from __future__ import annotations

from collections import Counter
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from reparam_onnx import cli, fuse_with_report

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
RTOL = {np.float32: 1e-5, np.float16: 1e-3, np.float64: 1e-12}


class Builder:
    """Build a graph op by op; every parameter is random (BN statistics too)."""

    def __init__(self, seed: int = 0, dtype=np.float32, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.count = Counter()

    def name(self, kind: str) -> str:
        self.count[kind] += 1
        return f"{kind}{self.count[kind]}"

    def const(self, array, kind="w") -> str:
        name = self.name(kind)
        self.inits.append(numpy_helper.from_array(np.asarray(array).astype(self.dtype), name))
        return name

    def input(self, shape, name="x") -> str:
        self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(self.dtype), shape))
        return name

    def node(self, op, inputs, n_out=1, **attrs) -> str:
        name = self.name(op.lower())
        outs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0]

    def conv(self, x, c_in, c_out, kernel, strides=None, pads=None, dilations=None, group=1, bias=True,
             auto_pad=None, scale=None) -> str:
        kernel = tuple(kernel)
        fan_in = c_in // group * int(np.prod(kernel))
        w = self.rng.normal(0, scale or 1.0 / np.sqrt(fan_in), (c_out, c_in // group) + kernel)
        ins = [x, self.const(w)]
        if bias:
            ins.append(self.const(self.rng.normal(0, 0.5, c_out), "b"))
        attrs = {"kernel_shape": list(kernel), "group": group}
        if strides is not None:
            attrs["strides"] = list(strides)
        if dilations is not None:
            attrs["dilations"] = list(dilations)
        if auto_pad is not None:
            attrs["auto_pad"] = auto_pad
        elif pads is not None:
            attrs["pads"] = list(pads)
        return self.node("Conv", ins, **attrs)

    def bn(self, x, channels, epsilon=1e-5, **attrs) -> str:
        r = self.rng
        params = [self.const(r.uniform(0.5, 1.5, channels), "gamma"), self.const(r.normal(0, 0.5, channels), "beta"),
                  self.const(r.normal(0, 0.5, channels), "mean"), self.const(r.uniform(0.5, 2.0, channels), "var")]
        return self.node("BatchNormalization", [x] + params, epsilon=epsilon, **attrs)

    def add(self, *xs) -> str:
        out = xs[0]
        for x in xs[1:]:
            out = self.node("Add", [out, x])
        return out

    def output(self, name, shape=None) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(self.dtype), shape))

    def model(self, *outputs, ir_version: Optional[int] = None) -> onnx.ModelProto:
        for o in outputs:
            self.output(o)
        graph = helper.make_graph(self.nodes, "test", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = ir_version or min(model.ir_version, 8)
        return model


def repvgg_block(b: Builder, x: str, c_in: int, c_out: int, stride: int = 1, group: int = 1,
                 identity: bool = True, kernel: int = 3) -> str:
    """k×k Conv-BN + 1×1 Conv-BN (+ identity BN when it fits), summed."""
    p = kernel // 2
    k3 = b.bn(b.conv(x, c_in, c_out, (kernel, kernel), (stride, stride), (p, p, p, p), group=group, bias=False), c_out)
    k1 = b.bn(b.conv(x, c_in, c_out, (1, 1), (stride, stride), (0, 0, 0, 0), group=group, bias=False), c_out)
    terms = [k3, k1]
    if identity and stride == 1 and c_in == c_out:
        terms.append(b.bn(x, c_in))
    return b.add(*terms)


def run_model(model: onnx.ModelProto, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    if any(i.type.tensor_type.elem_type == TensorProto.DOUBLE for i in model.graph.input):
        # onnxruntime has no double Conv kernel
        from onnx.reference import ReferenceEvaluator
        ev = ReferenceEvaluator(model)
        return dict(zip(ev.output_names, ev.run(None, feeds)))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def runs(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime runs the model (random graphs are often invalid ONNX)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, random_feeds(model))
    except Exception:
        return False
    return True


def random_feeds(model: onnx.ModelProto, seed: int = 1, dynamic: int = 2) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else dynamic for d in t.shape.dim]
        feeds[i.name] = rng.standard_normal(dims).astype(helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feeds


def load_npz(path) -> Dict[str, np.ndarray]:
    """Every array of an .npz, read now, the file closed (np.load alone keeps it open)."""
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def assert_matches_the_framework(fused: onnx.ModelProto, path, io_path) -> None:
    """The fused model against the framework's own float64 output (io.npz: input, output_f64) and
    against the training graph it came from, both within float32's 1e-5: as exact as the original."""
    io = load_npz(io_path)
    original = onnx.load(str(path))
    feeds = {original.graph.input[0].name: io["input"]}
    (out,) = run_model(fused, feeds).values()
    (train,) = run_model(original, feeds).values()
    assert max_rel_error(io["output_f64"], out) <= 1e-5
    assert max_rel_error(train, out) <= 1e-5


def op_counts(model: onnx.ModelProto) -> Dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def max_rel_error(ref: np.ndarray, out: np.ndarray) -> float:
    """max|Δ| / max|ref| (max|Δ| when the reference is all zeros)."""
    ref64 = ref.astype(np.float64)
    delta = float(np.max(np.abs(ref64 - out.astype(np.float64)), initial=0.0))
    scale = float(np.max(np.abs(ref64), initial=0.0))
    return delta / scale if scale > 0 else delta


def assert_equivalent(original: onnx.ModelProto, fused: onnx.ModelProto, feeds=None, rtol=None):
    """onnxruntime outputs of both models agree within rtol·max|ref| (float32: 1e-5)."""
    feeds = feeds or random_feeds(original)
    ref, out = run_model(original, feeds), run_model(fused, feeds)
    assert ref.keys() == out.keys()
    for name in ref:
        assert ref[name].shape == out[name].shape, name
        tol = rtol or RTOL[ref[name].dtype.type]
        err = max_rel_error(ref[name], out[name])
        assert err <= tol, f"{name}: max|Δ|/max|ref| = {err:.3e} > {tol:.0e}"


def fuse_and_check(model: onnx.ModelProto, ops: Optional[Dict[str, int]] = None, rules: Sequence[str] = (),
                   feeds=None, **options):
    """Fuse, assert equivalence and (optionally) the op counts; returns the FuseResult."""
    before = model.SerializeToString()
    result = fuse_with_report(model, rules=rules, **options)
    assert model.SerializeToString() == before, "the input model was modified"
    assert_equivalent(model, result.model, feeds)
    if ops is not None:
        counts = op_counts(result.model)
        for op, n in ops.items():
            assert counts.get(op, 0) == n, f"{op}: {counts.get(op, 0)} != {n} in {counts}"
    return result


def assert_untouched(model: onnx.ModelProto, reason: str, identical: bool = True, **options):
    """A block is left with a reason containing `reason`; with identical=True nothing else is
    fused either and the model comes back byte-identical, otherwise what was fused is exact."""
    result = fuse_with_report(model, **options)
    reasons = [b.reason or "" for b in result.report.blocks if not b.fused]
    assert any(reason in r for r in reasons), f"{reason!r} not in {reasons}"
    if identical:
        assert not result.report.fused
        assert result.model.SerializeToString() == model.SerializeToString()
    else:
        assert_equivalent(model, result.model)
    return result


# ---------------------------------------------------------------- the command line

def invoke(args) -> int:
    """cli.main in-process; the exit code."""
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args])
    code = info.value.code
    return 0 if code is None else code


def run_cli(args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reparam_onnx.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    assert "Traceback" not in err
    assert lines[0].startswith("reparam-onnx: error:"), lines[0]
    return lines[0]


def leftovers(folder: Path, keep=()) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------- property tests

# A user rule file: RepVGG under another name, at a priority above the built-in rules.
MY_RULE = """\
name = "my_rule"
summary = "RepVGG, by another name"
priority = 1000

[[terms]]
kind = "conv"
kernel = "square"

[[terms]]
kind = "conv"
kernel = "1x1"
count = [0, 1]

[[terms]]
kind = "identity"
count = [0, 1]
"""


# One rule that accepts every block the engine finds exact: makes rules irrelevant.
PERMISSIVE_RULE = """\
name = "any"
summary = "s"
min_terms = 1
post = ["batchnorm", "affine"]

[[terms]]
kind = "conv"
count = [1, 8]

[[terms]]
kind = "identity"
count = [0, 1]
"""

# hypothesis: the same examples on every run, nothing stored, no per-example deadline
SETTINGS = dict(deadline=None, derandomize=True, database=None)


@pytest.fixture(scope="module")
def permissive_rules(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rules")
    (folder / "any.toml").write_text(PERMISSIVE_RULE)
    return str(folder)


@pytest.fixture
def builder():
    return Builder()
