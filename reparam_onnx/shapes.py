"""What the graph guarantees about tensor shapes, and concrete shapes to run it at.

Exactness may rest only on guaranteed facts: the declared positive dims of graph inputs
(onnxruntime enforces them), initializer shapes and values, propagated through the ops
by shape inference. `value_info` entries and declared output shapes are annotations a
file may carry from an earlier export: they are dropped before inference, never
trusted. A dim of -1, 0 or a symbolic name is unknown.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import GraphIndex, attributes

BATCH = 2        # stands in for a dynamic first axis
SPATIAL = 17     # stands in for other dynamic axes: odd on purpose

Shapes = Dict[str, tuple]   # tensor name → (dims with None where not guaranteed, numpy dtype)


def static_shapes(model: onnx.ModelProto, inputs: Optional[Dict[str, Sequence[int]]] = None,
                  constants: Optional[Dict[str, np.ndarray]] = None) -> Shapes:
    """Guaranteed shapes and dtypes of every tensor shape inference reaches (see the module doc);
    with `inputs`, as they would be when the graph inputs have those dims; with `constants`, the
    values of computed tensors (computed_shape_arguments) given to inference as Constants."""
    skeleton = _skeleton(model, constants or {})
    for info in skeleton.graph.input:
        if inputs and info.name in inputs:
            shape = info.type.tensor_type.shape
            shape.ClearField("dim")
            for d in inputs[info.name]:
                shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # inference is a help, not a requirement: without it nothing is static
        inferred = skeleton
    shapes: Shapes = {}
    graph = inferred.graph
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = info.type.tensor_type
        if not info.type.HasField("tensor_type") or _np_dtype(t.elem_type) is None:
            continue   # (a Cast to an element type no one knows: inference passes the number on)
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim) \
            if t.HasField("shape") else None
        shapes[info.name] = (dims, _np_dtype(t.elem_type))
    for init in model.graph.initializer:
        shapes[init.name] = (tuple(init.dims), onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
    return shapes


def _np_dtype(elem_type: int):
    """The numpy dtype of an ONNX element type; None for 0 or a number onnx does not know."""
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else None
    except (KeyError, ValueError, TypeError):
        return None


def _skeleton(model: onnx.ModelProto, constants: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy for shape inference: no value_info, output types without shapes, input dims
    that are not positive made unknown, and large initializers without data (name, type
    and shape are kept: small ones keep their values for data propagation); a node whose
    outputs are all in `constants` replaced by Constants of those values."""
    out = onnx.ModelProto()
    graph = model.graph
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g = out.graph
    g.name = graph.name
    for node in graph.node:
        outputs = [o for o in node.output if o]
        if outputs and all(o in constants for o in outputs):
            g.node.extend(onnx.helper.make_node("Constant", [], [o], value=numpy_helper.from_array(constants[o], o))
                          for o in outputs)
        else:
            g.node.append(node)
    g.input.extend(graph.input)
    for info in g.input:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            for dim in info.type.tensor_type.shape.dim:
                if not (dim.HasField("dim_value") and dim.dim_value > 0):
                    dim.Clear()
    g.output.extend(graph.output)
    for info in g.output:
        if info.type.HasField("tensor_type"):
            info.type.tensor_type.ClearField("shape")
    for init in graph.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= 64 and init.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(init)
        else:
            stub = g.initializer.add()
            stub.name, stub.data_type = init.name, init.data_type
            stub.dims.extend(init.dims)
    _no_large_ranges(g)
    return out


MAX_PROPAGATED_RANGE = 1 << 16


def _no_large_ranges(g: onnx.GraphProto) -> None:
    """Data propagation computes a Range's values, however many (a hostile Range(0, 2^40) read by
    a ScatterND made inference allocate until the process was killed): a Range not proven small
    from its constant inputs reads value-less inputs instead, and its length is unknown."""
    known = {t.name: t for t in g.initializer if t.dims == [] or list(t.dims) == [1]}
    known.update({n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute
                  and n.attribute[0].name == "value"})
    for node in g.node:
        if node.op_type != "Range" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
            continue
        try:
            start, limit, delta = (float(numpy_helper.to_array(known[i]).reshape(-1)[0]) for i in node.input)
            count = math.ceil((limit - start) / delta) if delta else None
        except (KeyError, ValueError, IndexError, OverflowError):
            count = None
        if count is not None and count <= MAX_PROPAGATED_RANGE:
            continue
        for k, name in enumerate(node.input):
            blind = f"{name}#unknown_{node.output[0]}"
            dtype = known[name].data_type if name in known else onnx.TensorProto.UNDEFINED
            g.input.append(onnx.helper.make_tensor_value_info(blind, dtype, []))
            node.input[k] = blind


# Inputs whose values (not only shapes) give an op's output shape.
SHAPE_ARGUMENTS = {"Pad": (1,), "Reshape": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "Tile": (1,),
                   "ConstantOfShape": (0,), "Unsqueeze": (1,), "Squeeze": (1,), "Range": (0, 1, 2),
                   "Resize": (2, 3), "Upsample": (1,), "Split": (1,), "CenterCropPad": (1,)}
_SMALL = 64


def computed_shape_arguments(index: GraphIndex) -> Dict[str, np.ndarray]:
    """The shape arguments a node computes (not initializers, so inference does not see them:
    TorchScript writes a Pad's pads as Cast(Reshape(Transpose(Slice(Concat(...)))))) whose value
    the index folds, small ones only."""
    out = {}
    for node in index.graph.node:
        for pos in SHAPE_ARGUMENTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
            name = node.input[pos] if pos < len(node.input) else ""
            producer = index.producer.get(name)
            if not name or name in out or producer is None or producer.op_type == "Constant":
                continue
            value = index.try_value(name)
            if value is not None and value.size <= _SMALL:
                out[name] = value
    return out


