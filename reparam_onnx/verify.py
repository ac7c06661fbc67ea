"""onnxruntime equivalence check of the input and the fused model.

Both models run on the same seeded random inputs; every float graph output and every
fused block's output tensor (the fused Conv keeps the block's output name) is
compared. The error of a tensor is max|Δ| / max|ref|; see compare() for when it passes.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper

from . import io
from .report import Verification
from .shapes import SPATIAL, input_dims

DEFAULT_RTOL = {np.dtype(np.float16): 1e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-9}
MAX_INPUT_ELEMENTS = 1 << 28   # random inputs larger than this are not materialized
NOISE_FACTOR = 4               # how many times the original's own float rounding a fused model may differ
MOSTLY_NONFINITE = 0.5         # above this share of NaN/inf reference values, retry on non-negative inputs
UNSTABLE = 1e-3                # a one-ulp input nudge moving an output by this much (relative) is chaos


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
    """Seeded standard-normal float inputs (zeros for other types) at shapes.input_dims."""
    rng = np.random.default_rng(seed)
    dims_of = input_dims(model, spatial)
    feeds = {}
    for info in model.graph.input:
        if info.name not in dims_of:
            if info.name not in {t.name for t in model.graph.initializer}:
                raise ValueError(f"input '{info.name}' is not a tensor")
            continue
        dims = dims_of[info.name]
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        except KeyError:
            raise ValueError(f"input '{info.name}' has no usable element type") from None
        feeds[info.name] = random_array(dims, dtype, rng, info.name)
    return feeds


def random_array(dims: Sequence[int], dtype, rng, name: str) -> np.ndarray:
    if math.prod(dims) > MAX_INPUT_ELEMENTS:
        raise ValueError(f"input '{name}' of shape {list(dims)} is too large to verify; pass --inputs")
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(dims).astype(dtype)
    return np.zeros(dims, dtype)


class _Runner:
    """One model in one onnxruntime session (onnx's reference evaluator where onnxruntime
    lacks a kernel, e.g. double Conv), exposing `extra` intermediate tensors as outputs.

    The model is only read: the session is built from a skeleton beside it (see _skeleton),
    whose large weights are graph inputs fed with every run from arrays the runner holds:
    onnxruntime reads them where they are. (Given as initializers, onnxruntime would copy
    them in, and a model's weights would be in memory twice more while its session is made.)"""

    def __init__(self, model, extra: Iterable[str] = (), types: Optional[Dict[str, int]] = None,
                 given: Sequence[str] = ()):
        """`model`: a ModelProto, or (ModelProto, {stub initializer: array}); `given`: tensors fed
        as inputs instead of computed (their producers are left out)."""
        model, arrays = model if isinstance(model, tuple) else (model, {})
        skeleton, weights = _skeleton(model)
        _expose(skeleton, extra, given, types or {})
        self.weights = {name: np.ascontiguousarray(a) for name, a in {**weights, **arrays}.items()}
        try:
            self.session = _session(skeleton, self.weights)
            self.evaluator = None
        except Exception as exc:
            if "NOT_IMPLEMENTED" not in str(exc):
                raise
            from onnx.reference import ReferenceEvaluator   # small models in practice (double Conv)
            full = _with_data(skeleton, self.weights)
            self.session, self.evaluator, self.weights = None, ReferenceEvaluator(full), {}

    def __call__(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if self.evaluator is not None:
            return dict(zip(self.evaluator.output_names, self.evaluator.run(None, feeds)))
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, {**feeds, **self.weights})))


def _expose(model: onnx.ModelProto, extra: Iterable[str], given: Sequence[str], types: Dict[str, int]) -> None:
    """Intermediate tensors `extra` become graph outputs; tensors `given` become graph inputs,
    and the nodes that produce them are left out."""
    graph = model.graph
    present = {o.name for o in graph.output}
    for name in extra:
        if name not in present and name in types:
            graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    given = set(given)
    if given:
        kept = [n for n in graph.node if not any(o in given for o in n.output)]
        del graph.node[:]
        graph.node.extend(kept)
        for name in sorted(given):
            graph.input.append(onnx.helper.make_tensor_value_info(name, types[name], None))


def _skeleton(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, Dict[str, np.ndarray]]:
    """A copy of the model whose initializers of 1 KiB and more are stubs (name, type, dims,
    an external location never read), and {stub: its data as an array} for _session. Nothing
    of the model is modified, and no weight is copied into another protobuf (a model over
    2 GiB then still serializes)."""
    out, tensors = _split(model)
    return out, {name: _array(tensor) for name, tensor in tensors.items()}


