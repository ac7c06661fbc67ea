"""The driver: pass after pass, decide (analyse.py), check each fused block alone (check.py)
and replace it in the graph (edit.py), until nothing changes.

Before: an Add/Sum tree (or a chain: Conv→BN, BN→Conv, Conv→Conv, Linear→BN) whose terms are
linear in one tensor x.
After:  Conv(x, W, B), or Gemm / MatMul + Add for a Linear, writing the block's original
output tensor.
Conditions: linear.evaluate_block succeeds (exactness, cost), a rule accepts the block's shape.
The graph is edited in place, node by node: only the tensors that change are touched,
untouched weights are never copied, and the fused node takes the position of the
block's last node, so the node order stays topological.
"""
from __future__ import annotations

import re

from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import onnx

from . import io
from .analyse import Analyser, Decision, FuseOptions, as_linear
from .check import check_alone
from .edit import (add_initializer, adopt_alias_names, default_opset, drop_unvouched_value_info, list_as_inputs,
                   remove_dead, used_names)
from .graph import GraphIndex, reads, unique_name
from .layout import cancel_transposes
from .sink import Move, depends_on, may_move, may_split, sink_batchnorms, split_batchnorms, undo
from .linear import inverse
from .report import BlockReport
from .shapes import static_shapes
from .terms import block_nodes

MAX_PASSES = 8
RULE_KEY = "reparam_onnx.rule"   # metadata_props entry of every node a fusion writes: the rule's name


def apply(analyser: Analyser, decisions: Sequence[Decision],
          arrays: Optional[Dict[str, np.ndarray]] = None) -> List[Tuple[Decision, List[onnx.NodeProto]]]:
    """Replace every fused block by its Conv; returns each block replaced, with the nodes that replaced it.
    With `arrays`, fused weights of io.STREAM_MIN bytes and more go there, pending stubs in the graph."""
    fused = [d for d in decisions if d.report.fused]
    if not fused:
        return []
    graph = analyser.graph
    names = used_names(graph)
    read_before = reads(graph.node) | {o.name for o in graph.output}
    replace: Dict[int, List[onnx.NodeProto]] = {}
    removed: Set[int] = set()
    order = {id(n): i for i, n in enumerate(graph.node)}
    blocks = []
    for d in fused:   # in graph order: the new nodes take their names in this order
        nodes = sorted(block_nodes(d.expr, d.report.input), key=lambda n: order[id(n)])
        root = analyser.index.producer[d.expr.tensor]
        new_nodes, params = build(d, root, names)
        for node in new_nodes:   # provenance: which rule made the node
            entry = node.metadata_props.add()
            entry.key, entry.value = RULE_KEY, d.report.rule or ""
        blocks.append((d, nodes, root, new_nodes, params))
    # The blocks' original weights (their expressions' terms, the index's cached values;
    # exclusivity: no one else reads them) go now, before the first check brings onnxruntime in
    # on top of them and of every fused array: a check reads its block's again from the model.
    pending = {t.name for t in graph.initializer if io.pending(t, arrays or {})}   # kept apart, freed by nothing

    def let_go(nodes) -> None:
        analyser.index.forget(i for n in nodes for i in n.input if i not in pending)

    for d, nodes, *_ in blocks:
        d.expr = None
        let_go(nodes)
    passed = set()
    # Each block is checked alone, smallest first (a check's sessions come on top of the fused
    # arrays of the blocks not yet written); the checks are independent of one another.
    for d, nodes, root, new_nodes, params in sorted(blocks, key=lambda b: sum(a.nbytes for a in b[4].values())):
        if analyser.options.check_blocks:
            verdict = check_alone(analyser, d, nodes, new_nodes, params, order)
            d.report.check = verdict.worst
            if verdict.reason is not None:   # the report says so; the graph keeps the block
                d.report.fused, d.report.reason, d.report.code = False, verdict.reason, "check"
                continue
        passed.add(id(d))
        let_go(nodes)
    applied = []
    for d, nodes, root, new_nodes, params in blocks:   # the graph is written in graph order
        if id(d) not in passed:
            continue
        applied.append((d, new_nodes))
        # each fused array is handed over as its last reference, freed before protobuf copies its bytes
        d.value.kernel = d.value.bias = None
        for name in list(params):
            array = params.pop(name)
            if arrays is not None and array.nbytes >= io.STREAM_MIN:
                io.add_pending(graph, name, array, arrays)
            else:
                add_initializer(graph, name, array)
            del array
        removed.update(id(n) for n in nodes)
        replace[id(root)] = new_nodes
        d.report.nodes = [n.name for n in nodes]
    del blocks
    if not applied:   # every block failed its check: the graph is left as it was
        return []
    kept = []
    for node in graph.node:
        if id(node) in replace:
            kept.extend(replace[id(node)])
        elif id(node) not in removed:
            kept.append(node)
    kept = adopt_alias_names(graph, kept, [n for n in graph.node if id(n) in removed])
    remove_dead(graph, kept, read_before, analyser.index.initializers_are_constant)
    return applied


