"""ONNX subgraph → linear expression tree.

Walking back from a block's output tensor, every op that is linear in its activation
input with constant parameters becomes a node of the tree (Conv, per-channel Affine,
Transpose, zero Pad, Sum of terms); the walk stops at a Leaf: a graph input, or the
output of an op that is not linear. A tensor with several consumers (or a graph
output) is marked Shared and walked through once more, so that the block input can be
found beyond it. Which tensor is the block's input, and whether the tree is exact, is
decided later (linear.py, analyse.py): the walk itself never rejects, it records
problems on the ops so the report can name them.

The op vocabulary is the table `HANDLERS`; new term kinds (AveragePool, sequential
convs, ...) are added there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx

from .graph import GraphIndex, NotConstant, attributes
from .symbolic import Symbolic, scatter_box

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
    """A tensor with several consumers (or a graph output): the block input, or inside the block
    only when every consumer is inside it too (analyse.Analyser.exclusivity)."""
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
    kind: str = "affine"                          # "batchnorm" | "affine" | "noop" | "bias" (a Gemm's α and β·C)
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
    linear: bool = False                          # a Gemm or MatMul: channels are its input's last axis

    @property
    def group(self) -> int:
        return int(self.attrs.get("group", 1))

    def children(self):
        return [self.input]


@dataclass
class AvgPool(Expr):
    """AveragePool: a depthwise conv with taps 1/∏k once the channel count is known."""
    input: Expr = None
    attrs: dict = field(default_factory=dict)
    problem: Optional[str] = None

    @property
    def kernel(self) -> tuple:
        return tuple(int(k) for k in self.attrs.get("kernel_shape", ()))

    def children(self):
        return [self.input]


@dataclass
class Regroup(Expr):
    """Flatten or Reshape keeping the last axis whole: positions are regrouped, none is mixed, so a
    map of the channels (on the last axis) passes through it. The output shape is `target` (a
    Reshape's constant shape, -1 inferred), or that of tensor `like` (Reshape to Shape(like),
    `like_dims` its dims),
    or [·, C] (Flatten at the last axis)."""
    input: Expr = None
    rank: int = 2                                 # of the output
    target: Optional[tuple] = None
    like: Optional[str] = None
    like_dims: Optional[tuple] = None

    def children(self):
        return [self.input]


@dataclass
class Scatter(Expr):
    """ScatterND writing one per-channel constant into whole slices along one axis of the tensor
    as it is laid out, as exporters write DBB's BNAndPadLayer borders: `rows` the slices along
    `axis`, `value` the constant as the updates are laid out (size 1 on every axis but maybe the
    channels')."""
    input: Expr = None
    axis: int = 0
    rows: tuple = ()
    value: Optional[np.ndarray] = None

    def children(self):
        return [self.input]


@dataclass
class Transpose(Expr):
    """A layout change: output axis i is input axis perm[i]."""
    input: Expr = None
    perm: tuple = ()

    def children(self):
        return [self.input]


@dataclass
class Pad(Expr):
    """Constant padding: pads[i] = (begin, end) for every axis of the tensor as it is laid out."""
    input: Expr = None
    pads: tuple = ()
    value: float = 0.0
    problem: Optional[str] = None

    def children(self):
        return [self.input]


@dataclass
class Sum(Expr):
    terms: List[Tuple[float, Expr]] = field(default_factory=list)   # (sign, term)
    shift: Optional[np.ndarray] = None     # a constant operand of the same node (Sum(a, c, b)), broadcast like Add's

    def children(self):
        return [t for _, t in self.terms]


def block_exprs(expr: Expr, source: Optional[str] = None) -> List[Expr]:
    """The expressions between the block input `source` and the output, each once, parents first.

    Without a source: down to the first shared tensors."""
    out, done = [], set()
    stack = [expr]
    while stack:
        e = stack.pop()
        if id(e) in done or (isinstance(e, (Leaf, Shared)) and (source is None or e.tensor == source)):
            continue
        done.add(id(e))
        out.append(e)
        stack.extend(reversed(e.children()))
    return out


def block_nodes(expr: Expr, source: Optional[str] = None) -> List[onnx.NodeProto]:
    """The ONNX nodes between the block input `source` and the output, each once."""
    out, seen = [], set()
    for e in block_exprs(expr, source):
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
        self.symbolic = Symbolic(index)   # shape arithmetic over dynamic dims (index grids)

    def walk(self, tensor: str, root: bool = False, depth: int = 0, shared: bool = False) -> Expr:
        """The expression computing `tensor`. Memoized: a sub-expression may appear in several places."""
        key = (tensor, root, shared)
        if key not in self._memo:
            self._memo[key] = self._walk(tensor, root, depth, shared)
        return self._memo[key]

    def _walk(self, tensor: str, root: bool, depth: int, shared: bool) -> Expr:
        index = self.index
        if not root:
            consumers = index.value_fan_out(tensor)   # shape readers are checked by analyse.Analyser.exclusivity
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
        # one vector per parameter, of one length (opset < 9 with spatial=0: one value per
        # channel and position, of the input's shape without the batch axis)
        vectors = w.index.opset < 9 and attrs.get("spatial", 1) == 0 or gamma.ndim == 1
        if not vectors or len({p.shape for p in (gamma, beta, mean, var)}) != 1:
            problem = (f"BatchNormalization '{node.name}' has parameters of shapes "
                       f"{', '.join(str(list(p.shape)) for p in (gamma, beta, mean, var))}, not vectors of one length")
        else:
            try:
                scale, shift = bn_affine(gamma, beta, mean, var, attrs.get("epsilon", 1e-5))
            except ValueError as exc:
                problem = f"BatchNormalization '{node.name}' has {exc}"
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
    noop = (scale is None or np.all(scale == 1)) and (shift is None or np.all(shift == 0)) and \
        _cannot_broadcast(c, w.index.shapes.get(x, (None, None))[0])
    return Affine(tensor, [node], input=w.input(x, depth), scale=scale, shift=shift,
                  kind="noop" if noop else "affine")


def _cannot_broadcast(c: np.ndarray, dims) -> bool:
    """x·1 or x + 0 is x only when the constant cannot widen x's shape: each of its dims is 1 or
    the guaranteed size of x there (RT-DETR's all-ones mask [1, 1029, 1] would broadcast an
    x of 1 token to 1029)."""
    if dims is None:
        return c.size == 1 and c.ndim == 0
    if c.ndim > len(dims):
        return False
    return all(d == 1 or d == x for d, x in zip(c.shape[::-1], tuple(dims)[::-1]))


def _neg(w: Walker, node, tensor, depth):
    return Affine(tensor, [node], input=w.input(node.input[0], depth), scale=np.array(-1.0), kind="affine")


def _sum(w: Walker, node, tensor, depth):
    consts = [w.const(i) for i in node.input]
    variable = [i for i, c in zip(node.input, consts) if c is None]
    if not variable:
        return None
    fixed = [c.astype(np.float64) for c in consts if c is not None]
    if any(not np.issubdtype(c.dtype, np.floating) for c in fixed):
        return None
    shift = sum(fixed[1:], fixed[0]) if fixed else None
    # a zero constant changes nothing unless it widens the shape
    zero = shift is None or not np.any(shift) and all(
        _cannot_broadcast(c, w.index.shapes.get(v, (None, None))[0]) for c in fixed for v in variable)
    if len(variable) == 1:   # Sum(x, c…) is x + Σc
        return Affine(tensor, [node], input=w.input(variable[0], depth), shift=shift,
                      kind="noop" if zero else "affine")
    # the constants belong to this node: they are part of the sum, not an op after it
    return Sum(tensor, [node], terms=[(1.0, w.input(i, depth)) for i in variable],
               shift=None if zero else shift)


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
    if weight is not None and np.ndim(weight) < 3:   # a constant subgraph validate.py could not see through
        problem, weight = f"Conv '{node.name}' weight has rank {np.ndim(weight)}; a Conv weight has rank 3 or more", None
    return Conv(tensor, [node], input=w.input(node.input[0], depth), weight=weight, bias=bias,
                attrs=attributes(node), problem=problem)


def _gemm(w: Walker, node, tensor, depth):
    """Gemm(x, W, c) = α·x·W(ᵀ) + β·c on a rank-2 x: a conv of no spatial axis (kernel W as [O, C]),
    then the per-channel affine ops α and β·c (their exprs are internal: no tensor of the graph)."""
    attrs = attributes(node)
    if attrs.get("transA", 0):
        return None
    weight, problem = _linear_weight(w, node)
    if weight is not None and not attrs.get("transB", 0):
        weight = weight.T
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    c = w.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and c is None:
        problem = problem or f"Gemm '{node.name}' has a bias that is not a constant"
    inner: Expr = Conv(f"{tensor}#linear", input=w.input(node.input[0], depth), weight=weight, problem=problem,
                       linear=True)
    if alpha != 1.0:
        inner = Affine(f"{tensor}#alpha", input=inner, scale=np.array(alpha), kind="bias")
    if c is not None and beta != 0.0:
        # C broadcasts against [N, O]: one value per output channel is what a bias is
        inner = Affine(f"{tensor}#bias", input=inner, shift=np.asarray(c, np.float64) * beta, kind="bias")
    inner.tensor, inner.nodes = tensor, [node]
    return inner


def _matmul(w: Walker, node, tensor, depth):
    """MatMul(x, W) with a constant [C, O] W is a 1×…×1 conv on the channel axis moved last:
    Transpose(channels first) → Conv → Transpose(back), exprs internal to the node."""
    if w.const(node.input[0]) is not None:
        return None   # W·x mixes positions, not channels
    dims = w.index.shapes.get(node.input[0], (None, None))[0]
    weight, problem = _linear_weight(w, node)
    if dims is None or len(dims) < 2:
        return None
    rank = len(dims)
    if weight is not None:
        weight = weight.T.reshape(weight.shape[::-1] + (1,) * (rank - 2))
    x = w.input(node.input[0], depth)
    if rank == 2:
        return Conv(tensor, [node], input=x, weight=weight, problem=problem, linear=True)
    first = (0, rank - 1) + tuple(range(1, rank - 1))   # channels (last) to axis 1
    last = tuple(first.index(a) for a in range(rank))
    conv = Conv(f"{tensor}#linear", input=Transpose(f"{tensor}#channels_first", input=x, perm=first),
                weight=weight, problem=problem, linear=True)
    return Transpose(tensor, [node], input=conv, perm=last)


def _linear_weight(w: Walker, node):
    """The constant rank-2 weight of a Gemm or MatMul, or (None, the problem)."""
    try:
        weight = w.index.value(node.input[1])
    except NotConstant as exc:
        return None, f"{node.op_type} '{node.name}' weight {exc}"
    if np.ndim(weight) != 2:
        return None, f"{node.op_type} '{node.name}' weight has rank {np.ndim(weight)}, not 2"
    return weight, None


def _flatten(w: Walker, node, tensor, depth):
    """Flatten at the last axis ([…, C] → [∏…, C]) regroups positions; at another axis it mixes channels."""
    dims = w.index.shapes.get(node.input[0], (None, None))[0]
    if dims is None:
        return None
    axis = int(attributes(node).get("axis", 1))
    axis = axis + len(dims) if axis < 0 else axis
    if axis != len(dims) - 1:
        return None
    return Regroup(tensor, [node], input=w.input(node.input[0], depth), rank=2)


def _reshape(w: Walker, node, tensor, depth):
    """Reshape to a constant shape, or to the Shape of a tensor (a Shape node with no start/end)."""
    shape = w.const(node.input[1])
    x = w.input(node.input[0], depth)
    if shape is not None:
        target = tuple(int(d) for d in np.asarray(shape).reshape(-1))
        if 0 in target:   # 0 copies an input dim (or is a zero dim with allowzero): not a regrouping to prove
            return None
        return Regroup(tensor, [node], input=x, rank=len(target), target=target)
    producer = w.index.producer.get(node.input[1])
    if producer is None or producer.op_type != "Shape" or attributes(producer).get("start", 0) != 0 \
            or "end" in attributes(producer):
        return None
    like = producer.input[0]
    dims = w.index.shapes.get(like, (None, None))[0]
    if dims is None:
        return None
    return Regroup(tensor, [node], input=x, rank=len(dims), like=like, like_dims=tuple(dims))


def before_any_regroup(expr: Expr, tensor: str, source: str) -> bool:
    """`tensor` is computed on this chain below `expr` by per-channel ops and regroupings only,
    and below it, down to `source`, the chain has no regrouping: its shape is the source's with
    the channels of the ops between."""
    e, found = expr, False
    while isinstance(e, (Affine, Regroup, Conv, Transpose)) and e.tensor != source:
        if e.tensor == tensor:
            found = True
        elif not found and isinstance(e, (Conv, Transpose)):
            return False   # channels may change between: the shape would not be the output's
        elif found and isinstance(e, Regroup):
            return False
        e = e.input
    return found or e.tensor == tensor


def _scatter_nd(w: Walker, node, tensor, depth):
    """ScatterND(data, indices writing whole slices along one axis, a broadcast constant): the
    indices constant ([k, 1] after Transposes, dynamo) or a meshgrid of the data's dims (TorchScript)."""
    reduction = attributes(node).get("reduction", "none")
    if (reduction.decode() if isinstance(reduction, bytes) else reduction) != "none":
        return None
    dims = w.index.shapes.get(node.input[0], (None, None))[0]
    box = scatter_box(w.symbolic, node.input[1], node.input[0])
    if dims is None or box is None:
        return None
    value = _broadcast_constant(w, node.input[2], len(dims))
    if value is None:
        return None
    return Scatter(tensor, [node], input=w.input(node.input[0], depth), axis=box[0], rows=box[1], value=value)


def _broadcast_constant(w: Walker, name: str, rank: int) -> Optional[np.ndarray]:
    """The constant c that `name` broadcasts (Expands of c, Reshapes, Transposes), laid out as
    `name` is and padded to `rank` axes; None when `name` is not such a value.

    A Reshape that keeps every axis after axis f as it is (same dims) leaves each element's
    index on those axes as it was: it passes when c does not vary along axes 0..f (TorchScript
    expands c to a shape of the traced batch, then reshapes it to the indices' batch)."""
    perms, scrambled = [], -1   # axes 0..scrambled: reordered by a Reshape (c must be constant there)
    while True:
        value = w.const(name)
        if value is not None:
            break
        node = w.index.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Transpose" and attributes(node).get("perm") is not None:
            if scrambled >= 0:
                return None   # a Transpose under such a Reshape: the axes no longer line up
            perms.append(tuple(attributes(node)["perm"]))
            name = node.input[0]
        elif node.op_type == "Expand":   # of a constant, or of another broadcast constant
            name = node.input[0]
        elif node.op_type == "Reshape":
            after, before = w.symbolic.dims(name, loose=True), w.symbolic.dims(node.input[0], loose=True)
            if after is None or before is None or len(after) != rank or len(before) != rank:
                return None
            differ = [k for k in range(rank) if before[k] is None or before[k] != after[k]]
            scrambled = max([scrambled] + differ)
            name = node.input[0]
        else:
            return None
    value = np.asarray(value, np.float64)
    if value.ndim > rank:
        return None
    value = value.reshape((1,) * (rank - value.ndim) + value.shape)
    for k in range(scrambled + 1):   # constant along the reordered axes, or not this value
        if value.shape[k] != 1:
            if not np.all(value == value.take([0], axis=k)):
                return None
            value = value.take([0], axis=k)
    for perm in reversed(perms):   # the innermost Transpose first
        if len(perm) != rank:
            return None
        value = np.transpose(value, perm)
    return value


def _transpose(w: Walker, node, tensor, depth):
    perm = attributes(node).get("perm")
    if perm is None:
        dims = w.index.shapes.get(node.input[0], (None, None))[0]
        if dims is None:
            return None
        perm = list(reversed(range(len(dims))))
    if sorted(perm) != list(range(len(perm))):
        return None   # not a permutation: the runtime will reject it; not ours to read
    return Transpose(tensor, [node], input=w.input(node.input[0], depth), perm=tuple(int(p) for p in perm))


def _pad(w: Walker, node, tensor, depth):
    """Pad with a constant (mode constant); other modes are not a conv's padding."""
    attrs = attributes(node)
    mode = attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if w.index.opset < 11:
        pads, value, axes = attrs.get("pads"), attrs.get("value", 0.0), None
    else:
        pads = w.const(node.input[1]) if len(node.input) > 1 else None
        value = w.const(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
        axes = w.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    problem = None
    if mode != "constant":
        problem = f"Pad '{node.name}' uses mode {mode}, not zero padding"
    elif pads is None or value is None or (len(node.input) > 3 and node.input[3] and axes is None):
        problem = f"Pad '{node.name}' has non-constant pads"
    elif np.asarray(value).size != 1 or not np.isfinite(np.asarray(value, np.float64)).all():
        problem = f"Pad '{node.name}' has a padding value that is not one finite number"
    per_axis = ()
    if problem is None:
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        half = len(pads) // 2
        rank = len(w.index.shapes.get(node.input[0], ((None,) * half, None))[0] or (None,) * half)
        axes = list(range(half)) if axes is None else [int(a) % rank for a in np.asarray(axes).reshape(-1)]
        full = {a: (pads[i], pads[i + half]) for i, a in enumerate(axes)}
        per_axis = tuple(full.get(a, (0, 0)) for a in range(rank))
        if any(p < 0 for pair in per_axis for p in pair):
            problem = f"Pad '{node.name}' crops (negative pads)"
    fill = float(np.asarray(value, np.float64).reshape(-1)[0]) if problem is None else 0.0
    return Pad(tensor, [node], input=w.input(node.input[0], depth), pads=per_axis, value=fill, problem=problem)


def _average_pool(w: Walker, node, tensor, depth):
    """AveragePool counting its padding (or with none) is a depthwise conv; ceil_mode can add a
    partial window that divides by fewer taps."""
    attrs = attributes(node)
    problem = None
    if attrs.get("ceil_mode", 0):
        problem = f"AveragePool '{node.name}' uses ceil_mode=1 (a partial last window is not a convolution)"
    elif not attrs.get("kernel_shape"):
        problem = f"AveragePool '{node.name}' has no kernel_shape"
    if sum(1 for o in node.output if o) > 1:
        return None
    return AvgPool(tensor, [node], input=w.input(node.input[0], depth), attrs=attrs, problem=problem)


def _cast(w: Walker, node, tensor, depth):
    """A Cast to the dtype the tensor already has is a no-op."""
    to = attributes(node).get("to")
    dtype = w.index.shapes.get(node.input[0], (None, None))[1]
    if dtype is None or onnx.helper.tensor_dtype_to_np_dtype(to) != np.dtype(dtype):
        return None
    return Affine(tensor, [node], input=w.input(node.input[0], depth), kind="noop")


HANDLERS: Dict[str, Handler] = {
    "Transpose": _transpose,
    "Pad": _pad,
    "Cast": _cast,
    "Identity": _identity,
    "BatchNormalization": _batchnorm,
    "Add": _binary,
    "Sub": _binary,
    "Mul": _binary,
    "Div": _binary,
    "Neg": _neg,
    "Sum": _sum,
    "Conv": _conv,
    "AveragePool": _average_pool,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "ScatterND": _scatter_nd,
}

# Ops that can end a block: the walk starts from their outputs.
ROOT_OPS = frozenset({"Add", "Sub", "Sum", "BatchNormalization", "Mul", "Div", "Neg", "Identity", "Conv", "Gemm",
                      "MatMul", "Flatten", "Reshape", "AveragePool"})
