"""A read-only index over an ONNX graph and a folder for constant parameter subgraphs."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from . import io

# Ops whose output depends on an activation only through its static shape or dtype.
_SHAPE_ONLY_INPUTS = {"Shape": (0,), "Size": (0,), "CastLike": (1,)}
# Ops whose output shape depends on these inputs' shapes, never on their values.
_SHAPE_FOLLOWS = {"Slice": (0,), "Pad": (0,), "Expand": (0,), "Transpose": (0,), "Cast": (0,), "Identity": (0,),
                  "Unsqueeze": (0,), "Squeeze": (0,), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "Div": (0, 1),
                  "Concat": range(1 << 20)}   # every input
# Folding these would replace quantized weights by float ones and change the model's precision.
_QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Ops whose output is not a function of their inputs: evaluating them once would freeze one draw.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout"}
# Constant subgraphs larger than this many elements are not materialized.
MAX_FOLD_ELEMENTS = 1 << 26


class NotConstant(Exception):
    """The tensor depends on a model input (the message says how). `deep`: the walk hit the depth
    limit on the way, so the verdict depends on where the question started."""

    def __init__(self, message: str, deep: bool = False):
        super().__init__(message)
        self.deep = deep


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class GraphIndex:
    """Producers, consumers, initializers, static shapes and constant values of one graph."""

    def __init__(self, graph: onnx.GraphProto, shapes: Dict[str, tuple], opset: int,
                 initializers_are_constant: bool = False, external_base: Optional[str] = None):
        self.graph = graph
        self.opset = opset
        self.producer: Dict[str, onnx.NodeProto] = {}
        self.consumers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
        self.shape_readers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)   # consumers that read only shape/dtype
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            # A subgraph (If/Loop/Scan body) may read outer tensors: count it as a consumer.
            for name in subgraph_reads(node):
                self.consumers[name].append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self._find_shape_readers()
        self.shapes = shapes
        self.initializers_are_constant = initializers_are_constant
        self.external_base = external_base
        self._values: Dict[str, np.ndarray] = {}
        self._not_constant: Dict[str, str] = {}   # tensor → why it is not a constant

    def _find_shape_readers(self) -> None:
        """A consumer reads a tensor only for its shape or dtype when it is Shape, Size or CastLike
        at that position, or an op whose output shape follows from that input's shape (Slice,
        Expand, ...) and whose outputs are themselves read only for their shapes (TorchScript
        takes Shape(Slice(x)) to size a slice assignment). Nodes are in topological order: a
        tensor's readers are classified before its producer (out of order, they count as values)."""
        shape_reads: Dict[str, int] = defaultdict(int)
        for node in reversed(self.graph.node):
            outputs = [o for o in node.output if o]
            follows = bool(outputs) and all(o not in self.outputs and self.consumers.get(o)
                                            and shape_reads[o] == len(self.consumers[o]) for o in outputs)
            for name in node.input:   # once per position, as `consumers` counts them
                if name and shape_only_reader(node, name, follows):
                    self.shape_readers[name].append(node)
                    shape_reads[name] += 1

    def fan_out(self, name: str) -> int:
        return len(self.consumers.get(name, ())) + (name in self.outputs)

    def value_fan_out(self, name: str) -> int:
        """Readers of the tensor's values (a Shape or CastLike reads only its shape or dtype)."""
        return self.fan_out(name) - len(self.shape_readers.get(name, ()))

    def overridable(self, name: str) -> bool:
        """An initializer that is also a graph input can be replaced at run time."""
        return name in self.inputs and name in self.initializers and not self.initializers_are_constant

    def value(self, name: str) -> np.ndarray:
        """The constant value of a tensor, or NotConstant with the reason."""
        if name in self._values:
            return self._values[name]
        return self._compute(name, depth=0)

    def reads_an_input(self, name: str) -> bool:
        """The tensor is computed from a graph input that is not an initializer (an activation)."""
        stack, seen = [name], set()
        while stack:
            t = stack.pop()
            if t in seen or t in self.initializers:
                continue
            seen.add(t)
            if t in self.inputs:
                return True
            node = self.producer.get(t)
            if node is not None:
                stack.extend(i for i in node.input if i)
        return False

    def know(self, name: str, value: np.ndarray) -> None:
        """The value of a tensor whose initializer holds no data of its own (a fused weight
        kept apart until the save)."""
        self._values[name] = value

    def forget(self, names) -> None:
        """Drop the cached values of these tensors (their arrays are freed when no one else holds them)."""
        for name in names:
            self._values.pop(name, None)

    def try_value(self, name: str) -> Optional[np.ndarray]:
        try:
            return self.value(name)
        except NotConstant:
            return None

    def _compute(self, name: str, depth: int) -> np.ndarray:
        if name in self._values:
            return self._values[name]
        if name in self._not_constant:   # a verdict reached once holds: the graph does not change
            raise NotConstant(self._not_constant[name])   # a new one: a raised exception keeps its traceback
        if depth > 64:
            raise NotConstant(f"'{name}' is computed by too deep a subgraph", deep=True)
        try:
            value = self._compute_once(name, depth)
        except NotConstant as exc:
            if not exc.deep:
                self._not_constant[name] = str(exc)
            raise
        self._values[name] = value
        return value

    def _compute_once(self, name: str, depth: int) -> np.ndarray:
        if name in self.initializers:
            if self.overridable(name):
                raise NotConstant(f"'{name}' is a graph input (it can be overridden at run time)")
            tensor = self.initializers[name]
            _check_size(tensor.dims, name)
            # a weight load(lazy=True) left in its file is read from there
            value = io.lazy_array(tensor) if io.lazy(tensor) else numpy_helper.to_array(tensor, self.external_base or "")
        elif name in self.inputs:
            raise NotConstant(f"'{name}' is a graph input")
        elif name in self.producer:
            node = self.producer[name]
            value = self._evaluate(node, name, depth)
        else:
            raise NotConstant(f"'{name}' is not produced by any node")
        return value

    def _evaluate(self, node: onnx.NodeProto, name: str, depth: int) -> np.ndarray:
        if node.domain not in ("", "ai.onnx"):
            raise NotConstant(f"'{name}' comes from {node.domain}.{node.op_type}")
        if _nondeterministic(node):
            raise NotConstant(f"'{name}' comes from the non-deterministic {node.op_type} '{node.name}'")
        if node.op_type in _QUANTIZED:
            raise NotConstant(f"'{name}' is quantized ({node.op_type} '{node.name}'); Q/DQ weights are left alone")
        if node.op_type == "Constant":
            return _constant_value(node)
        if node.op_type == "Identity":
            return self._compute(node.input[0], depth + 1)
        if node.op_type == "Gather" and getattr(self.producer.get(node.input[0]), "op_type", None) == "Shape":
            return self._gather_dims(node, name, depth)
        shape_only = _SHAPE_ONLY_INPUTS.get(node.op_type, ())
        feeds = {}
        for pos, inp in enumerate(node.input):
            if not inp:
                continue
            if pos in shape_only:
                feeds[inp] = self._shape_stand_in(node, inp)
            else:
                feeds[inp] = self._compute(inp, depth + 1)
        size = output_size(node, [feeds.get(i) if i else None for i in node.input])
        if size is not None and size > MAX_FOLD_ELEMENTS:   # refused before anything is allocated
            raise NotConstant(f"'{name}' is too large to fold ({node.op_type} '{node.name}' makes {size:,} elements)")
        return _run_node(node, feeds, name, self.opset)

    def _gather_dims(self, node: onnx.NodeProto, name: str, depth: int) -> np.ndarray:
        """Gather(Shape(t), i): the dims picked, when those are static, though others of t are not
        (the dynamo exporter reads H of a tensor whose batch is dynamic)."""
        shape_node = self.producer[node.input[0]]
        info = self.shapes.get(shape_node.input[0])
        if info is None or info[0] is None or attributes(node).get("axis", 0) != 0:
            raise NotConstant(f"Gather '{node.name}' reads the shape of '{shape_node.input[0]}', which is unknown")
        dims = list(info[0])
        attrs = attributes(shape_node)
        start, end = (int(attrs.get(k, d)) for k, d in (("start", 0), ("end", len(dims))))
        dims = dims[slice(start, end)]
        indices = np.asarray(self._compute(node.input[1], depth + 1))
        try:
            picked = [dims[int(i)] for i in indices.reshape(-1)]
        except IndexError:
            raise NotConstant(f"Gather '{node.name}' indexes past the shape it reads") from None
        if any(d is None for d in picked):
            raise NotConstant(f"Gather '{node.name}' picks a dynamic dim of '{shape_node.input[0]}'")
        return np.array(picked, np.int64).reshape(indices.shape)

    def _shape_stand_in(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        """A zero array with the activation's static shape and dtype, for ops that read only those."""
        try:
            return self._compute(name, 1)
        except NotConstant:
            pass
        info = self.shapes.get(name)
        if info is None or info[0] is None:
            raise NotConstant(f"{node.op_type} '{node.name}' reads '{name}', whose shape is unknown")
        dims, dtype = info
        if node.op_type == "CastLike":
            return np.zeros((), dtype)
        if any(d is None for d in dims):
            raise NotConstant(f"{node.op_type} '{node.name}' reads '{name}', whose shape is dynamic")
        return np.zeros(dims, dtype)


def shape_only_reader(node: onnx.NodeProto, name: str, outputs_shape_only: bool = False) -> bool:
    """`node` reads `name` only for its shape or dtype (every position it appears at is such);
    `outputs_shape_only`: the node's outputs are read only for their shapes."""
    if node.domain not in ("", "ai.onnx") or name in subgraph_reads(node):
        return False
    positions = [pos for pos, inp in enumerate(node.input) if inp == name]
    follows = _SHAPE_FOLLOWS.get(node.op_type, ()) if outputs_shape_only else ()
    return all(pos in _SHAPE_ONLY_INPUTS.get(node.op_type, ()) or pos in follows for pos in positions)


def unique_name(name: str, used: set) -> str:
    """`name`, or `name_2`, `name_3`, ... : the first not in `used` (which then holds it)."""
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}_{n}"
    used.add(candidate)
    return candidate