def _split(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, Dict[str, onnx.TensorProto]]:
    """_skeleton's copy, and {stub: the model's own tensor it stands for} (not read)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip={"graph"})
    _copy_fields(model.graph, out.graph, skip={"initializer"})
    tensors = {}
    for tensor in model.graph.initializer:
        if io.lazy(tensor):   # left in its data file by io.load: read from there when a runner is made
            tensors[tensor.name] = tensor
            out.graph.initializer.add().CopyFrom(_stub(tensor.name, tensor.data_type, tensor.dims))
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type not in _PLAIN \
                or not tensor.HasField("raw_data") or math.prod(tensor.dims) * _itemsize(tensor) < EXTERNAL_MIN_BYTES:
            out.graph.initializer.add().CopyFrom(tensor)
            continue
        tensors[tensor.name] = tensor
        out.graph.initializer.add().CopyFrom(_stub(tensor.name, tensor.data_type, tensor.dims))
    return out, tensors


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    if io.lazy(tensor):
        return io.lazy_array(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(tensor.raw_data, dtype).reshape(tuple(tensor.dims))


class _Arrays(Mapping):
    """{stub: array} whose arrays are read from the tensors when asked (each time: a session's
    copy goes with its runner)."""

    def __init__(self, tensors: Dict[str, onnx.TensorProto]):
        self.tensors = tensors

    def __getitem__(self, name: str) -> np.ndarray:
        return _array(self.tensors[name])

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def reference(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, Mapping]:
    """The model as compare() and _Runner read it, taken before the model is edited in place:
    _skeleton's copy (small), and its large weights read from the model's own TensorProtos
    only when a runner is made, so no second copy of the model is kept while it is edited.
    The edit may remove those tensors from the graph (protobuf keeps a removed message alive
    for whoever holds it) but must not change them; the fusion never does (it adds new
    initializers and removes replaced ones)."""
    out, tensors = _split(model)
    return out, _Arrays(tensors)


def _copy_fields(source, target, skip) -> None:
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):        # a repeated field
            getattr(target, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):    # a message
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _itemsize(tensor: onnx.TensorProto) -> int:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def _stub(name: str, data_type: int, dims) -> onnx.TensorProto:
    stub = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=onnx.TensorProto.EXTERNAL)
    entry = stub.external_data.add()
    entry.key, entry.value = "location", "reparam-onnx-initializers"   # never read: supplied as arrays
    return stub


# Ops whose outputs do not move continuously with their inputs: a ranking, a selection, a
# random draw. Float rounding can flip a choice (RT-DETR's TopK query selection, NMS), so the
# fused model is run on the original's choices, and what follows them is compared.
CHOICE_OPS = {"TopK", "ArgMax", "ArgMin", "NonMaxSuppression", "Unique", "NonZero", "RandomNormal",
              "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def choices(original: onnx.ModelProto, fused: onnx.ModelProto, types: Dict[str, int]) -> List[str]:
    """Outputs of the choice ops both models have (same outputs), whose element types are known."""
    if not types:   # nothing can be fed (a block run alone has no choice ops)
        return []

    def nodes(model):
        return [n for n in model.graph.node if n.op_type in CHOICE_OPS and n.domain in ("", "ai.onnx")]
    shared = {tuple(n.output) for n in nodes(original)}
    outputs = {o.name for o in fused.graph.output}
    names = []
    for node in nodes(fused):
        produced = [o for o in node.output if o]
        if tuple(node.output) in shared and all(o in types and o not in outputs for o in produced):
            names.extend(produced)
    return names


def _session(model: onnx.ModelProto, arrays: Dict[str, np.ndarray]):
    """An onnxruntime session of the model as written (graph optimizations off: runtime fusions
    would blur what is compared), its stub initializers `arrays` turned into graph inputs (the
    caller feeds them with every run)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4   # errors come back as exceptions; the runtime's own log stays quiet
    threads = os.environ.get(THREADS_ENV, "")
    if threads.isdigit() and int(threads) > 0:   # set by the batch for its workers
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(_fed(model, arrays).SerializeToString(), options, providers=["CPUExecutionProvider"])


def _fed(model: onnx.ModelProto, arrays: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the skeleton whose initializers named in `arrays` are graph inputs instead
    (of their type and shape; already inputs in IR < 4 models, they stay as they are)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip={"graph"})
    _copy_fields(model.graph, out.graph, skip={"initializer"})
    inputs = {i.name for i in out.graph.input}
    for tensor in model.graph.initializer:
        if tensor.name not in arrays:
            out.graph.initializer.add().CopyFrom(tensor)
        elif tensor.name not in inputs:
            out.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return out