def build(d: Decision, root: onnx.NodeProto, names: Set[str]):
    """The nodes and new initializers that replace a fused block: one Conv (with Transposes when
    the block input or output is not laid out N, C, ...), or one Gemm / MatMul + Add."""
    value, dtype = d.value, d.dtype
    base = root.name or d.expr.tensor
    node_name = unique_name(f"{base}/reparam", names)
    w_name = unique_name(f"{base}/reparam.weight", names)
    b_name = unique_name(f"{base}/reparam.bias", names)
    g = value.geometry
    source, output = d.report.input, d.expr.tensor
    canonical = tuple(range(g.rank + 2))
    if as_linear(d.value, d.ctx, d.expr):
        return _build_linear(d, node_name, w_name, b_name, names)
    nodes = []
    if d.ctx.layout != canonical:   # the block input is not (N, C, ...): lay it out for the conv
        to_canonical = unique_name(f"{base}/reparam.input", names)
        nodes.append(onnx.helper.make_node("Transpose", [source], [to_canonical], name=to_canonical,
                                           perm=list(inverse(d.ctx.layout))))
        source = to_canonical
    conv_out = output if value.layout == canonical else unique_name(f"{base}/reparam.output", names)
    nodes.append(onnx.helper.make_node(
        "Conv", [source, w_name, b_name], [conv_out], name=node_name,
        kernel_shape=list(g.kernel), strides=list(g.strides), pads=list(g.pads_begin + g.pads_end),
        dilations=list(g.dilations), group=value.group))
    if value.layout != canonical:   # and give the output the layout the graph had
        nodes.append(onnx.helper.make_node("Transpose", [conv_out], [output], name=unique_name(f"{base}/reparam.transpose", names),
                                           perm=list(value.layout)))
    return nodes, {w_name: value.kernel.astype(dtype, copy=False), b_name: value.bias.astype(dtype, copy=False)}


def _build_linear(d: Decision, node_name: str, w_name: str, b_name: str, names: Set[str]):
    """Gemm(x, W[O, C], b, transB=1) for a rank-2 input, else MatMul(x, Wᵀ[C, O]) + b; then a
    Reshape to the block's output shape when the block does not restore its input's."""
    value, dtype = d.value, d.dtype
    kernel = value.kernel.reshape(value.kernel.shape[:2]).astype(dtype, copy=False)
    bias = value.bias.astype(dtype, copy=False)
    source, output = d.report.input, d.expr.tensor
    linear = output if value.reshape is None else unique_name(f"{node_name}.linear", names)
    if value.geometry.rank == 0:
        nodes = [onnx.helper.make_node("Gemm", [source, w_name, b_name], [linear], name=node_name, transB=1)]
        params = {w_name: kernel, b_name: bias}
    else:
        product = unique_name(f"{node_name}.matmul", names)
        nodes = [onnx.helper.make_node("MatMul", [source, w_name], [product], name=node_name),
                 onnx.helper.make_node("Add", [product, b_name], [linear], name=unique_name(f"{node_name}.bias", names))]
        params = {w_name: np.ascontiguousarray(kernel.T), b_name: bias}
    if value.reshape is not None:
        shape = unique_name(f"{node_name}.shape", names)
        nodes.append(onnx.helper.make_node("Reshape", [linear, shape], [output],
                                           name=unique_name(f"{node_name}.reshape", names)))
        params[shape] = np.asarray(value.reshape, np.int64)
    return nodes, params


