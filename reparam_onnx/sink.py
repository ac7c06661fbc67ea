"""Move a BatchNormalization to the linear ops that read it, through layout ops and fan-out.

Before: BN → p₁ → … → (fan-out) → … → L₁, L₂, …   every path from the BN through ops pᵢ
        that move or average positions without mixing channels (Transpose; Reshape or Flatten
        keeping the channel axis whole; AveragePool without padding, GlobalAveragePool,
        ReduceMean over axes other than the channels') ending at a MatMul, Gemm
        or unpadded Conv Lⱼ that reads it as its input and has a constant weight.
After:  p₁ → … on the BN's input, and x·s + t (Mul, Add: the BN's affine, on the channel axis
        where it is there) just before each Lⱼ, where the fusion folds it into Lⱼ (NextViT's
        merge_pre_bn: its norm feeds q, k and v through a reshape to tokens).
Exact: a per-channel affine commutes with each pᵢ (every output element is one input element,
or an average of real ones, of the same channel), and one copy per reader computes what the
one BN did. The caller keeps a move only when the fusion takes in every copy (`undo`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import onnx

from .edit import add_initializer, used_names
from .graph import GraphIndex, attributes, unique_name
from .kernels import bn_affine
from .symbolic import Symbolic, monomial, reshaped_dims

MAX_DEPTH = 16   # layout ops between the BN and a linear op


@dataclass
class Move:
    """One BN moved: enough to put it back."""
    bn: onnx.NodeProto
    rewired: List[Tuple[onnx.NodeProto, int]] = field(default_factory=list)   # readers of the BN output
    copies: List[onnx.NodeProto] = field(default_factory=list)                # the Mul/Add pairs
    leaves: List[tuple] = field(default_factory=list)   # (L, input position, tensor it read, axis, rank)
    initializers: List[str] = field(default_factory=list)


MAX_ROUNDS = 4   # a BN moved in one round can let another (above it) move in the next


_MOVING = {"Transpose", "Reshape", "Flatten", "AveragePool", "GlobalAveragePool", "ReduceMean"}


def may_move(graph: onnx.GraphProto) -> bool:
    """Some BN is read by a moving op or by several nodes: worth indexing the graph for (cheap)."""
    bns = {n.output[0] for n in graph.node if n.op_type == "BatchNormalization" and n.output}
    readers: dict = {}
    for node in graph.node:
        for name in node.input:
            if name in bns:
                readers.setdefault(name, []).append(node.op_type)
    return any(len(ops) > 1 or ops[0] in _MOVING for ops in readers.values())


def sink_batchnorms(model: onnx.ModelProto, make_index: Callable[[], GraphIndex]) -> List[Move]:
    """Move every BN that has layout ops or several readers between it and the linear ops
    that read it (a BN straight before one linear op folds as it is). A copy another move
    put before a linear op counts as that op: a BN above moves in front of it."""
    moves: List[Move] = []
    for _ in range(MAX_ROUNDS):
        heads = {id(m.copies[2 * i]): leaf[3:] for m in moves for i, leaf in enumerate(m.leaves)}
        done = _sink_round(model, make_index(), heads)
        if not done:
            break
        moves += done
    return moves


def _sink_round(model: onnx.ModelProto, index: GraphIndex, heads) -> List[Move]:
    graph = model.graph
    plans = []
    sym = Symbolic(index)   # dynamic dims as symbols, shared by the round's plans
    for node in graph.node:
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            plan = _plan(node, index, heads, sym)
            if plan is not None:
                plans.append((node, *plan))
    if not plans:
        return []
    names = used_names(graph)
    moves = []
    for bn, scale, shift, leaves in plans:
        move = Move(bn)
        for reader in index.consumers[bn.output[0]]:
            for k, name in enumerate(reader.input):
                if name == bn.output[0]:
                    reader.input[k] = bn.input[0]
                    move.rewired.append((reader, k))
        for n, (leaf, tensor, axis, rank) in enumerate(leaves):
            read = bn.input[0] if tensor == bn.output[0] else tensor   # a reader of the BN itself: rewired above
            shape = (len(scale),) + (1,) * (rank - 1 - axis)
            base = f"{bn.name or bn.output[0]}/moved.{n}"
            s_name, t_name = unique_name(f"{base}.scale", names), unique_name(f"{base}.shift", names)
            add_initializer(graph, s_name, scale.reshape(shape))
            add_initializer(graph, t_name, shift.reshape(shape))
            scaled, shifted = unique_name(f"{base}.scaled", names), unique_name(f"{base}.shifted", names)
            mul = onnx.helper.make_node("Mul", [read, s_name], [scaled], name=unique_name(f"{base}.mul", names))
            add = onnx.helper.make_node("Add", [scaled, t_name], [shifted], name=unique_name(f"{base}.add", names))
            move.copies += [mul, add]
            move.initializers += [s_name, t_name]
            k = list(leaf.input).index(read)
            move.leaves.append((leaf, k, read, axis, rank))
            leaf.input[k] = shifted
        moves.append(move)
    _splice(graph, moves)
    return moves


def undo(model: onnx.ModelProto, moves: Sequence[Move]) -> None:
    """Put these BNs back as they were (moves in the order made; a later move that put its
    copies in front of one of these must be among them). Edits in place: references to
    the graph's other nodes stay valid."""
    graph = model.graph
    for m in reversed(moves):
        for leaf, k, tensor, _, _ in m.leaves:
            leaf.input[k] = tensor
        for reader, k in m.rewired:
            reader.input[k] = m.bn.output[0]
        gone = {id(n) for n in m.copies}
        for i in reversed([i for i, n in enumerate(graph.node) if id(n) in gone]):
            del graph.node[i]
        readers = {id(r) for r, _ in m.rewired}   # just before its first reader: its input is computed before
        graph.node.insert(next(i for i, n in enumerate(graph.node) if id(n) in readers), m.bn)
        dropped = set(m.initializers)
        for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in dropped]):
            del graph.initializer[i]