def subgraph_reads(node: onnx.NodeProto) -> set:
    """Every tensor name read inside the node's subgraphs (over-approximates outer-scope reads)."""
    names = set()
    for attr in node.attribute:
        graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for g in graphs:
            for sub in g.node:
                names.update(i for i in sub.input if i)
                names.update(subgraph_reads(sub))
    return names


def _nondeterministic(node: onnx.NodeProto) -> bool:
    """The node, or a node of its subgraphs, draws random numbers (Dropout may: its ratio
    and training_mode can be inputs)."""
    if node.op_type in NONDETERMINISTIC:
        return True
    for attr in node.attribute:
        graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        if any(_nondeterministic(sub) for g in graphs for sub in g.node):
            return True
    return False


def reads(nodes) -> set:
    """Every tensor name the nodes read, subgraphs included."""
    names = set()
    for node in nodes:
        names.update(node.input)
        names.update(subgraph_reads(node))
    return names


def _check_size(dims, name):
    if math.prod(int(d) for d in dims) > MAX_FOLD_ELEMENTS:   # Python ints: no overflow
        raise NotConstant(f"'{name}' is too large to fold ({list(dims)})")


def output_size(node: onnx.NodeProto, values: List[Optional[np.ndarray]]) -> Optional[int]:
    """The element count of the output of an op that can make more elements than it reads (its
    inputs' values say how many), from those values alone; None for other ops (their output is
    no larger than their inputs, which are folded under the limit already) or when unsure."""
    def v(i):
        return values[i] if i < len(values) and values[i] is not None else None

    def prod(dims) -> int:
        return math.prod(max(int(d), 0) for d in dims)   # Python ints: no overflow

    op, x = node.op_type, v(0)
    try:
        if op == "Range" and all(v(i) is not None for i in range(3)):
            start, limit, delta = (float(np.asarray(v(i)).reshape(-1)[0]) for i in range(3))
            return max(math.ceil((limit - start) / delta), 0) if delta else None
        if op == "ConstantOfShape" and x is not None:
            return prod(np.asarray(x).reshape(-1))
        if op == "Expand" and x is not None and v(1) is not None:
            shape, target = list(x.shape), [int(d) for d in np.asarray(v(1)).reshape(-1)]
            rank = max(len(shape), len(target))
            shape, target = [1] * (rank - len(shape)) + shape, [1] * (rank - len(target)) + target
            return prod(max(a, b) for a, b in zip(shape, target))
        if op == "Tile" and x is not None and v(1) is not None:
            return prod(a * int(r) for a, r in zip(x.shape, np.asarray(v(1)).reshape(-1)))
        if op == "Pad" and x is not None and v(1) is not None:
            pads = [int(p) for p in np.asarray(v(1)).reshape(-1)]
            if len(pads) == 2 * x.ndim:
                return prod(d + pads[k] + pads[k + x.ndim] for k, d in enumerate(x.shape))
        if op == "OneHot" and x is not None and v(1) is not None:
            return x.size * max(int(np.asarray(v(1)).reshape(-1)[0]), 0)
        if op == "MatMul" and x is not None and v(1) is not None:
            a, b = x.shape, v(1).shape
            batch = np.broadcast_shapes(a[:-2], b[:-2]) if len(a) > 2 or len(b) > 2 else ()
            return prod(batch) * (a[-2] if len(a) > 1 else 1) * (b[-1] if len(b) > 1 else 1)
        if op == "Gemm" and x is not None and v(1) is not None and x.ndim == 2 and v(1).ndim == 2:
            attrs = attributes(node)
            rows = x.shape[1] if attrs.get("transA", 0) else x.shape[0]
            cols = v(1).shape[0] if attrs.get("transB", 0) else v(1).shape[1]
            return rows * cols
        if op == "Einsum":
            spec = attributes(node).get("equation", b"")
            spec = (spec.decode() if isinstance(spec, bytes) else spec).replace(" ", "")
            lhs, _, rhs = spec.partition("->")
            if "." in spec or not rhs or any(val is None for val in values):
                return None
            sizes = {}
            for term, val in zip(lhs.split(","), values):
                sizes.update(zip(term, val.shape))
            return prod(sizes.get(c, 1) for c in rhs)
    except (ValueError, TypeError, OverflowError, IndexError):
        return None
    return None


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    value = onnx.helper.get_attribute_value(attr)
    kinds = {"value_float": np.float32, "value_int": np.int64, "value_floats": np.float32, "value_ints": np.int64}
    if attr.name in kinds:
        return np.asarray(value, kinds[attr.name])
    raise NotConstant(f"Constant '{node.name}' uses the unsupported attribute {attr.name}")


def _run_node(node: onnx.NodeProto, feeds: Dict[str, np.ndarray], name: str, opset: int) -> np.ndarray:
    """Evaluate one node on constant inputs with onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator
    inputs = [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in feeds.items()]
    outputs = [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = onnx.helper.make_graph([node], "fold", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        results = ReferenceEvaluator(model).run(None, feeds)
    except Exception as exc:  # the reference evaluator raises many kinds
        raise NotConstant(f"cannot evaluate {node.op_type} '{node.name}': {type(exc).__name__}") from None
    value = results[[o for o in node.output if o].index(name)]
    value = np.asarray(value)
    _check_size(value.shape, name)
    return value