def _with_data(model: onnx.ModelProto, arrays: Dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, tensor in enumerate(out.graph.initializer):
        if tensor.name in arrays:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(arrays[tensor.name]), tensor.name))
    return out


EXTERNAL_MIN_BYTES = 1024
THREADS_ENV = "REPARAM_ONNX_ORT_THREADS"   # onnxruntime threads per session (the batch sets it per worker)
_PLAIN = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
          onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
          onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    """max|Δ| / max|ref| over the finite values (max|Δ| when they are all zero); inf when the
    NaN/inf positions or values differ."""
    ref, val = np.asarray(reference, np.float64), np.asarray(value, np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(val)) or \
            not np.array_equal(ref[~finite], val[~finite], equal_nan=True):
        return float("inf")
    delta = _max_abs_diff(ref[finite], val[finite])
    scale = float(np.max(np.abs(ref[finite]), initial=0.0))
    return delta / scale if scale > 0 else delta


Model = Union[onnx.ModelProto, Tuple[onnx.ModelProto, Mapping]]   # a model, or (skeleton, {stub: array})


def compare(original: Model, fused: Model, block_outputs: Iterable[str],
            types: Dict[str, int], runs: Sequence[Dict[str, np.ndarray]], seed: int = 0,
            rtol: Optional[float] = None, atol: float = 0.0, random: bool = True) -> Verification:
    """Run both models on every feed set of `runs` and compare their float outputs (each a
    ModelProto, or a skeleton and its stubs' arrays: see reference()).

    A tensor passes when its NaN/inf positions and values agree and, over the finite
    values, max|Δ| ≤ atol + max(rtol·max|ref|, NOISE_FACTOR·noise). With the default rtol,
    `noise` is how far the original model itself moves when its float inputs move by one
    unit in the last place: where an output cancels (a near-zero sum of large terms, a Relu
    that zeroes almost everything), max|ref| is no measure of float rounding, and the
    original's own sensitivity is. A wrong kernel moves outputs by far more. An explicit
    rtol is applied as given. When `random` inputs give NaN/inf on most reference values
    (a Sqrt or Log of negative values, say), the comparison is redone on their absolute
    values, and the message says so.
    """
    block_outputs = list(block_outputs)
    chosen = choices(original[0] if isinstance(original, tuple) else original,
                     fused[0] if isinstance(fused, tuple) else fused, types)
    try:   # one session at a time: a large model's two runtime copies never coexist
        reference = _Runner(original, block_outputs + chosen, types)
        refs = [reference(feeds) for feeds in runs]
        message = ""
        if random and _nonfinite_share(refs) > MOSTLY_NONFINITE:
            share = _nonfinite_share(refs)
            runs = [{k: np.abs(v) if np.issubdtype(v.dtype, np.floating) else v for k, v in feeds.items()}
                    for feeds in runs]
            refs = [reference(feeds) for feeds in runs]
            message = (f"the original gives NaN/inf on {share:.0%} of its output values on random normal inputs; "
                       f"compared on non-negative inputs instead (pass --inputs for real data)")
        if chosen:   # the nudged original and the fused model make the original's choices
            del reference
            reference = _Runner(original, block_outputs, types, given=chosen)
            runs = [{**feeds, **{name: ref[name] for name in chosen}} for feeds, ref in zip(runs, refs)]
            message = "; ".join(filter(None, [message, (
                f"the outputs of {len(chosen)} choice tensor(s) ({', '.join(sorted(chosen)[:3])}"
                f"{', …' if len(chosen) > 3 else ''}: TopK, NMS, ArgMax, random draws) were taken from the original "
                f"for the fused model, since float rounding can flip a choice")]))
        nudged = _nudged(reference, runs, seed, keep=chosen) if rtol is None else [{} for _ in runs]
        del reference
        candidate = _Runner(fused, block_outputs, types, given=chosen)
        outs = [candidate(feeds) for feeds in runs]
        del candidate
    except Exception as exc:  # onnxruntime raises many kinds; the message is what matters
        text = str(exc).strip().splitlines()
        return Verification(ran=False, passed=False, message=f"onnxruntime could not run the models: "
                            f"{text[0] if text else type(exc).__name__}")
    errors: Dict[str, float] = {}
    noise: Dict[str, float] = {}
    unstable: Dict[str, float] = {}
    failed, tolerances = [], set()
    for ref, out, moved in zip(refs, outs, nudged):
        for name, value in ref.items():
            other = out.get(name)
            if other is None or not np.issubdtype(value.dtype, np.floating):
                continue  # discrete outputs (ArgMax, TopK indices) flip on rounding; blocks are compared instead
            tol = rtol if rtol is not None else DEFAULT_RTOL.get(value.dtype, 1e-5)
            tolerances.add(tol)
            scale = _finite_max_abs(value)
            error = relative_error(value, other) if value.shape == other.shape else float("inf")
            errors[name] = max(errors.get(name, 0.0), error)
            floor = 0.0
            if name in moved and moved[name].shape == value.shape:
                wobble = relative_error(value, moved[name])
                if math.isfinite(wobble):
                    floor = NOISE_FACTOR * (wobble * scale if scale > 0 else wobble)
                    noise[name] = max(noise.get(name, 0.0), floor / NOISE_FACTOR)
                    if wobble > UNSTABLE:
                        unstable[name] = max(unstable.get(name, 0.0), wobble)
            delta = error * scale if scale > 0 else error     # max|Δ| over the finite values
            if not (math.isfinite(error) and delta <= atol + floor + tol * scale):
                failed.append(name)
    if failed and rtol is not None:   # no floor was needed to decide; the nudge still explains a failure
        try:
            for ref, moved in zip(refs, _nudged(_Runner(original, block_outputs, types, given=chosen), runs, seed,
                                                keep=chosen)):
                for name in failed:
                    if name in moved and moved[name].shape == ref[name].shape:
                        wobble = relative_error(ref[name], moved[name])
                        if wobble > UNSTABLE:
                            unstable[name] = max(unstable.get(name, 0.0), wobble)
        except Exception:  # it ran once; if it does not now, there is nothing to add
            pass
    if failed:
        chaotic = [n for n in dict.fromkeys(failed) if n in unstable]
        if chaotic:
            name = chaotic[0]
            message = "; ".join(filter(None, [
                f"the original itself is unstable on the random inputs: a one-ulp change of its inputs "
                f"moves '{name}' by {unstable[name]:.1e} (max|Δ|/max|ref|); pass --inputs with real data", message]))
    return Verification(ran=True, passed=not failed, message=message,
                        tolerance={"rtol": max(tolerances, default=rtol or 1e-5), "atol": atol},
                        errors=errors, inputs={k: list(v.shape) for k, v in runs[0].items() if k not in chosen},
                        runs=len(runs),
                        noise=noise)


