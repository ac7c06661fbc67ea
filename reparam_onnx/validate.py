"""What the rewrite relies on, checked once on the way in: an InputError naming the first problem.

onnx's full checker is stricter than runtimes (it rejects graph outputs without a shape,
for one), so it is not the gate; these checks cover what the engine reads: names,
opsets, element types, initializer payloads, node arity and attribute types against
the operator schemas, a topological order (which rules out cycles), and the shape facts
the engine reads from the ops it rewrites (the table SHAPE_CHECKS). Every refusal is a
model that onnxruntime refuses too: only what is known for certain (dims of constants,
static dims of graph inputs) is compared.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import onnx

from .errors import InputError
from .graph import attributes as _attributes

_VALID_TYPES = {v for k, v in onnx.TensorProto.DataType.items() if k != "UNDEFINED"}
# element types whose payload size the check can compute from dims
_FIXED_SIZE = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)).itemsize
               for t in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                         onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.UINT32,
                         onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL)}
_FIXED_SIZE[onnx.TensorProto.BFLOAT16] = 2


def check_model(model: onnx.ModelProto, name: str = "the model",
                raw_lengths: Optional[Sequence[Optional[int]]] = None) -> None:
    """`raw_lengths`: the length of each initializer's raw_data, when known without reading it
    (io.raw_lengths: from the file's record headers); the data is read for those not given."""
    bad = f"{name} is not a valid ONNX model:"
    opset = _default_opset(model, name)
    graph = model.graph
    _check_strings(model, bad)
    if raw_lengths is None or len(raw_lengths) != len(graph.initializer):
        raw_lengths = [None] * len(graph.initializer)
    for t, length in zip(graph.initializer, raw_lengths):
        _check_tensor(t, bad, length)
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type not in _VALID_TYPES | {0}:
            raise InputError(f"{bad} '{info.name}' has the unknown element type {info.type.tensor_type.elem_type}")
    defined = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    for node in graph.node:
        for inp in node.input:
            if inp not in defined:
                later = any(inp in n.output for n in graph.node)
                what = "is produced later (the graph has a cycle or is not sorted)" if later else "is not defined"
                raise InputError(f"{bad} input '{inp}' of node '{node.name}' {what}")
        defined.update(node.output)
        _check_node(node, opset, bad)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):   # its tensor, as an initializer's
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    _check_tensor(attr.t, bad, what=f"the value of Constant node '{node.name}'")
    facts = _Facts(graph)
    for node in graph.node:
        check = SHAPE_CHECKS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        problem = check(node, facts, opset) if check else None
        if problem:
            raise InputError(f"{bad} {node.op_type} node '{node.name}' {problem}")
    for out in graph.output:
        if out.name not in defined:
            raise InputError(f"{bad} graph output '{out.name}' is not produced")