def fuse_graph(model: onnx.ModelProto, options: FuseOptions, write: bool = True,
               arrays: Optional[Dict[str, np.ndarray]] = None) -> Tuple[List[BlockReport], List[str]]:
    """Fuse in place, pass after pass until nothing changes; returns every block decided, and notes.

    With `arrays` (a dict), the fused weights of io.STREAM_MIN bytes and more are not copied into
    the model: each is a pending stub there, its array in `arrays` (what io.save writes, or
    io.materialize puts into the model); every pass reads them from there. On return `arrays`
    holds the arrays of the stubs left in the graph.

    With write=False the model is analysed only (one pass, nothing replaced). The fused
    blocks reported are the fused Convs of the result, one each: a block whose Conv a later
    pass takes into a larger block is reported as part of that block (`absorbed`). After
    fusing, inverse Transposes around the fused blocks cancel.

    IR < 4 requires every initializer to be a graph input: the new ones are listed at the end.
    Until then the graph is rewritten as IR 4, where shape inference sees initializers that
    are not inputs (and a weight the rewrite made stays a constant for the next pass).
    """
    graph = model.graph
    ir_version, had_ir_version = model.ir_version, model.HasField("ir_version")
    initializers_before = {t.name for t in graph.initializer}
    if write:
        model.ir_version = max(ir_version, 4)
    result = None
    try:
        # NaN or inf in weights and statistics is arithmetic, not an error: non-finite fused
        # weights leave their block unfused (Analyser._in_dtype), and numpy prints no warning.
        with np.errstate(all="ignore"):
            result = _fuse_passes(model, options, write, arrays)
    finally:
        model.ir_version = ir_version
        if not had_ir_version and not (result and any(r.fused for r in result[0])):
            model.ClearField("ir_version")   # a model nothing was written into is as it was
    if ir_version < 4:
        list_as_inputs(graph, [t for t in graph.initializer if t.name not in initializers_before])
    if arrays is not None:   # those of stubs a later pass replaced go
        kept = {t.name for t in graph.initializer if io.pending(t, arrays)}
        for name in [n for n in arrays if n not in kept]:
            del arrays[name]
    return result


def _fuse_passes(model: onnx.ModelProto, options: FuseOptions, write: bool,
                 arrays: Optional[Dict[str, np.ndarray]]) -> Tuple[List[BlockReport], List[str]]:
    split = _split_batchnorms(model, options) if write else {}
    moves = _move_batchnorms(model, options) if write else []
    fused: List[BlockReport] = []
    made: Dict[str, BlockReport] = {}      # name of a node a fusion created → the block it fused
    last: List[Decision] = []
    for _ in range(MAX_PASSES):
        # the last pass's decisions hold its blocks' expressions, and through them the weights
        # they read (replaced now): let them go before the next pass reads the graph again
        last = applied = analyser = None
        analyser = Analyser(model, options)
        _give_pending(analyser.index, arrays)
        last = analyser.decisions()
        analyser.forget_expressions()
        if not write:
            fused.extend(d.report for d in reversed(last) if d.report.fused)   # graph order
            break
        applied = apply(analyser, last, arrays)
        for d, new_nodes in reversed(applied):
            _take_in_absorbed(d.report, made, fused)
            made.update((n.name, d.report) for n in new_nodes)
            fused.append(d.report)
        if not applied:
            break
    # what is fused, and what the last pass left (earlier verdicts may be stale)
    left = [d.report for d in reversed(last) if not d.report.fused]
    for report in left:   # a node an earlier pass wrote stands for the nodes it replaced
        report.reason_nodes = [o for n in report.reason_nodes for o in (made[n].nodes if n in made else [n])]
        if report.reason:
            report.reason = _named_by_originals(report.reason, made)
    moved = {n.name: m.bn.name for m in moves for n in m.copies}   # a BN's copies stand for the BN
    moved.update(split)                                            # and its slices
    for report in fused + left:
        report.nodes = list(dict.fromkeys(moved.get(n, n) for n in report.nodes))
        report.reason_nodes = list(dict.fromkeys(moved.get(n, n) for n in report.reason_nodes))
    notes = []
    if split:
        notes.append(f"split {len(set(split.values()))} BatchNormalization(s) after a channel Concat into one per "
                     f"slice, folded into the Conv that writes it")
    if moves:
        notes.append(f"moved {len(moves)} BatchNormalization(s) to the linear ops that read them "
                     f"(through layout ops and fan-out) and folded them there")
    created = {n.name for n in model.graph.node if n.op_type == "Transpose" and n.name in made}
    pairs = _cancel_transposes(model, options, created, arrays) if created else 0
    if pairs:
        notes.append(f"cancelled {pairs} pair(s) of inverse Transposes around fused blocks")
    if fused:
        dropped = drop_unvouched_value_info(model)
        if dropped:
            notes.append(f"dropped {dropped} value_info entr{'y' if dropped == 1 else 'ies'} whose shapes the graph "
                         f"does not guarantee (a runtime that trusts them can fail on the rewritten graph)")
    return fused + left, notes