def depends_on(move: Move, others: Sequence[Move]) -> bool:
    """The move put a copy in front of a copy one of `others` made."""
    made = {id(n) for m in others for n in m.copies}
    return any(id(leaf) in made for leaf, *_ in move.leaves)


def _splice(graph: onnx.GraphProto, moves: Sequence[Move]) -> None:
    """Drop the BNs; each Mul/Add pair goes just before the linear op that reads it. In place;
    the moves then hold the graph's own copy nodes (insert copies a message)."""
    for m in moves:
        del graph.node[next(i for i, n in enumerate(graph.node) if n is m.bn)]
        live = []
        for i, (leaf, *_) in enumerate(m.leaves):
            at = next(j for j, n in enumerate(graph.node) if n is leaf)
            graph.node.insert(at, m.copies[2 * i])
            graph.node.insert(at + 1, m.copies[2 * i + 1])
            live += [graph.node[at], graph.node[at + 1]]
        m.copies = live


def _plan(bn: onnx.NodeProto, index: GraphIndex, heads, sym: Symbolic):
    """(s, t, leaves) when the BN can move: its affine in the model's dtype, and each linear op
    reading it with the tensor it reads, the channel axis there and the rank."""
    attrs = attributes(bn)
    if attrs.get("training_mode", 0) or sum(1 for o in bn.output if o) != 1 or index.opset < 9:
        return None
    params = [index.try_value(name) for name in bn.input[1:5]]
    info = index.shapes.get(bn.input[0])
    if any(p is None or p.ndim != 1 for p in params) or info is None or info[0] is None or len(info[0]) < 2:
        return None
    dims, dtype = info
    if dims[1] != params[0].size or not np.issubdtype(dtype, np.floating):
        return None
    try:
        scale, shift = bn_affine(*params, attrs.get("epsilon", 1e-5))
    except ValueError:
        return None
    producer = index.producer.get(bn.input[0])
    if producer is not None and producer.op_type in ("Conv", "Gemm") and len(index.consumers[bn.input[0]]) == 1 \
            and bn.input[0] not in index.outputs:
        return None   # a Conv → BN folds as it is, once, whoever reads it
    start = sym.dims(bn.input[0])
    if start is None:
        return None
    leaves = _leaves(index, sym, bn.output[0], 1, start, params[0].size, 0, heads)
    if not leaves:
        return None
    direct = len(leaves) == 1 and any(leaves[0][0] is c for c in index.consumers[bn.output[0]])
    if direct:
        return None   # one linear op right after it: the fusion folds the BN as it is
    return scale.astype(dtype), shift.astype(dtype), leaves