def _nudged(reference: "_Runner", runs, seed: int, keep: Sequence[str] = ()) -> List[Dict[str, np.ndarray]]:
    """The reference on its inputs moved by one ulp (`keep`: given tensors, not moved)."""
    rng = np.random.default_rng(seed + 1)
    return [reference({**_nudge(feeds, rng), **{k: feeds[k] for k in keep}}) for feeds in runs]


def _nonfinite_share(results: Sequence[Dict[str, np.ndarray]]) -> float:
    total = bad = 0
    for result in results:
        for value in result.values():
            if np.issubdtype(value.dtype, np.floating):
                total += value.size
                bad += int(np.count_nonzero(~np.isfinite(value)))
    return bad / total if total else 0.0


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


def _finite_max_abs(value) -> float:
    value = np.asarray(value, np.float64)
    return float(np.max(np.abs(value[np.isfinite(value)]), initial=0.0))


def _max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


def check_block(source: str, dtype, output: str, original, fused, model: onnx.ModelProto,
                runs: Sequence[Dict[str, np.ndarray]], seed: int = 0, rtol: Optional[float] = None,
                atol: float = 0.0) -> Verification:
    """Run a block and its replacement alone, from `source` to `output`, on each feed set of
    `runs` (arrays for `source`). `original` and `fused` are (nodes, {parameter: array}): large
    arrays reach onnxruntime as they are, without a TensorProto copy."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rank = runs[0][source].ndim

    def build(nodes, params):
        graph = onnx.helper.make_graph(
            list(nodes), "block", [onnx.helper.make_tensor_value_info(source, elem, [None] * rank)],
            [onnx.helper.make_tensor_value_info(output, elem, None)],
            [_initializer(name, array) for name, array in sorted(params.items())])
        block = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
        block.ir_version = model.ir_version
        return block, {n: a for n, a in params.items() if np.asarray(a).nbytes >= EXTERNAL_MIN_BYTES}

    return compare(build(*original), build(*fused), [], {}, runs, seed=seed, rtol=rtol, atol=atol, random=False)


def _initializer(name: str, array) -> onnx.TensorProto:
    """The initializer itself when small, else a stub (name, type, dims) whose data _session supplies."""
    array = np.asarray(array)
    if array.nbytes < EXTERNAL_MIN_BYTES or array.dtype.kind not in "fiub":
        return numpy_helper.from_array(array, name)
    return _stub(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