def _named_by_originals(reason: str, made: Dict[str, BlockReport]) -> str:
    """The reason with each node an earlier pass wrote, quoted, named by the nodes it replaced."""
    for name in re.findall(r"'([^']*)'", reason):
        block = made.get(name)
        if block is not None and block.nodes:
            first, last = block.nodes[0], block.nodes[-1]
            text = f"'{first}'" if first == last else f"'{first}' … '{last}' (fused)"
            reason = reason.replace(f"'{name}'", text)
    return reason


def _split_batchnorms(model: onnx.ModelProto, options: FuseOptions) -> Dict[str, str]:
    """BNs after a channel Concat of Convs, one per slice (sink.split_batchnorms)."""
    if not may_split(model.graph):
        return {}
    made, read = split_batchnorms(model, Analyser(model, options).index)
    if made:   # the split BNs' parameters (and what computed them) are read no more
        remove_dead(model.graph, list(model.graph.node), read, options.initializers_as_constants)
    return made


def _move_batchnorms(model: onnx.ModelProto, options: FuseOptions) -> List[Move]:
    """BNs moved to the linear ops that read them (sink.py), kept only where a block that fuses
    takes in every copy: elsewhere the BN goes back, and the graph is as it was."""
    if not may_move(model.graph):
        return []
    index = Analyser(model, options).index
    moves = sink_batchnorms(model, lambda: GraphIndex(model.graph, index.shapes, index.opset,
                                                      index.initializers_are_constant, index.external_base))
    if not moves:
        return []
    decisions = Analyser(model, options).decisions()
    covered = {name for d in decisions if d.report.fused for name in d.report.nodes}
    left = [m for m in moves if not all(n.name in covered for n in m.copies)]
    for m in moves:   # in the order made: one built on a move that goes back goes back too
        if all(m is not l for l in left) and depends_on(m, left):
            left.append(m)
    undo(model, [m for m in moves if any(m is l for l in left)])
    kept = [m for m in moves if all(m is not l for l in left)]
    if kept:   # the kept BNs' parameters (and what computed them) are read no more
        remove_dead(model.graph, list(model.graph.node), {p for m in kept for p in m.bn.input[1:]},
                    options.initializers_as_constants)
    return kept


def _take_in_absorbed(report: BlockReport, made: Dict[str, BlockReport], fused: List[BlockReport]) -> None:
    """A block that took in Convs fused by an earlier pass replaces their reports: its nodes
    become the original nodes of them all, and `absorbed` names the blocks it took in."""
    nodes, absorbed = [], []
    for name in report.nodes:
        earlier = made.get(name)
        if earlier is None:
            nodes.append(name)
        elif all(earlier is not a for a in absorbed):
            absorbed.append(earlier)
            nodes.extend(earlier.nodes)
    if absorbed:
        fused[:] = [r for r in fused if all(r is not a for a in absorbed)]
        report.nodes = nodes
        report.absorbed = [entry for a in absorbed for entry in [{"rule": a.rule, "output": a.output}] + a.absorbed]


def _give_pending(index: GraphIndex, arrays: Optional[Dict[str, np.ndarray]]) -> None:
    """The index reads the pending stubs' values from `arrays` (read-only arrays, as to_array
    gives them for a tensor's raw_data): a stub itself has no data."""
    if arrays:
        for name, tensor in index.initializers.items():
            if io.pending(tensor, arrays):
                index.know(name, arrays[name])


def _cancel_transposes(model: onnx.ModelProto, options: FuseOptions, created: Set[str],
                       arrays: Optional[Dict[str, np.ndarray]] = None) -> int:
    """Cancel inverse Transpose pairs that begin or end at one the fusion created; drop what they
    left unread. Returns how many pairs."""
    graph = model.graph
    read_before = reads(graph.node) | {o.name for o in graph.output}
    pairs = 0
    for _ in range(MAX_PASSES):
        index = GraphIndex(graph, static_shapes(model), default_opset(model), options.initializers_as_constants)
        _give_pending(index, arrays)
        done = cancel_transposes(model, index, created)
        pairs += done
        if not done:
            break
    if pairs:
        remove_dead(graph, list(graph.node), read_before, options.initializers_as_constants)
    return pairs