def _leaves(index: GraphIndex, sym: Symbolic, tensor: str, axis: int, dims: tuple, channels: int, depth: int,
            heads):
    """Every path from `tensor` (channels on `axis`) through moving ops to a linear op, or None."""
    readers = index.consumers.get(tensor, ())
    if tensor in index.outputs or not readers or depth > MAX_DEPTH:
        return None
    out = []
    for node in readers:
        if any(node is r for r in index.shape_readers.get(tensor, ())):
            continue   # reads only the shape (TorchScript's flatten sizes itself by Shape(x)): the move keeps it
        if node.domain not in ("", "ai.onnx") or list(node.input).count(tensor) != 1 or node.input[0] != tensor:
            return None
        if _absorbs(index, node, axis, len(dims), channels) or _copy_for(heads, node, axis, len(dims)):
            out.append((node, tensor, axis, len(dims)))
            continue
        moved = _moved(index, sym, node, axis, dims, channels)
        if moved is None:
            return None
        below = _leaves(index, sym, node.output[0], *moved, channels, depth + 1, heads)
        if below is None:
            return None
        out.extend(below)
    return out


def _copy_for(heads, node, axis: int, rank: int) -> bool:
    """The node is the Mul of a moved BN's copy made for this channel axis and rank."""
    return heads.get(id(node)) == (axis, rank)


