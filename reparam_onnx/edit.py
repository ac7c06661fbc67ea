"""Editing a graph in place: new initializers, names, removing what a rewrite left unread,
value_info the graph no longer vouches for, IR < 4 input listings. Used by every pass that
rewrites (rewrite.py, and the Transpose cancelling of layout.py through it); weights that do
not change are never copied.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Sequence, Set

import numpy as np
import onnx

from .graph import reads
from .shapes import static_shapes


def op_counts(graph: onnx.GraphProto) -> Dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


def add_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray) -> None:
    """A new initializer written straight into the graph, as numpy_helper.from_array would make
    it (from_array then extend would copy the data once more)."""
    tensor = graph.initializer.add()
    tensor.dims.extend(array.shape)
    tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    data = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    del array   # a caller handing over its last reference frees the array before protobuf copies the bytes
    tensor.raw_data = data
    tensor.name = name


def used_names(graph: onnx.GraphProto) -> Set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
    return names


def remove_dead(graph: onnx.GraphProto, kept: List[onnx.NodeProto], read_before: Set[str],
                 drop_inputs: bool = False) -> None:
    """Make `kept` the graph's nodes and drop what a rewrite left unread: tensors read before
    and not now lose their producers (constant subgraphs, transitively) and their initializers.

    An initializer that is also a graph input stays (it is part of the model's interface)
    unless drop_inputs: then it was treated as a constant, and goes with its input entry.
    Initializers and nodes that nothing read before stay: they are not the rewrite's doing.
    """
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in kept for o in n.output}
    uses = Counter()
    for node in kept:
        uses.update(reads([node]))
    dead_nodes: Set[int] = set()
    pending = sorted(name for name in read_before if not uses[name] and name not in outputs)
    visited = set(pending)
    while pending:
        name = pending.pop()
        visited.add(name)
        node = producer.get(name)
        if node is None or id(node) in dead_nodes:
            continue
        if any(uses[o] or o in outputs for o in node.output if o):
            continue
        dead_nodes.add(id(node))
        for inp in reads([node]):
            uses[inp] -= 1
            pending.append(inp)
    final = [n for n in kept if id(n) not in dead_nodes]
    live = reads(final) | outputs
    graph_inputs = {i.name for i in graph.input}
    initializers = {t.name for t in graph.initializer}
    dead_inits = {name for name in visited if name not in live and name in initializers
                  and (drop_inputs or name not in graph_inputs)}
    for i in reversed(range(len(graph.input))):
        if graph.input[i].name in dead_inits:
            del graph.input[i]
    # Delete by index: rebuilding the list would copy every weight.
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in dead_inits:
            del graph.initializer[i]
    del graph.node[:]
    graph.node.extend(final)
    present = {o for n in final for o in n.output} | {i.name for i in graph.input}
    forget_value_info(graph, {v.name for v in graph.value_info if v.name not in present})


def adopt_alias_names(graph: onnx.GraphProto, nodes: List[onnx.NodeProto], removed: List[onnx.NodeProto]) \
        -> List[onnx.NodeProto]:
    """An initializer that a removed (fused) node read and that is now read only by Identity
    nodes takes the name of the first one's output, and that Identity goes. Exporters alias
    equal weights (TorchScript writes one zero bias and Identity copies for the others); once the
    layer that read the weight itself is fused away, the deploy form's export has the weight under
    its next reader's name. Same tensor, same values: one node fewer per orphaned alias set."""
    outputs = {o.name for o in graph.output}
    names = {i for n in removed if n.op_type != "Identity" for i in n.input} - outputs - \
        {i.name for i in graph.input}
    readers: Dict[str, List[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            if name in names:
                readers.setdefault(name, []).append(node)
    initializers = {t.name: t for t in graph.initializer}
    dropped: Set[int] = set()
    for name, users in readers.items():
        if name not in initializers or any(n.op_type != "Identity" or n.domain not in ("", "ai.onnx")
                                           for n in users):
            continue
        first = next((n for n in users if n.output[0] not in outputs), None)
        if first is None:
            continue
        initializers[name].name = first.output[0]
        dropped.add(id(first))
        for node in users:
            if node is not first:
                node.input[0] = first.output[0]
    return [n for n in nodes if id(n) not in dropped] if dropped else nodes


def forget_value_info(graph: onnx.GraphProto, names: Set[str]) -> None:
    """Drop the value_info entries of these tensors (their shapes may have changed, or they are gone)."""
    infos = [v for v in graph.value_info if v.name not in names]
    if len(infos) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(infos)


def drop_unvouched_value_info(model: onnx.ModelProto) -> int:
    """Keep the value_info entries the guaranteed shapes agree with (static_shapes: declared
    input dims and initializers, inferred): an entry is dropped when it names a static dim the
    graph does not guarantee or contradicts, or another element type. A file may carry stale
    entries from an earlier export; onnxruntime's memory planner trusts them, and a rewritten
    graph (its nodes in another order) can fail where the original ran by luck."""
    shapes = static_shapes(model)
    keep = [info for info in model.graph.value_info if _vouched(info, shapes.get(info.name))]
    dropped = len(model.graph.value_info) - len(keep)
    if dropped:
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
    return dropped


def _vouched(info: onnx.ValueInfoProto, known) -> bool:
    if not info.type.HasField("tensor_type"):
        return True
    t = info.type.tensor_type
    if known is None:
        return not t.HasField("shape") or all(not d.HasField("dim_value") for d in t.shape.dim)
    dims, dtype = known
    if t.elem_type and dtype is not None and onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) != dtype:
        return False
    if not t.HasField("shape"):
        return True
    if dims is None:
        return all(not d.HasField("dim_value") for d in t.shape.dim)
    if len(t.shape.dim) != len(dims):
        return False
    return all(not d.HasField("dim_value") or d.dim_value == g for d, g in zip(t.shape.dim, dims))


def list_as_inputs(graph: onnx.GraphProto, initializers: Sequence[onnx.TensorProto]) -> None:
    """IR < 4: every initializer is also a graph input, with its type and shape."""
    listed = {i.name for i in graph.input}
    for t in initializers:
        if t.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
