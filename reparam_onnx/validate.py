"""What the rewrite relies on, checked once on the way in: an InputError naming the first problem.

onnx's full checker is stricter than runtimes (it rejects graph outputs without a shape,
for one), so it is not the gate; these checks cover what the engine reads: names,
opsets, element types, initializer payloads, node arity and attribute types against
the operator schemas, and a topological order (which rules out cycles).
"""
from __future__ import annotations

import math

import numpy as np
import onnx

from .errors import InputError

_VALID_TYPES = {v for k, v in onnx.TensorProto.DataType.items() if k != "UNDEFINED"}
# element types whose payload size the check can compute from dims
_FIXED_SIZE = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)).itemsize
               for t in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                         onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.UINT32,
                         onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL)}
_FIXED_SIZE[onnx.TensorProto.BFLOAT16] = 2


def check_model(model: onnx.ModelProto, name: str = "the model") -> None:
    bad = f"{name} is not a valid ONNX model:"
    opset = _default_opset(model, name)
    graph = model.graph
    _check_strings(model, bad)
    for t in graph.initializer:
        _check_tensor(t, bad)
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


def _check_tensor(t: onnx.TensorProto, bad: str) -> None:
    if t.data_type not in _VALID_TYPES:
        raise InputError(f"{bad} initializer '{t.name}' has the unknown element type {t.data_type}")
    if any(d < 0 for d in t.dims):
        raise InputError(f"{bad} initializer '{t.name}' has negative dims {list(t.dims)}")
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type not in _FIXED_SIZE:
        return
    count = math.prod(int(d) for d in t.dims)
    if t.HasField("raw_data"):
        have, want = len(t.raw_data), count * _FIXED_SIZE[t.data_type]
    else:
        field = onnx.helper.tensor_dtype_to_field(t.data_type)
        have, want = len(getattr(t, field)), count
    if have != want:
        raise InputError(f"{bad} initializer '{t.name}' holds {have} values or bytes for dims {list(t.dims)} "
                         f"(expected {want})")


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