def _absorbs(index: GraphIndex, node, axis: int, rank: int, channels: int) -> bool:
    """A linear op with a constant weight that reads the channels as what it contracts."""
    weight = index.try_value(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return False
    attrs = attributes(node)
    if node.op_type == "MatMul":
        return weight.ndim == 2 and rank >= 2 and axis == rank - 1 and weight.shape[0] == channels
    if node.op_type == "Gemm":
        contracted = weight.shape[1] if attrs.get("transB", 0) else weight.shape[0]
        return weight.ndim == 2 and rank == 2 and axis == 1 and not attrs.get("transA", 0) and contracted == channels
    if node.op_type == "Conv":
        pads = attrs.get("pads") or ()
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        return axis == 1 and weight.ndim == rank and weight.shape[1] * attrs.get("group", 1) == channels \
            and not any(pads) and auto_pad in ("NOTSET", "VALID")
    return False


def _moved(index: GraphIndex, sym: Symbolic, node, axis: int, dims: tuple, channels: int) -> Optional[tuple]:
    """(the channel axis, dims) of the node's output when it keeps every channel apart; else None."""
    op, attrs = node.op_type, attributes(node)
    if len([o for o in node.output if o]) != 1:
        return None
    if op == "Transpose":
        perm = attrs.get("perm") or list(reversed(range(len(dims))))
        if sorted(perm) != list(range(len(dims))):
            return None
        return list(perm).index(axis), tuple(dims[p] for p in perm)
    if op in ("Reshape", "Flatten"):
        if op == "Flatten":
            a = attrs.get("axis", 1) % (len(dims) or 1) if dims else 0
            target = (_product(dims[:a]), _product(dims[a:]))
            new = target if None not in target else None
        else:
            target = sym.sizes(node.input[1])   # a constant, or computed from dims (a dynamic batch)
            new = None if target is None else reshaped_dims(dims, target, attrs.get("allowzero", 0))
        if new is None:
            return None
        for q in range(len(new)):   # the channel axis kept whole: same positions before it
            if new[q] == channels and monomial(new[:q]) == monomial(dims[:axis]):
                return q, tuple(new)
        return None
    if op == "GlobalAveragePool":
        return (1, tuple(dims[:2]) + (1,) * (len(dims) - 2)) if axis == 1 and len(dims) > 2 else None
    if op == "ReduceMean":
        axes = _reduced_axes(index, node, len(dims))
        if axes is None or axis in axes:
            return None
        if attrs.get("keepdims", 1):
            return axis, tuple(1 if k in axes else d for k, d in enumerate(dims))
        return axis - sum(1 for a in axes if a < axis), tuple(d for k, d in enumerate(dims) if k not in axes)
    if op == "AveragePool":
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        info = index.shapes.get(node.output[0])
        if axis != 1 or any(attrs.get("pads") or ()) or auto_pad not in ("NOTSET", "VALID") \
                or attrs.get("ceil_mode", 0) or info is None or info[0] is None:
            return None
        out = sym.dims(node.output[0])
        return None if out is None else (1, out)
    return None


def _reduced_axes(index: GraphIndex, node, rank: int) -> Optional[set]:
    """The axes a ReduceMean averages (attribute before opset 18, input after); None when it
    averages every axis or they are not constant."""
    if index.opset >= 18:
        value = index.try_value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    else:
        value = attributes(node).get("axes")
    if value is None or np.size(value) == 0:
        return None
    axes = {int(a) % rank for a in np.asarray(value).reshape(-1)}
    return axes if all(-rank <= int(a) < rank for a in np.asarray(value).reshape(-1)) else None


def _product(dims):
    """The product of sizes: an int, one dynamic dim times ones (a Flatten of [B, C, 1, 1] at
    axis 1 keeps B), or None."""
    coef, syms = monomial(dims)
    if not syms:
        return coef
    return syms[0] if len(syms) == 1 and coef == 1 else None


def may_split(graph: onnx.GraphProto) -> bool:
    """Some BN reads a Concat's output: worth indexing the graph for (cheap)."""
    concats = {n.output[0] for n in graph.node if n.op_type == "Concat" and n.output}
    return any(n.op_type == "BatchNormalization" and n.input and n.input[0] in concats for n in graph.node)


def split_batchnorms(model: onnx.ModelProto, index: GraphIndex) -> Tuple[Dict[str, str], Set[str]]:
    """A BN after a Concat on the channel axis of Convs that only it reads (MixNet's MixConv:
    Split → convs of several kernel sizes → Concat → BN) becomes one BN per slice, after the
    conv that writes it, where the fusion folds it (Conv → BN). Exact: a per-channel op commutes
    with a channel concatenation, each slice taking its channels' parameters. Returns the new
    BNs' names → the BN each came from, and the parameters the split BNs read."""
    graph = model.graph
    names = used_names(graph)
    made: Dict[str, str] = {}
    read: Set[str] = set()
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
        plan = _split_plan(bn, index)
        if plan is None:
            continue
        concat, convs, params = plan
        at = next(i for i, n in enumerate(graph.node) if n is concat)
        start = 0
        for k, conv in enumerate(convs):
            size = int(np.shape(index.try_value(conv.input[1]))[0])
            base = f"{bn.name or bn.output[0]}/slice{k}"
            inputs = [conv.output[0]]
            for p, value in zip(("scale", "B", "mean", "var"), params):
                name = unique_name(f"{base}.{p}", names)
                add_initializer(graph, name, value[start:start + size])
                inputs.append(name)
            out = unique_name(f"{base}.output", names)
            node_name = unique_name(base, names)
            graph.node.insert(at, onnx.helper.make_node("BatchNormalization", inputs, [out], name=node_name,
                                                        epsilon=attributes(bn).get("epsilon", 1e-5)))
            at += 1
            concat.input[k] = out
            made[node_name] = bn.name
            start += size
        concat.output[0] = bn.output[0]
        read.update(bn.input[1:])
        del graph.node[next(i for i, n in enumerate(graph.node) if n is bn)]
    return made, read


def _split_plan(bn: onnx.NodeProto, index: GraphIndex):
    """(the Concat, its Convs, the BN's parameters) when the BN can be split after them."""
    attrs = attributes(bn)
    if attrs.get("training_mode", 0) or sum(1 for o in bn.output if o) != 1 or index.opset < 9:
        return None
    concat = index.producer.get(bn.input[0])
    if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx") \
            or len(index.consumers[bn.input[0]]) != 1 or bn.input[0] in index.outputs:
        return None
    dims = index.shapes.get(bn.input[0], (None, None))[0]
    if dims is None or attributes(concat).get("axis", 0) % len(dims) != 1 or len(set(concat.input)) != len(concat.input):
        return None
    params = [index.try_value(name) for name in bn.input[1:5]]
    if any(p is None or p.ndim != 1 for p in params):
        return None
    convs = []
    for name in concat.input:
        conv = index.producer.get(name)
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or \
                len(index.consumers[name]) != 1 or name in index.outputs or index.try_value(conv.input[1]) is None:
            return None
        convs.append(conv)
    if sum(int(np.shape(index.try_value(c.input[1]))[0]) for c in convs) != params[0].size:
        return None
    return concat, convs, params