def _default_opset(model: onnx.ModelProto, name: str) -> int:
    known = onnx.defs.onnx_opset_version()
    default = [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")]
    if not default:
        raise InputError(f"{name} has no opset import for the default ONNX domain")
    if default[0] > known or default[0] < 1:
        raise InputError(f"{name} uses opset {default[0]}; this onnx {onnx.__version__} knows up to {known}")
    return default[0]


def _check_strings(model: onnx.ModelProto, bad: str) -> None:
    """Protobuf hands back bytes for a string field that is not valid UTF-8."""
    graph = model.graph
    names = [graph.name] + [t.name for t in graph.initializer]
    names += [i.name for i in list(graph.input) + list(graph.output) + list(graph.value_info)]
    for node in graph.node:
        names += [node.name, node.op_type, node.domain, *node.input, *node.output, *(a.name for a in node.attribute)]
    if not all(isinstance(n, str) for n in names):
        raise InputError(f"{bad} a name is not valid UTF-8 text")


def _check_tensor(t: onnx.TensorProto, bad: str, raw_length: Optional[int] = None, what: Optional[str] = None) -> None:
    what = what or f"initializer '{t.name}'"
    if t.data_type not in _VALID_TYPES:
        raise InputError(f"{bad} {what} has the unknown element type {t.data_type}")
    if any(d < 0 for d in t.dims):
        raise InputError(f"{bad} {what} has negative dims {list(t.dims)}")
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type not in _FIXED_SIZE:
        return
    count = math.prod(int(d) for d in t.dims)
    if t.HasField("raw_data"):
        have = raw_length if raw_length is not None else len(t.raw_data)
        want = count * _FIXED_SIZE[t.data_type]
    else:
        field = onnx.helper.tensor_dtype_to_field(t.data_type)
        have, want = len(getattr(t, field)), count
    if have != want:
        raise InputError(f"{bad} {what} holds {have} values or bytes for dims {list(t.dims)} (expected {want})")


def _check_node(node: onnx.NodeProto, opset: int, bad: str) -> None:
    if node.domain not in ("", "ai.onnx"):
        return   # other domains: the runtime that knows them will judge
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        raise InputError(f"{bad} node '{node.name}' uses the unknown operator {node.op_type} (opset {opset})") \
            from None
    count = len(node.input)
    while count and not node.input[count - 1]:
        count -= 1   # trailing empty names are omitted optional inputs
    if not schema.min_input <= count <= schema.max_input:
        raise InputError(f"{bad} {node.op_type} node '{node.name}' has {count} inputs "
                         f"(expected {schema.min_input} to {schema.max_input})")
    for attr in node.attribute:
        spec = schema.attributes.get(attr.name)
        if spec is not None and int(attr.type) != int(spec.type.value):
            raise InputError(f"{bad} attribute '{attr.name}' of {node.op_type} node '{node.name}' has type "
                             f"{onnx.AttributeProto.AttributeType.Name(attr.type)}, expected {spec.type.name}")


# ---------------------------------------------------------------- shape facts of the rewritten ops

class _Facts:
    """What is known for certain about tensor shapes without running anything."""

    def __init__(self, graph: onnx.GraphProto):
        inputs = {i.name: i for i in graph.input}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.constant: Dict[str, Tuple[int, ...]] = {}
        for t in graph.initializer:
            info = inputs.get(t.name)
            # an initializer listed as a graph input can be overridden, unless its declared
            # shape is static: then any value fed must have that shape too
            if info is None or _static_dims(info) == tuple(t.dims):
                self.constant[t.name] = tuple(int(d) for d in t.dims)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                dims = _constant_dims(node)
                if dims is not None:
                    self.constant[node.output[0]] = dims
        self.inputs = {name: info for name, info in inputs.items() if name not in self.constant}

    def dims(self, name: str) -> Optional[Tuple[int, ...]]:
        """The shape of a constant (an initializer or a Constant node), or None."""
        return self.constant.get(name) if name else None

    def rank(self, name: str) -> Optional[int]:
        """Of a constant, a graph input with a shape, or a Conv's output (its weight's rank)."""
        if name in self.constant:
            return len(self.constant[name])
        origin = self._origin(name)
        info = self.inputs.get(origin)
        if info is not None:
            return len(info.type.tensor_type.shape.dim) if info.type.tensor_type.HasField("shape") else None
        weight = self._conv_weight(origin)
        return len(weight) if weight is not None else None

    def channels(self, name: str) -> Optional[int]:
        """Axis 1 of a graph input with a static size there, or of a Conv's output (its weight's first dim)."""
        origin = self._origin(name)
        info = self.inputs.get(origin)
        if info is not None:
            dims = list(info.type.tensor_type.shape.dim)
            return dims[1].dim_value if len(dims) > 1 and dims[1].dim_value > 0 else None
        weight = self._conv_weight(origin)
        return weight[0] if weight is not None else None

    def _origin(self, name: str) -> str:
        """The tensor `name` has the shape of: back through ops that keep the shape."""
        for _ in range(64):
            node = self.producer.get(name)
            if node is None or node.op_type not in _SAME_SHAPE or node.domain not in ("", "ai.onnx") \
                    or not node.input or node.output[0] != name:
                break
            name = node.input[0]
        return name

    def _conv_weight(self, name: str) -> Optional[Tuple[int, ...]]:
        node = self.producer.get(name)
        if node is None or node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return None
        weight = self.dims(node.input[1])
        return weight if weight is not None and len(weight) >= 3 else None


_SAME_SHAPE = {"BatchNormalization", "Relu", "Identity"}


def _static_dims(info: onnx.ValueInfoProto) -> Optional[Tuple[int, ...]]:
    t = info.type.tensor_type
    if not info.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    if not all(d.HasField("dim_value") for d in t.shape.dim):
        return None
    return tuple(d.dim_value for d in t.shape.dim)


def _constant_dims(node: onnx.NodeProto) -> Optional[Tuple[int, ...]]:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return tuple(int(d) for d in attr.t.dims)
        if attr.name in ("value_float", "value_int"):
            return ()
        if attr.name in ("value_floats", "value_ints"):
            return (len(attr.floats) if attr.name == "value_floats" else len(attr.ints),)
    return None


def _conv(node: onnx.NodeProto, facts: _Facts, opset: int) -> Optional[str]:
    """X is N × C × spatial, W is M × C/group × kernel, B has M values; the attributes have one
    value per spatial axis (pads two); group divides M and C."""
    attrs = _attributes(node)
    x_rank, weight = facts.rank(node.input[0]), facts.dims(node.input[1])
    if x_rank is not None and x_rank < 3:
        return f"reads a rank-{x_rank} input; a Conv needs N × C × spatial (rank 3 or more)"
    if weight is not None and len(weight) < 3:
        return f"has a weight of shape {list(weight)}; it needs M × C/group × kernel (rank 3 or more)"
    if weight is not None and x_rank is not None and x_rank != len(weight):
        return f"reads a rank-{x_rank} input with a weight of shape {list(weight)}"
    group = attrs.get("group", 1)
    if group < 1:
        return f"has group {group}"
    kernel = attrs.get("kernel_shape")
    if weight is not None:
        channels = facts.channels(node.input[0])
        if weight[0] % group:
            return f"has {weight[0]} output channels, which group {group} does not divide"
        if channels is not None and channels != weight[1] * group:
            return f"reads {channels} channels with a weight of shape {list(weight)} and group {group}"
        if kernel is not None and tuple(kernel) != weight[2:]:
            return f"has kernel_shape {list(kernel)} and a weight of shape {list(weight)}"
    rank = len(weight) - 2 if weight is not None else x_rank - 2 if x_rank is not None else \
        len(kernel) if kernel is not None else None
    for name, count in (("kernel_shape", 1), ("strides", 1), ("dilations", 1), ("pads", 2)):
        if rank is not None and name in attrs and len(attrs[name]) != count * rank:
            return f"has {name} {list(attrs[name])} for {rank} spatial axes"
    if weight is not None and kernel is None:
        kernel = weight[2:]
    for name, values in (("kernel size", kernel), ("strides", attrs.get("strides")),
                         ("dilations", attrs.get("dilations"))):
        if values is not None and any(v < 1 for v in values):
            return f"has {name} {list(values)}; they must be positive"
    if any(p < 0 for p in attrs.get("pads", ())):
        return f"has negative pads {list(attrs['pads'])}"
    bias = facts.dims(node.input[2]) if len(node.input) > 2 else None
    if bias is not None and (len(bias) != 1 or weight is not None and bias[0] != weight[0]):
        return f"has a bias of shape {list(bias)}" + \
            (f" for {weight[0]} output channels" if weight is not None else "; it must be a vector")
    return None


_BN_PARAMETERS = ("scale", "B", "mean", "var")


def _batchnorm(node: onnx.NodeProto, facts: _Facts, opset: int) -> Optional[str]:
    """scale, B, mean and var: one shape; vectors over the channels (opset < 9 with spatial=0:
    one value per channel and position, which only the runtime can check)."""
    params = [(role, facts.dims(name)) for role, name in zip(_BN_PARAMETERS, node.input[1:5])]
    params = [(role, dims) for role, dims in params if dims is not None]
    if not params:
        return None
    if len({dims for _, dims in params}) > 1:
        return "has " + ", ".join(f"{role} of shape {list(dims)}" for role, dims in params) + \
            "; they must have one shape"
    role, dims = params[0]
    if opset < 9 and _attributes(node).get("spatial", 1) == 0:
        return None
    if len(dims) != 1:
        return f"has {role} of shape {list(dims)}; it must be a vector over the channels"
    channels = facts.channels(node.input[0])
    if channels is not None and dims[0] != channels:
        return f"has {dims[0]} values of {role} for {channels} channels"
    return None


def _pad(node: onnx.NodeProto, facts: _Facts, opset: int) -> Optional[str]:
    """Two pads per axis: per axis of the input, or per axis listed in `axes` (opset 18)."""
    if opset < 11:
        pads = _attributes(node).get("pads")
        count = len(pads) if pads is not None else None
    else:
        dims = facts.dims(node.input[1]) if len(node.input) > 1 else None
        if dims is not None and len(dims) != 1:
            return f"has pads of shape {list(dims)}; they must be a vector"
        count = dims[0] if dims is not None else None
    if count is None:
        return None
    if opset >= 18 and len(node.input) > 3 and node.input[3]:
        axes = facts.dims(node.input[3])
        rank = axes[0] if axes is not None and len(axes) == 1 else None
        what = "axes"
    else:
        rank, what = facts.rank(node.input[0]), "input axes"
    if rank is not None and count != 2 * rank:
        return f"has {count} pads for {rank} {what} (2 values per axis)"
    if count % 2:
        return f"has {count} pads (2 values per axis)"
    return None


def _transpose(node: onnx.NodeProto, facts: _Facts, opset: int) -> Optional[str]:
    perm = _attributes(node).get("perm")
    if perm is None:
        return None
    if sorted(perm) != list(range(len(perm))):
        return f"has perm {list(perm)}, which is not a permutation of the axes"
    rank = facts.rank(node.input[0])
    if rank is not None and rank != len(perm):
        return f"has perm {list(perm)} for a rank-{rank} input"
    return None


# op type → the check of what the engine reads from such a node: None, or what is wrong
SHAPE_CHECKS: Dict[str, Callable[[onnx.NodeProto, _Facts, int], Optional[str]]] = {
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "Pad": _pad,
    "Transpose": _transpose,
}
