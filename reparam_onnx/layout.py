"""Cancel layout changes that undo each other.

Before: Transpose(p) → e₁ → … → eₖ → Transpose(q) (k ≥ 0), with q∘p the identity and every eᵢ
        element-wise (an activation, or Add/Sub/Mul/Div/PRelu with a constant operand),
        each intermediate tensor read once and not a graph output.
After:  e₁ → … → eₖ on the untransposed tensor; constant operands are transposed by p⁻¹.
Conditions: constants fold; ranks known; Transpose(p) or Transpose(q) is one the caller
created (a fused block's layout change): chains elsewhere in the model are not the
caller's to rewrite. Exact: element-wise ops commute with any permutation of axes.
"""
from __future__ import annotations

from typing import Dict, Optional, Set

import numpy as np
import onnx

from .edit import add_initializer, forget_value_info, used_names
from .graph import GraphIndex, attributes, subgraph_reads, unique_name

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Gelu",
         "Softplus", "Softsign", "Identity", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Mish", "Clip", "Cast"}
WITH_CONSTANT = {"Add", "Sub", "Mul", "Div", "PRelu", "Pow"}


def _perm(node: onnx.NodeProto, index: GraphIndex) -> Optional[tuple]:
    perm = attributes(node).get("perm")
    if perm is None:
        dims = index.shapes.get(node.input[0], (None, None))[0]
        return tuple(reversed(range(len(dims)))) if dims is not None else None
    perm = tuple(int(p) for p in perm)
    return perm if sorted(perm) == list(range(len(perm))) else None


def cancel_transposes(model: onnx.ModelProto, index: GraphIndex, created: Set[str]) -> int:
    """Remove pairs of inverse Transposes around element-wise chains that begin or end at a
    Transpose named in `created`; returns how many pairs."""
    graph = model.graph
    names = used_names(graph)
    removed: Set[int] = set()
    renamed_outputs: Dict[int, str] = {}
    new_inputs: Dict[int, Dict[int, str]] = {}
    new_inits: Dict[str, np.ndarray] = {}
    stale: Set[str] = set()
    rename: Dict[str, str] = {}
    pairs = 0
    for first in graph.node:
        if first.op_type != "Transpose" or first.domain not in ("", "ai.onnx") or id(first) in removed:
            continue
        p = _perm(first, index)
        if p is None:
            continue
        chain, tensor = [], first.output[0]
        while True:
            if tensor in index.outputs or index.fan_out(tensor) != 1:
                chain = None
                break
            node = index.consumers[tensor][0]
            if id(node) in removed or node.domain not in ("", "ai.onnx"):
                chain = None
                break
            if node.op_type == "Transpose":
                q = _perm(node, index)
                if q is None or len(q) != len(p) or any(p[q[i]] != i for i in range(len(p))):
                    chain = None
                break
            if not _elementwise(node, tensor, index):
                chain = None
                break
            chain.append((node, tensor))
            tensor = node.output[0]
        if chain is None:
            continue
        last = node
        if first.name not in created and last.name not in created:
            continue
        if not chain:
            # Transpose∘Transpose = identity: readers of the second read the first's input
            if last.output[0] in index.outputs or any(subgraph_reads(c) for c in index.consumers[last.output[0]]):
                continue
            rename[last.output[0]] = first.input[0]
            removed.update({id(first), id(last)} if index.fan_out(first.output[0]) == 1 else {id(last)})
            pairs += 1
            continue
        inverse = tuple(int(i) for i in np.argsort(p))
        for n, (op, fed) in enumerate(chain):
            inputs = new_inputs.setdefault(id(op), {})
            for pos, name in enumerate(op.input):
                if name == fed:
                    inputs[pos] = first.input[0] if n == 0 else name
                elif name and op.op_type not in UNARY:
                    value = index.try_value(name)
                    full = value.reshape((1,) * (len(p) - value.ndim) + value.shape)
                    new_name = unique_name(f"{name}/transposed", names)
                    new_inits[new_name] = np.transpose(full, inverse)
                    inputs[pos] = new_name
            stale.update(op.output)
        renamed_outputs[id(chain[-1][0])] = last.output[0]
        removed.add(id(last))
        if index.fan_out(first.output[0]) == 1 and first.output[0] not in index.outputs:
            removed.add(id(first))
        pairs += 1
    if not pairs:
        return 0
    kept = []
    for node in graph.node:
        if id(node) in removed:
            continue
        for pos, name in new_inputs.get(id(node), {}).items():
            node.input[pos] = name
        for pos, name in enumerate(node.input):
            if name in rename:
                node.input[pos] = rename[name]
        if id(node) in renamed_outputs:
            node.output[0] = renamed_outputs[id(node)]
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    for name, array in new_inits.items():
        add_initializer(graph, name, array)
    forget_value_info(graph, stale)
    return pairs


def _elementwise(node: onnx.NodeProto, fed: str, index: GraphIndex) -> bool:
    if node.op_type in UNARY:
        # Clip's min/max are scalars; other inputs must be constant too
        return node.input[0] == fed and all(not i or index.try_value(i) is not None for i in node.input[1:])
    if node.op_type in WITH_CONSTANT and len(node.input) == 2:
        other = node.input[1] if node.input[0] == fed else node.input[0]
        if node.op_type in ("PRelu", "Pow") and node.input[0] != fed:
            return False
        value = index.try_value(other)
        rank = len(index.shapes.get(fed, ((),))[0] or ())
        return value is not None and other != fed and value.ndim <= rank
    return False
