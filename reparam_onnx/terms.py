"""ONNX subgraph → linear expression tree.

Walking back from a block's output tensor, every op that is linear in its activation
input with constant parameters becomes a node of the tree (Conv, per-channel Affine,
Sum of terms); the walk stops at a Leaf: a tensor with several consumers, a graph
input or output, or the output of an op that is not linear. Which leaf is the block's
input, and whether the tree is exact, is decided later (linear.py): the walk itself
never rejects, it records problems on the ops so the report can name them.

The op vocabulary is the table `HANDLERS`; new term kinds (Pad, AveragePool,
Transpose, ...) are added there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import onnx

from .graph import GraphIndex, NotConstant, attributes

MAX_DEPTH = 24


@dataclass
class Expr:
    tensor: str                                   # the tensor this expression computes
    nodes: List[onnx.NodeProto] = field(default_factory=list)   # ONNX nodes it consumes

    def children(self) -> List["Expr"]:
        return []


@dataclass
class Leaf(Expr):
    """Where the walk stopped; `reason` says why the walk could not go further."""
    reason: str = ""


@dataclass
class Shared(Expr):
    """A tensor with other consumers (or a graph output): it can be the block input, never inside it."""
    input: Expr = None
    reason: str = ""

    def children(self):
        return [self.input]


@dataclass
class Affine(Expr):
    """y = scale·x + shift with constant, broadcastable scale and shift (None = 1 and 0)."""
    input: Expr = None
    scale: Optional[np.ndarray] = None
    shift: Optional[np.ndarray] = None
    kind: str = "affine"                          # "batchnorm" | "affine" | "noop"
    problem: Optional[str] = None
    on_channels: bool = False                     # scale/shift are vectors over axis 1 (BN), not broadcast shapes

    def children(self):
        return [self.input]


@dataclass
class Conv(Expr):
    input: Expr = None
    weight: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None
    attrs: dict = field(default_factory=dict)
    problem: Optional[str] = None

    @property
    def group(self) -> int:
        return int(self.attrs.get("group", 1))

    def children(self):
        return [self.input]


@dataclass
class Sum(Expr):
    terms: List[Tuple[float, Expr]] = field(default_factory=list)   # (sign, term)

    def children(self):
        return [t for _, t in self.terms]


def walk_expr(expr: Expr, below_shared: bool = True) -> Iterator[Expr]:
    """Every expression of the tree once, parents before children."""
    seen = set()
    stack = [expr]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if below_shared or not isinstance(e, Shared):
            stack.extend(reversed(e.children()))


def block_nodes(expr: Expr) -> List[onnx.NodeProto]:
    """The ONNX nodes of a block, each once (shared tensors are the block's input, not part of it)."""
    out, seen = [], set()
    for e in walk_expr(expr, below_shared=False):
        for n in e.nodes:
            if id(n) not in seen:
                seen.add(id(n))
                out.append(n)
    return out


class Walker:
    def __init__(self, index: GraphIndex):
        self.index = index
        self._memo: Dict[tuple, Expr] = {}
        self._shared = False

    def walk(self, tensor: str, root: bool = False, depth: int = 0, shared: bool = False) -> Expr:
        """The expression computing `tensor`. Memoized: a sub-expression may appear in several places."""
        key = (tensor, root, shared)
        if key not in self._memo:
            self._memo[key] = self._walk(tensor, root, depth, shared)
        return self._memo[key]

    def _walk(self, tensor: str, root: bool, depth: int, shared: bool) -> Expr:
        index = self.index
        if not root:
            consumers = index.fan_out(tensor)
            if tensor in index.outputs or consumers > 1:
                reason = f"'{tensor}' is a graph output" if tensor in index.outputs else \
                    f"'{tensor}' has {consumers} consumers"
                if shared:  # walk through one shared tensor only: enough to find the block input
                    return Leaf(tensor, reason=reason)
                return Shared(tensor, input=self._walk(tensor, True, depth, True), reason=reason)
        node = index.producer.get(tensor)
        if node is None:
            return Leaf(tensor, reason=f"'{tensor}' is a graph input")
        if depth > MAX_DEPTH:
            return Leaf(tensor, reason="the branch is too deep")
        if node.domain not in ("", "ai.onnx"):
            return Leaf(tensor, reason=f"{node.domain}.{node.op_type} '{node.name}' is not a known linear op")
        handler = HANDLERS.get(node.op_type)
        outer, self._shared = self._shared, shared
        try:
            expr = handler(self, node, tensor, depth) if handler else None
        finally:
            self._shared = outer
        if expr is None:
            return Leaf(tensor, reason=f"{node.op_type} '{node.name}' is not linear")
        return expr

    def input(self, tensor: str, depth: int) -> Expr:
        """Walk to an input of the node being handled."""
        return self.walk(tensor, depth=depth + 1, shared=self._shared)

    def const(self, name: str) -> Optional[np.ndarray]:
        if not name:
            return None
        return self.index.try_value(name)


Handler = Callable[[Walker, onnx.NodeProto, str, int], Optional[Expr]]


def _identity(w: Walker, node, tensor, depth):
    return Affine(tensor, [node], input=w.input(node.input[0], depth), kind="noop")


def _batchnorm(w: Walker, node, tensor, depth):
    attrs = attributes(node)
    params, problem = [], None
    for name in node.input[1:5]:
        value = w.const(name)
        if value is None:
            try:
                w.index.value(name)
            except NotConstant as exc:
                problem = f"BatchNormalization '{node.name}' parameter {exc}"
        params.append(value)
    if attrs.get("training_mode", 0) or sum(1 for o in node.output if o) > 1:
        problem = f"BatchNormalization '{node.name}' is in training mode"
    scale = shift = None
    if problem is None:
        from .kernels import bn_affine
        gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
        scale, shift = bn_affine(gamma, beta, mean, var, attrs.get("epsilon", 1e-5))
    return Affine(tensor, [node], input=w.input(node.input[0], depth), scale=scale, shift=shift,
                  kind="batchnorm", problem=problem, on_channels=True)


def _binary(w: Walker, node, tensor, depth):
    a, b = node.input[0], node.input[1]
    ca, cb = w.const(a), w.const(b)
    op = node.op_type
    if ca is None and cb is None:
        if op in ("Add", "Sub"):
            sign = -1.0 if op == "Sub" else 1.0
            return Sum(tensor, [node], terms=[(1.0, w.input(a, depth)), (sign, w.input(b, depth))])
        return None
    if ca is not None and cb is not None:
        return None  # a constant; not a block
    x, c, const_first = (b, ca, True) if ca is not None else (a, cb, False)
    if not np.issubdtype(c.dtype, np.floating):
        return None
    c = c.astype(np.float64)
    scale = shift = None
    if op == "Add":
        shift = c
    elif op == "Sub":
        scale, shift = (-np.ones_like(c), c) if const_first else (None, -c)
    elif op == "Mul":
        scale = c
    elif op == "Div":
        if const_first or not np.all(c != 0):
            return None
        scale = 1.0 / c
    else:
        return None
    noop = (scale is None or np.all(scale == 1)) and (shift is None or np.all(shift == 0))
    return Affine(tensor, [node], input=w.input(x, depth), scale=scale, shift=shift,
                  kind="noop" if noop else "affine")


def _neg(w: Walker, node, tensor, depth):
    return Affine(tensor, [node], input=w.input(node.input[0], depth), scale=np.array(-1.0), kind="affine")


def _sum(w: Walker, node, tensor, depth):
    consts = [w.const(i) for i in node.input]
    variable = [i for i, c in zip(node.input, consts) if c is None]
    if not variable:
        return None
    expr = Sum(tensor, [node], terms=[(1.0, w.input(i, depth)) for i in variable])
    fixed = [c.astype(np.float64) for c in consts if c is not None]
    if fixed:
        if len(variable) == 1:
            expr = expr.terms[0][1]
        shift = sum(fixed[1:], fixed[0])
        return Affine(tensor, [node], input=expr, shift=shift, kind="noop" if not np.any(shift) else "affine")
    return expr


def _conv(w: Walker, node, tensor, depth):
    problem = None
    weight = bias = None
    try:
        weight = w.index.value(node.input[1])
    except NotConstant as exc:
        problem = f"Conv '{node.name}' weight {exc}"
    if len(node.input) > 2 and node.input[2]:
        try:
            bias = w.index.value(node.input[2])
        except NotConstant as exc:
            problem = f"Conv '{node.name}' bias {exc}"
    return Conv(tensor, [node], input=w.input(node.input[0], depth), weight=weight, bias=bias,
                attrs=attributes(node), problem=problem)


HANDLERS: Dict[str, Handler] = {
    "Identity": _identity,
    "BatchNormalization": _batchnorm,
    "Add": _binary,
    "Sub": _binary,
    "Mul": _binary,
    "Div": _binary,
    "Neg": _neg,
    "Sum": _sum,
    "Conv": _conv,
}

# Ops that can end a block: the walk starts from their outputs.
ROOT_OPS = frozenset({"Add", "Sub", "Sum", "BatchNormalization", "Mul", "Div", "Neg"})