def input_dims(model: onnx.ModelProto, spatial: int = SPATIAL) -> Dict[str, List[int]]:
    """Concrete dims to feed each graph input: declared dims where positive; else what a
    consumer's weights fix (the channels a Conv reads, the features a MatMul/Gemm reads);
    else BATCH for the first axis and `spatial` for the others."""
    initializers = {t.name: t for t in model.graph.initializer}
    fixed = _dims_fixed_by_weights(model.graph, initializers)
    out = {}
    for info in model.graph.input:
        if info.name in initializers or not info.type.HasField("tensor_type"):
            continue
        declared = list(info.type.tensor_type.shape.dim)
        dims = []
        for axis, d in enumerate(declared):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(fixed.get((info.name, axis), BATCH if axis == 0 else spatial))
        out[info.name] = dims
    return out


# ops that keep every axis where it is (the layout walk looks through them)
_SAME_AXES = {"Identity", "Cast", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSwish", "HardSigmoid",
              "Neg", "Abs", "Elu", "Selu", "Gelu", "Erf", "Softplus", "Mish", "BatchNormalization", "Dropout"}


def _dims_fixed_by_weights(graph: onnx.GraphProto, initializers) -> Dict[tuple, int]:
    """(graph input, axis) → the length a Conv/MatMul/Gemm weight requires of it, found by
    following the input through Transposes and axis-preserving ops to that consumer."""
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for pos, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, pos))
    fixed: Dict[tuple, int] = {}
    for info in graph.input:
        if info.name in initializers:
            continue
        rank = len(info.type.tensor_type.shape.dim)
        # frontier: (tensor, axes) with axes[i] = the input axis now at position i
        frontier, seen = [(info.name, tuple(range(rank)))], set()
        while frontier:
            tensor, axes = frontier.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for node, pos in consumers.get(tensor, ()):
                if node.domain not in ("", "ai.onnx"):
                    continue
                need = _required_length(node, pos, initializers, len(axes))
                if need is not None:
                    axis, length = need
                    fixed.setdefault((info.name, axes[axis]), length)
                elif node.op_type == "Transpose" and pos == 0 and node.output:
                    perm = attributes(node).get("perm") or list(reversed(range(len(axes))))
                    if sorted(perm) == list(range(len(axes))):
                        frontier.append((node.output[0], tuple(axes[p] for p in perm)))
                elif node.op_type in _SAME_AXES and pos == 0 and node.output:
                    frontier.append((node.output[0], axes))
    return fixed


def _required_length(node: onnx.NodeProto, pos: int, initializers, rank: int) -> Optional[tuple]:
    """(axis, length) that `node` requires of its input at `pos`, read off an initializer weight."""
    def weight_dims(i: int) -> Optional[Sequence[int]]:
        name = node.input[i] if len(node.input) > i else ""
        return tuple(initializers[name].dims) if name in initializers else None

    if node.op_type == "Conv" and pos == 0:
        w = weight_dims(1)
        if w is not None and len(w) == rank and len(w) >= 3:
            return 1, int(w[1]) * int(attributes(node).get("group", 1))
    if node.op_type == "MatMul" and pos == 0:
        w = weight_dims(1)
        if w is not None and len(w) == 2:
            return rank - 1, int(w[0])
    if node.op_type == "Gemm" and pos == 0 and rank == 2:
        w = weight_dims(1)
        if w is not None and len(w) == 2:
            trans_a, trans_b = attributes(node).get("transA", 0), attributes(node).get("transB", 0)
            return (0 if trans_a else 1), int(w[1] if trans_b else w[0])
    return None


MAX_SIZE_RUNS = 8          # input sizes the whole-model verification runs at, at most
MAX_SIZE_PROBES = 24       # sizes whose shapes are inferred to choose them


def covering_sizes(model: onnx.ModelProto, convs: Sequence[onnx.NodeProto]) -> Tuple[List[int], List[str]]:
    """Sizes for the dynamic input dims (an odd and an even one at least) at which every strided
    conv of `convs` reads an input whose length, per spatial axis, takes every residue modulo
    its stride, as far as MAX_SIZE_RUNS sizes reach; and the convs left short of that."""
    need = {}
    for conv in convs:
        strides = attributes(conv).get("strides") or ()
        for axis, stride in enumerate(strides):
            if stride > 1:
                need[(conv.input[0], axis)] = (int(stride), conv.name or conv.output[0])
    chosen, seen = [SPATIAL, SPATIAL - 1], {key: set() for key in need}
    if not need:
        return chosen, []
    for size in chosen + list(range(SPATIAL + 1, SPATIAL + MAX_SIZE_PROBES - 1)):
        covered = all(len(seen[key]) == stride for key, (stride, _) in need.items())
        if size not in chosen and (covered or len(chosen) >= MAX_SIZE_RUNS):
            break
        shapes = static_shapes(model, input_dims(model, size))
        gained = False
        for (tensor, axis), (stride, _) in need.items():
            dims = shapes.get(tensor, (None, None))[0]
            if dims is None or len(dims) <= axis + 2 or dims[axis + 2] is None:
                continue
            residue = dims[axis + 2] % stride
            gained = gained or residue not in seen[(tensor, axis)]
            seen[(tensor, axis)].add(residue)
        if gained and size not in chosen:
            chosen.append(size)
    short = sorted({name for key, (stride, name) in need.items() if len(seen[key]) < stride})
    return chosen, short
