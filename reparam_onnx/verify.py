"""onnxruntime equivalence check of the input and the fused model.

Both models run on the same seeded random inputs; every float graph output and every
fused block's output tensor (the fused Conv keeps the block's output name) is
compared. The error of a tensor is max|Δ| / max|ref|; it passes when
max|Δ| ≤ atol + rtol·max|ref|.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterable, Optional

import numpy as np
import onnx

from .report import Verification

DEFAULT_RTOL = {np.dtype(np.float16): 1e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-9}
BATCH = 2        # stands in for a dynamic batch dimension
SPATIAL = 17     # stands in for other dynamic dimensions: odd on purpose
MAX_INPUT_ELEMENTS = 1 << 28   # random inputs larger than this are not materialized
NOISE_FACTOR = 4               # how many times the original's own float rounding a fused model may differ


def too_large(shapes: Dict[str, tuple], names: Optional[Iterable[str]] = None) -> Optional[str]:
    """The first tensor (of `names`, or all) whose static size exceeds MAX_INPUT_ELEMENTS, as a message."""
    for name in (shapes if names is None else names):
        dims = shapes.get(name, (None, None))[0]
        if dims and math.prod(d for d in dims if d) > MAX_INPUT_ELEMENTS:
            return f"'{name}' of shape {list(dims)} is too large to run"
    return None


def has_dynamic_spatial(model: onnx.ModelProto) -> bool:
    """Whether an input has a dynamic dimension past the first (batch) one."""
    initializers = {t.name for t in model.graph.initializer}
    return any(not (d.HasField("dim_value") and d.dim_value > 0)
               for i in model.graph.input if i.name not in initializers
               for d in list(i.type.tensor_type.shape.dim)[1:])


def random_inputs(model: onnx.ModelProto, seed: int, spatial: int = SPATIAL) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for info in model.graph.input:
        if info.name in initializers:
            continue
        t = info.type.tensor_type
        if not info.type.HasField("tensor_type"):
            raise ValueError(f"input '{info.name}' is not a tensor")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (BATCH if i == 0 else spatial)
                for i, d in enumerate(t.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if int(np.prod(dims, dtype=np.float64)) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input '{info.name}' of shape {dims} is too large to verify; pass --inputs")
        if np.issubdtype(dtype, np.floating):
            feeds[info.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[info.name] = np.zeros(dims, dtype)
    return feeds


@contextmanager
def _extra_outputs(model: onnx.ModelProto, names: Iterable[str], types: Dict[str, int]):
    """Temporarily expose intermediate tensors as graph outputs (the model is restored afterwards)."""
    present = {o.name for o in model.graph.output}
    added = [n for n in names if n not in present and n in types]
    for name in added:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    try:
        yield
    finally:
        for _ in added:
            model.graph.output.pop()


def _session(model_bytes: bytes):
    import onnxruntime as ort
    options = ort.SessionOptions()
    # Run the graphs as written: runtime fusions would blur what is being compared.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4   # errors come back as exceptions; the runtime's own log stays quiet
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: Dict[str, np.ndarray], extra: Iterable[str] = (),
        types: Optional[Dict[str, int]] = None) -> Dict[str, np.ndarray]:
    with _extra_outputs(model, extra, types or {}):
        try:
            session = _session(model.SerializeToString())
        except Exception as exc:
            if "NOT_IMPLEMENTED" not in str(exc):
                raise
            # onnxruntime lacks some kernels (double Conv, for one): use onnx's reference evaluator.
            from onnx.reference import ReferenceEvaluator
            evaluator = ReferenceEvaluator(model)
            return dict(zip(evaluator.output_names, evaluator.run(None, feeds)))
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))


def relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    """max|Δ| / max|ref| (max|Δ| when the reference is all zeros)."""
    ref = np.asarray(reference, np.float64)
    delta = float(np.max(np.abs(ref - np.asarray(value, np.float64)), initial=0.0))
    scale = float(np.max(np.abs(ref), initial=0.0))
    if np.isnan(delta):
        return float("inf")
    return delta / scale if scale > 0 else delta


def compare(original: onnx.ModelProto, fused: onnx.ModelProto, block_outputs: Iterable[str],
            types: Dict[str, int], seed: int = 0, rtol: Optional[float] = None, atol: float = 0.0,
            inputs: Optional[Dict[str, np.ndarray]] = None) -> Verification:
    """Compare on the given inputs, or on random ones: at an odd and an even size when an
    input has dynamic dimensions past the batch one (SAME padding moves taps with parity).

    A tensor passes when max|Δ| ≤ atol + max(rtol·max|ref|, NOISE_FACTOR·noise). With the
    default rtol, `noise` is how far the original model itself moves when its float inputs
    move by one unit in the last place: where an output cancels (a near-zero sum of large
    terms, a Relu that zeroes almost everything), max|ref| is no measure of float rounding,
    and the original's own sensitivity is. A wrong kernel moves outputs by far more. An
    explicit rtol is applied as given.
    """
    if inputs is not None:
        runs = [inputs]
    else:
        sizes = (SPATIAL, SPATIAL - 1) if has_dynamic_spatial(original) else (SPATIAL,)
        try:
            runs = [random_inputs(original, seed, size) for size in sizes]
        except ValueError as exc:
            return Verification(ran=False, passed=False, message=str(exc))
    errors: Dict[str, float] = {}
    noise: Dict[str, float] = {}
    passed, tolerances = True, set()
    block_outputs = list(block_outputs)
    rng = np.random.default_rng(seed + 1)
    for feeds in runs:
        try:
            ref = run(original, feeds, block_outputs, types)
            out = run(fused, feeds, block_outputs, types)
            nudged = run(original, _nudge(feeds, rng), block_outputs, types) if rtol is None else {}
        except Exception as exc:  # onnxruntime raises many kinds; the message is what matters
            text = str(exc).strip().splitlines()
            return Verification(ran=False, passed=False, message=f"onnxruntime could not run the models: "
                                f"{text[0] if text else type(exc).__name__}")
        for name, reference in ref.items():
            value = out.get(name)
            if value is None or not np.issubdtype(reference.dtype, np.floating):
                continue  # discrete outputs (ArgMax, TopK indices) flip on rounding; blocks are compared instead
            tol = rtol if rtol is not None else DEFAULT_RTOL.get(reference.dtype, 1e-5)
            tolerances.add(tol)
            if reference.shape != value.shape:
                errors[name], passed = float("inf"), False
                continue
            errors[name] = max(errors.get(name, 0.0), relative_error(reference, value))
            floor = 0.0
            if name in nudged and nudged[name].shape == reference.shape:
                floor = NOISE_FACTOR * _max_abs_diff(reference, nudged[name])
                noise[name] = max(noise.get(name, 0.0), floor / NOISE_FACTOR)
            passed = passed and _within(reference, value, tol, atol + floor)
    return Verification(ran=True, passed=passed, tolerance={"rtol": max(tolerances, default=rtol or 1e-5),
                                                            "atol": atol},
                        errors=errors, inputs={k: list(v.shape) for k, v in runs[0].items()}, runs=len(runs),
                        noise=noise)


def _nudge(feeds: Dict[str, np.ndarray], rng) -> Dict[str, np.ndarray]:
    """Float inputs moved by one unit in the last place, up or down at random."""
    out = {}
    for name, value in feeds.items():
        if np.issubdtype(value.dtype, np.floating):
            direction = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(value.dtype)
            out[name] = np.nextafter(value, direction)
        else:
            out[name] = value
    return out


def _within(reference, value, rtol, atol) -> bool:
    ref = np.asarray(reference, np.float64)
    delta = np.max(np.abs(ref - np.asarray(value, np.float64)), initial=0.0)
    return bool(delta <= atol + rtol * np.max(np.abs(ref), initial=0.0))


def _max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


def check_block(source: str, dims, dtype, output: str, original, fused, model: onnx.ModelProto,
                seed: int = 0, rtol: Optional[float] = None, atol: float = 0.0) -> Verification:
    """Run a block and its replacement alone, from `source` to `output`.

    `original` and `fused` are (nodes, initializers). Inputs: the block input's static
    shape; a dynamic first axis becomes 2, other dynamic axes an odd and an even size.
    """
    if dims is None or dtype is None:
        return Verification(ran=False, passed=False, message=f"the shape of '{source}' is unknown")
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def build(nodes, inits):
        graph = onnx.helper.make_graph(
            list(nodes), "block", [onnx.helper.make_tensor_value_info(source, elem, list(dims))],
            [onnx.helper.make_tensor_value_info(output, elem, None)], list(inits))
        block = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
        block.ir_version = model.ir_version
        return block

    return compare(build(*original), build(*fused), [], {}, seed=seed, rtol=rtol, atol=atol)
