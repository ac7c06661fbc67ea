"""Linear expression tree → one convolution, exactly, or NotExact(reason).

The tree (terms.py) is evaluated bottom-up relative to the block input x. Every
sub-expression is either a per-channel affine map of x (Diag) or a convolution of x
(ConvMap); both are kept in float64. Sums align their branches with
geometry.align and add the placed kernels.

Layouts: every value is computed in the canonical (N, C, spatial...) order and carries
the permutation `layout` that lays it out as the graph has it (actual = Transpose(canonical,
perm=layout)); the block input's layout is whatever makes its convs read (N, C, ...).
Per-channel constants are read on the axis where the layout puts C.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import kernels
from .geometry import ConvGeometry, GeometryError, align, conv_geometry
from .geometry import compose as compose_geometry
from .terms import (Affine, AvgPool, Conv, Expr, Leaf, Pad, Regroup, Scatter, Shared, Sum, Transpose, before_any_regroup,
                    block_exprs)


MAX_MERGED_WEIGHTS = 1 << 26   # a merged kernel is never larger than this, even when asked


class NotExact(Exception):
    """The block cannot be rewritten as one conv exactly: the message says why, `code` which
    condition failed (report.REASON_CODES), `nodes` the graph nodes it is about."""

    def __init__(self, message: str, code: str = "geometry", nodes: Sequence[str] = ()):
        super().__init__(message)
        self.code = code
        self.nodes = list(nodes)


def _names(expr: Expr) -> List[str]:
    return [n.name for n in expr.nodes if n.name]


@dataclass
class Diag:
    """y[c] = scale[c]·x[c] + shift[c], then padded by `pads` (canonical spatial axes) with border[c]."""
    scale: np.ndarray
    shift: np.ndarray
    layout: tuple = ()
    pads: Optional[Tuple[tuple, tuple]] = None     # (begin per spatial axis, end per spatial axis)
    border: Optional[np.ndarray] = None            # the value of every padded position, per channel
    regroup: Optional[Regroup] = None              # the last Flatten/Reshape it went through (channels last)
    writes: Optional[dict] = None                  # ring slices written so far: (canonical axis, index) → value

    def at_zero(self) -> Optional[np.ndarray]:
        """What the map gives a zero input, per channel: the value a padded input position takes
        when the padding moves before the map."""
        return self.shift


@dataclass
class ConvMap:
    """y = conv(x, kernel, groups=group, geometry) + bias, then padded by `pads` with border[c]."""
    kernel: np.ndarray
    bias: np.ndarray
    geometry: ConvGeometry
    group: int
    layout: tuple = ()
    pads: Optional[Tuple[tuple, tuple]] = None
    border: Optional[np.ndarray] = None
    regroup: Optional[Regroup] = None
    writes: Optional[dict] = None
    reshape: Optional[tuple] = None   # the output then reshaped to this (trailing_reshape)

    @property
    def out_channels(self) -> int:
        return self.kernel.shape[0]

    def at_zero(self) -> Optional[np.ndarray]:
        """The value at a position padded before the conv: its bias for a 1×1, stride-1, unpadded
        conv; for any other, positions near the padding mix in real inputs (None)."""
        return self.bias if self.geometry.is_pointwise else None


class TooCostly(NotExact):
    """The block is exact, but its merged conv would cost more than what it replaces."""

    def __init__(self, message: str):
        super().__init__(message, code="cost")


@dataclass
class Context:
    source: str                         # the block input tensor
    channels: int                       # C of the block input
    rank: int                           # spatial rank
    spatial: Optional[Sequence[Optional[int]]]   # static canonical spatial size of the block input (None: unknown)
    layout: tuple = ()                  # how the block input is laid out (identity: N, C, spatial...)
    allow_larger: bool = False          # merge even when the merged conv costs more than its branches
    eps: float = float(np.finfo(np.float32).eps)   # of the model's float dtype: how far a stored padding value may round
    budget: Optional[Tuple[int, int]] = None   # (weights of what the block replaces, its output channels): _check_early

    @property
    def canonical(self) -> tuple:
        return tuple(range(self.rank + 2))


def compose(layout: Sequence[int], perm: Sequence[int]) -> tuple:
    """The layout after Transpose(perm) of a tensor laid out as `layout`."""
    return tuple(layout[p] for p in perm)


def inverse(perm: Sequence[int]) -> tuple:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


def source_layout(expr: Expr, source: str, rank: int) -> tuple:
    """The block input's layout: the inverse of the Transposes between it and its first Conv."""
    identity = tuple(range(rank + 2))
    for conv in (e for e in block_exprs(expr, source) if isinstance(e, (Conv, AvgPool))):
        perms, e = [], conv.input
        while not (isinstance(e, (Leaf, Shared)) and e.tensor == source):
            if isinstance(e, Transpose):
                perms.append(e.perm)
            if not isinstance(e, (Transpose, Affine, Pad, Shared)):
                break
            e = e.input
        else:
            chain = identity
            for perm in reversed(perms):
                if len(perm) != len(chain):
                    raise NotExact("a Transpose changes the tensor's rank", code="layout")
                chain = compose(chain, perm)
            return inverse(chain)
    return identity


def top_terms(expr: Expr) -> Tuple[List[Expr], bool]:
    """The terms of the block's sum (nested sums flattened) and whether there is a sum at all."""
    core = expr
    while isinstance(core, (Affine, Transpose)):
        core = core.input
    if not isinstance(core, Sum):
        return [expr], False
    return [term for _, term in _signed_terms(core)], True


def _reachable(term: Expr) -> Dict[str, Tuple[int, bool]]:
    """Tensors where the walk stopped or was shared below `term`: name → (depth, below a Conv)."""
    found: Dict[str, Tuple[int, bool]] = {}
    queue = deque([(term, 0, False)])   # breadth first: the first visit of a node is its shallowest
    seen = set()
    while queue:
        e, depth, below_conv = queue.popleft()
        if (id(e), below_conv) in seen:
            continue
        seen.add((id(e), below_conv))
        if isinstance(e, (Leaf, Shared)):
            d, c = found.get(e.tensor, (depth, False))
            found[e.tensor] = (min(d, depth), c or below_conv)
        below = below_conv or isinstance(e, Conv)   # a block needs a real conv: a pool alone is not one
        queue.extend((child, depth + 1, below) for child in e.children())
    return found


def choose_source(expr: Expr) -> Optional[str]:
    """The block input: the tensor most terms reach, through a Conv, nearest the output; or None.

    A block needs a Conv over its input, and either two terms of a sum reaching that
    input or an affine op after the conv (a Conv→BN chain).
    """
    terms, has_sum = top_terms(expr)
    count: Dict[str, int] = {}
    depth: Dict[str, int] = {}
    through_conv = set()
    for term in terms:
        for tensor, (d, below_conv) in _reachable(term).items():
            count[tensor] = count.get(tensor, 0) + 1
            depth[tensor] = max(depth.get(tensor, 0), d)
            if below_conv:
                through_conv.add(tensor)
    if not through_conv:
        return None
    best = min(through_conv, key=lambda t: (-count[t], depth[t], t))
    if has_sum:
        return best if count[best] >= 2 else None
    return best if len(chain_ops(expr)) >= 2 else None


def chain_ops(expr: Expr) -> List[Expr]:
    """The ops of a chain that compute something (convs, pools, affine ops that are not no-ops),
    output first, down to where it stops having one path; empty when none is a Conv. A chain
    is a block when it has two such ops, one a Conv (Conv→BN, BN→Conv, Conv→Conv, AvgPool→Conv)."""
    ops, e = [], expr
    while isinstance(e, (Affine, Transpose, Pad, Scatter, Conv, AvgPool, Regroup)):   # not through a Shared tensor
        if isinstance(e, (Conv, AvgPool)) or isinstance(e, Affine) and e.kind not in ("noop", "bias") or \
                _arithmetic_noop(e):
            ops.append(e)   # a Gemm's bias is part of its linear op, not one of its own
        e = e.input
    if not any(isinstance(op, Conv) for op in ops):
        return []
    return ops


def _arithmetic_noop(e: Expr) -> bool:
    """Add/Sub of 0, Mul/Div by 1 (timm's MobileOne exported with constant folding adds its
    absent branches as a 0): a node to fold away, where an Identity or a Cast is layout."""
    return isinstance(e, Affine) and e.kind == "noop" and len(e.nodes) == 1 and \
        e.nodes[0].op_type in ("Add", "Sub", "Mul", "Div")


def per_channel(value: np.ndarray, rank: int, channels: int, on_channels: bool, axis: int = 1) -> np.ndarray:
    """A constant broadcast against a rank+2 tensor whose channels are on `axis`, as a vector over C."""
    value = np.asarray(value, np.float64)
    if on_channels:
        flat = value.reshape(-1)
    else:
        full = rank + 2
        if value.ndim > full:
            raise NotExact(f"a constant of shape {list(value.shape)} changes the tensor's rank", code="channels")
        shape = (1,) * (full - value.ndim) + value.shape
        if any(d != 1 for i, d in enumerate(shape) if i != axis):
            raise NotExact(f"a constant of shape {list(value.shape)} is not per-channel on axis {axis}", code="channels")
        flat = value.reshape(-1)
    if flat.size not in (1, channels):
        raise NotExact(f"a per-channel constant has {flat.size} values for {channels} channels", code="channels")
    return np.broadcast_to(flat, (channels,)).copy()


def evaluate(expr: Expr, ctx: Context):
    """The Diag or ConvMap that `expr` computes from ctx.source."""
    if isinstance(expr, (Leaf, Shared)) and expr.tensor == ctx.source:
        return Diag(np.ones(ctx.channels), np.zeros(ctx.channels), ctx.layout)
    if isinstance(expr, Shared):
        return evaluate(expr.input, ctx)   # whether its other consumers are inside the block is checked apart
    if isinstance(expr, Leaf):
        raise NotExact(f"a branch does not reach the block input: {expr.reason}", code="not_linear")
    if isinstance(expr, Regroup):
        return _evaluate_regroup(expr, ctx)
    if isinstance(expr, Scatter):
        return _evaluate_scatter(expr, ctx)
    if isinstance(expr, Transpose):
        inner = evaluate(expr.input, ctx)
        _not_regrouped(inner, expr)
        if len(expr.perm) != len(inner.layout):
            raise NotExact("a Transpose changes the tensor's rank", code="layout", nodes=_names(expr))
        return replace(inner, layout=compose(inner.layout, expr.perm))
    if isinstance(expr, Pad):
        return _evaluate_pad(expr, ctx)
    if isinstance(expr, Affine):
        return _evaluate_affine(expr, ctx)
    if isinstance(expr, Conv):
        return _evaluate_conv(expr, ctx)
    if isinstance(expr, AvgPool):
        return _evaluate_pool(expr, ctx)
    if isinstance(expr, Sum):
        return _evaluate_sum(expr, ctx)
    raise NotExact(f"unsupported term {type(expr).__name__}", code="not_linear")


def _channels(value, ctx) -> int:
    return value.out_channels if isinstance(value, ConvMap) else ctx.channels


def _evaluate_affine(expr: Affine, ctx: Context):
    if expr.problem:
        raise NotExact(expr.problem, code="operand", nodes=_names(expr))
    inner = evaluate(expr.input, ctx)
    if expr.kind == "noop":
        return inner
    if inner.writes is not None:
        _plain(inner, expr)
    channels = _channels(inner, ctx)
    # where the channels are: the layout's axis for C, or the last axis of a regrouped tensor
    axis, rank = (inner.regroup.rank - 1, inner.regroup.rank - 2) if inner.regroup else (inner.layout.index(1), ctx.rank)
    if expr.on_channels and axis != 1:
        raise NotExact("a BatchNormalization normalizes axis 1, which is not the channel axis here", code="layout", nodes=_names(expr))
    scale = np.ones(channels) if expr.scale is None else per_channel(expr.scale, rank, channels, expr.on_channels, axis)
    shift = np.zeros(channels) if expr.shift is None else per_channel(expr.shift, rank, channels, expr.on_channels, axis)
    border = None if inner.pads is None else inner.border * scale + shift
    if isinstance(inner, Diag):
        return Diag(inner.scale * scale, inner.shift * scale + shift, inner.layout, inner.pads, border)
    # every ConvMap kernel is the evaluation's own array (_apply_conv makes it): fold in place
    kernel, bias = kernels.fold_affine(inner.kernel, inner.bias, scale, shift, inplace=True)
    return replace(inner, kernel=kernel, bias=bias, border=border)


def _evaluate_regroup(expr: Regroup, ctx: Context):
    """A Flatten/Reshape keeping the last axis whole, after a map of the channels that does not
    look at positions (per-channel affine, 1×1 stride-1 unpadded conv) with the channels last:
    the map commutes with it. The output shape is proven once, for the whole block (evaluate_block)."""
    inner = evaluate(expr.input, ctx)
    name = _name(expr)
    _plain(replace(inner, regroup=None), expr)
    if inner.pads is not None or isinstance(inner, ConvMap) and not inner.geometry.is_pointwise:
        raise NotExact(f"{expr.nodes[0].op_type} '{name}' regroups positions after a map that mixes them", code="layout", nodes=_names(expr))
    if inner.regroup is None and inner.layout.index(1) != len(inner.layout) - 1:
        raise NotExact(f"{expr.nodes[0].op_type} '{name}' does not keep the channels on the last axis", code="layout", nodes=_names(expr))
    channels = _channels(inner, ctx)
    last = expr.target[-1] if expr.target else expr.like_dims[-1] if expr.like_dims else channels
    if last != channels or expr.target is not None and expr.target.count(-1) > 1:
        raise NotExact(f"{expr.nodes[0].op_type} '{name}' does not keep the {channels} channels as its last axis", code="channels", nodes=_names(expr))
    return replace(inner, regroup=expr)


def _evaluate_scatter(expr: Scatter, ctx: Context):
    """Slices of the padding overwritten with a per-channel value v. Once every slice of the
    padding ring (every padded index of every spatial axis, both sides) holds v, the padding is
    v: the ring is the union of those slices. Until then only more such writes may follow."""
    inner = evaluate(expr.input, ctx)
    name = _name(expr)
    if inner.pads is None or inner.regroup is not None:
        raise NotExact(f"ScatterND '{name}' writes into a tensor that is not padded", code="not_linear",
                       nodes=_names(expr))
    axis = inner.layout[expr.axis]   # the canonical axis the written slices run along
    spatial = _spatial(inner, ctx)
    if axis < 2 or spatial is None or spatial[axis - 2] is None:
        raise NotExact(f"ScatterND '{name}' writes slices of {'a non-spatial axis' if axis < 2 else 'a dynamic axis'}",
                       code="border", nodes=_names(expr))
    channels = _channels(inner, ctx)
    value, c_axis = expr.value, inner.layout.index(1)
    for a in range(value.ndim):   # constant along every axis but the channels': per channel
        if a != c_axis and value.shape[a] != 1:
            if not np.all(value == value.take([0], axis=a)):
                raise NotExact(f"ScatterND '{name}' writes values that are not one per channel", code="border",
                               nodes=_names(expr))
            value = value.take([0], axis=a)
    if value.size not in (1, channels):
        raise NotExact(f"ScatterND '{name}' writes {value.size} values for {channels} channels", code="channels",
                       nodes=_names(expr))
    v = np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)
    length, (begin, end) = spatial[axis - 2], (inner.pads[0][axis - 2], inner.pads[1][axis - 2])
    writes = dict(inner.writes or {})
    for row in expr.rows:
        row = row + length if row < 0 else row
        if begin <= row < length - end or not 0 <= row < length:
            raise NotExact(f"ScatterND '{name}' writes index {row} of a padded axis of length {length}, "
                           f"outside its padding", code="border", nodes=_names(expr))
        writes[(axis, row)] = v
    padded = [a for a in range(len(spatial)) if inner.pads[0][a] or inner.pads[1][a]]
    if any(spatial[a] is None for a in padded):   # its slices cannot be written: the ring never is
        return replace(inner, writes=writes)
    ring = {(a + 2, i) for a in padded for i in range(spatial[a])
            if i < inner.pads[0][a] or i >= spatial[a] - inner.pads[1][a]}
    if set(writes) != ring:
        return replace(inner, writes=writes)
    values = list(writes.values())
    if not all(_same_values(values[0], other, ctx.eps) for other in values[1:]):
        raise NotExact(f"ScatterND '{name}' leaves a padding of several values", code="border", nodes=_names(expr))
    return replace(inner, border=values[0], writes=None)


def _plain(inner, expr: Expr) -> None:
    """Ops other than Transpose need a padding written whole (or not at all) and no regrouping."""
    if inner.writes is not None:
        raise NotExact(f"{expr.nodes[0].op_type if expr.nodes else 'an op'} '{_name(expr)}' reads a padding that "
                       f"is written only in part", code="border", nodes=_names(expr))
    _not_regrouped(inner, expr)


def _not_regrouped(inner, expr: Expr) -> None:
    if inner.regroup is not None:
        raise NotExact(f"{expr.nodes[0].op_type if expr.nodes else 'an op'} '{_name(expr)}' after a Flatten/Reshape "
                       f"(only per-channel ops pass through one)", code="layout", nodes=_names(expr))


def output_shape_kept(value, ctx: Context, dims: Optional[Sequence[Optional[int]]]) -> Optional[NotExact]:
    """None when a regrouped block's output has the shape its input has with C_out channels
    (what one Linear writes); otherwise why that is not proven. `dims`: the input's, as guaranteed."""
    regroup = value.regroup
    if regroup is None:
        return None
    expected = None if dims is None else tuple(dims[:-1]) + (_channels(value, ctx),)
    if regroup.like is not None:
        if before_any_regroup(regroup.input, regroup.like, ctx.source):
            return None   # the Shape of a tensor of this chain before any regrouping: the output's own
    elif regroup.target is not None and expected is not None and len(regroup.target) == len(expected):
        inferred = [i for i, d in enumerate(regroup.target) if d == -1]
        if all(d == e for d, e in zip(regroup.target, expected) if d != -1) and \
                all(e is not None for i, e in enumerate(expected) if i not in inferred):
            return None   # every dim given and equal, the one -1 takes what is left: the input's dim
    elif regroup.target is None and expected is not None and len(expected) == 2:
        return None       # Flatten of [N, C]: nothing moves
    return NotExact(f"{regroup.nodes[0].op_type} '{_name(regroup)}' is not proven to restore the block input's shape",
                    code="shape", nodes=_names(regroup))


def trailing_reshape(value, ctx: Context) -> Optional[tuple]:
    """The shape a regrouped block's one Linear is reshaped to when the block does not restore
    its input's shape (the dynamo exporter's Linear → view(-1, C) → BatchNorm1d): the last
    regrouping's constant target (channels last, no 0, at most one -1), [-1, C] for a Flatten,
    or the guaranteed dims of a Shape it reads. Exact: each regrouping keeps the channel axis
    whole, the per-channel map commutes with it, and reshapes in a row are the last one."""
    regroup = value.regroup
    if regroup.target is not None:
        return regroup.target
    if regroup.like is None:
        return (-1, _channels(value, ctx))
    if regroup.like_dims and all(isinstance(d, int) and d > 0 for d in regroup.like_dims):
        return tuple(regroup.like_dims)
    return None


def _evaluate_pad(expr: Pad, ctx: Context):
    if expr.problem:
        raise NotExact(expr.problem, code="operand", nodes=_names(expr))
    inner = evaluate(expr.input, ctx)
    _plain(inner, expr)
    if len(expr.pads) != len(inner.layout):
        raise NotExact("a Pad of a different rank", code="layout", nodes=_names(expr))
    # actual axis i is canonical axis layout[i]
    canonical = {inner.layout[i]: pair for i, pair in enumerate(expr.pads)}
    if canonical.get(0, (0, 0)) != (0, 0) or canonical.get(1, (0, 0)) != (0, 0):
        raise NotExact("a Pad on the batch or channel axis", code="layout", nodes=_names(expr))
    begin = tuple(canonical[a][0] for a in range(2, ctx.rank + 2))
    end = tuple(canonical[a][1] for a in range(2, ctx.rank + 2))
    border = np.full(_channels(inner, ctx), expr.value)
    if inner.pads is not None:
        if not _same_values(inner.border, border, ctx.eps):
            raise NotExact(f"Pad '{_name(expr)}' pads with {expr.value:g} around a padding of other values", code="border", nodes=_names(expr))
        begin = tuple(a + b for a, b in zip(begin, inner.pads[0]))
        end = tuple(a + b for a, b in zip(end, inner.pads[1]))
    return replace(inner, pads=(begin, end), border=border)


def _name(expr: Expr) -> str:
    return expr.nodes[0].name if expr.nodes and expr.nodes[0].name else expr.tensor


def _same_values(a: np.ndarray, b: np.ndarray, eps: float) -> bool:
    """Equal up to the rounding of a value stored in the model's dtype (an exporter computes a
    padding value from the BN parameters in float32; the engine computes it in float64)."""
    scale = float(np.max(np.abs(a), initial=0.0) + np.max(np.abs(b), initial=0.0))
    return bool(np.all(np.abs(a - b) <= 16 * eps * scale))


def _evaluate_conv(expr: Conv, ctx: Context):
    if expr.problem:
        raise NotExact(expr.problem, code="operand", nodes=_names(expr))
    weight = np.asarray(expr.weight)
    bias = None if expr.bias is None else np.asarray(expr.bias, np.float64).reshape(-1)
    return _apply_conv(expr, weight, bias, expr.attrs, expr.group, evaluate(expr.input, ctx), ctx)


def _evaluate_pool(expr: AvgPool, ctx: Context):
    """AveragePool: the depthwise conv average_kernel; its own padding must count in the average."""
    if expr.problem:
        raise NotExact(expr.problem, code="operand", nodes=_names(expr))
    inner = evaluate(expr.input, ctx)
    channels = _channels(inner, ctx)
    weight = kernels.average_kernel(channels, expr.kernel)
    attrs = {k: v for k, v in expr.attrs.items() if k in ("kernel_shape", "strides", "pads", "auto_pad", "dilations")}
    if not expr.attrs.get("count_include_pad", 0):
        try:
            own = conv_geometry(attrs, expr.kernel, _spatial(inner, ctx))
        except GeometryError as exc:
            raise NotExact(f"AveragePool '{_name(expr)}': {exc}", code=exc.code, nodes=_names(expr)) from None
        if not own.unpadded:
            raise NotExact(f"AveragePool '{_name(expr)}' pads but leaves the padding out of its average "
                           f"(count_include_pad=0): not a convolution at the borders", code="border", nodes=_names(expr))
    return _apply_conv(expr, weight, None, attrs, channels, inner, ctx)


def _spatial(value, ctx: Context) -> Optional[List[Optional[int]]]:
    """The static canonical spatial size of a value (after its padding), where known."""
    if ctx.spatial is None:
        return None
    size = list(ctx.spatial)
    if isinstance(value, ConvMap):
        size = [None if n is None else value.geometry.out_size(a, n) for a, n in enumerate(size)]
    if value.pads is not None:
        size = [None if n is None else n + b + e for n, b, e in zip(size, *value.pads)]
    return size


def _apply_conv(expr: Expr, weight: np.ndarray, bias: Optional[np.ndarray], attrs: dict, group: int, inner, ctx: Context):
    """conv(inner) as one map of the block input. The padding of `inner` and the conv's own padding
    (zeros) move before `inner`'s map, where a padded position is zero and the map gives it at_zero():
    exact when that is the padding value (the border for a Pad, zero for the conv's own)."""
    name = _name(expr)
    _plain(inner, expr)
    if weight.ndim - 2 != ctx.rank:
        raise NotExact(f"{expr.nodes[0].op_type} '{name}' has a different spatial rank than the block", code="geometry", nodes=_names(expr))
    if inner.layout != ctx.canonical:
        raise NotExact(f"{expr.nodes[0].op_type} '{name}' reads its input in another layout than the block's other convs", code="layout", nodes=_names(expr))
    channels = _channels(inner, ctx)
    if weight.shape[1] * group != channels or weight.shape[0] % group:
        raise NotExact(f"Conv '{name}' weight {list(weight.shape)} with group {group} does not fit {channels} input channels", code="channels", nodes=_names(expr))
    try:
        geometry = conv_geometry(attrs, weight.shape[2:], _spatial(inner, ctx))
    except GeometryError as exc:
        raise NotExact(f"{expr.nodes[0].op_type} '{name}': {exc}", code=exc.code, nodes=_names(expr)) from None
    bias = np.zeros(weight.shape[0]) if bias is None else bias
    if bias.shape != (weight.shape[0],):
        raise NotExact(f"Conv '{name}' bias has {bias.size} values for {weight.shape[0]} channels", code="channels", nodes=_names(expr))
    at_zero = inner.at_zero()   # None: a conv that is not pointwise; geometry.compose says why it cannot
    if not geometry.unpadded and at_zero is not None and np.any(at_zero):
        what = "per-channel shift" if isinstance(inner, Diag) else "conv with a bias"
        raise NotExact(f"a {what} before the padded {expr.nodes[0].op_type} '{name}' is not exact at the borders", code="border", nodes=_names(expr))
    if inner.pads is not None:
        if at_zero is not None and not _same_values(at_zero, inner.border, ctx.eps):
            raise NotExact(f"the padding before {expr.nodes[0].op_type} '{name}' is not the value its input has "
                           f"at a padded position (zero padding after a bias is not exact at the borders)", code="border", nodes=_names(expr))
        # the Pad before the conv becomes the conv's own padding
        geometry = replace(geometry, pads_begin=tuple(a + b for a, b in zip(geometry.pads_begin, inner.pads[0])),
                           pads_end=tuple(a + b for a, b in zip(geometry.pads_end, inner.pads[1])))
    if isinstance(inner, ConvMap):
        return _compose(name, weight, bias, group, geometry, inner, ctx)
    # the block input itself (scale 1) is the common case: no pass over the weight for it
    if np.all(inner.scale == 1):
        kernel = np.array(weight, np.float64)   # a copy, always: later folds scale it in place
    else:
        kernel = kernels.scale_input_channels(np.asarray(weight, np.float64), inner.scale, group)
    if np.any(inner.shift):
        bias = bias + kernels.bias_of_input_shift(np.asarray(weight, np.float64), inner.shift, group)
    return ConvMap(kernel, bias, geometry, group, ctx.canonical)


def _compose(name: str, weight: np.ndarray, bias: np.ndarray, group: int, geometry: ConvGeometry,
             inner: ConvMap, ctx: Context) -> ConvMap:
    """A conv after a conv: one conv (geometry.compose, kernels.compose_kernels); the inner
    bias passes through the outer kernel (exact: every position the outer conv reads holds it)."""
    try:
        composition = compose_geometry(inner.geometry, geometry)
    except GeometryError as exc:
        raise NotExact(f"'{name}' after a conv: {exc}", code=exc.code) from None
    size = composition.geometry.kernel
    merged_group = math.gcd(group, inner.group)
    merged = weight.shape[0] * (ctx.channels // merged_group) * math.prod(size)
    _check_size(merged, size)
    _check_early(ctx, merged_group, size)
    weight = np.asarray(weight, np.float64)
    kernel, merged_group = kernels.compose_kernels(weight, group, inner.kernel, inner.group, composition.steps,
                                                   composition.inner_factors, size)
    bias = bias + kernels.bias_of_input_shift(weight, inner.bias, group)
    return ConvMap(kernel, bias, composition.geometry, merged_group, ctx.canonical)


def _signed_terms(expr: Sum, sign: float = 1.0) -> List[Tuple[float, Expr]]:
    """The terms of nested sums (through no-op Identity/Cast), with their signs: aligned as one bag."""
    return _flatten(expr, sign)[0]


def _flatten(expr: Sum, sign: float = 1.0) -> Tuple[List[Tuple[float, Expr]], List[Tuple[float, np.ndarray]]]:
    """(signed terms, signed constant operands) of nested sums, through no-op Identity/Cast."""
    terms, shifts = [], ([(sign, expr.shift)] if expr.shift is not None else [])
    for s, term in expr.terms:
        inner = term
        while isinstance(inner, Affine) and inner.kind == "noop" and not inner.problem:
            inner = inner.input
        if isinstance(inner, Sum):
            more, constants = _flatten(inner, sign * s)
            terms.extend(more)
            shifts.extend(constants)
        else:
            terms.append((sign * s, term))
    return terms, shifts


def bag_sums(expr: Sum) -> List[Sum]:
    """The nested sums (through no-op Identity/Cast) that _flatten makes one bag with `expr`."""
    out = []
    for _, term in expr.terms:
        while isinstance(term, Affine) and term.kind == "noop" and not term.problem:
            term = term.input
        if isinstance(term, Sum):
            out.append(term)
            out.extend(bag_sums(term))
    return out


def _evaluate_sum(expr: Sum, ctx: Context):
    signed, shifts = _flatten(expr)
    value = _sum_terms([(sign, evaluate(term, ctx)) for sign, term in signed], ctx)
    if not shifts:
        return value
    channels = _channels(value, ctx)
    axis = value.layout.index(1)
    shift = sum(s * per_channel(c, ctx.rank, channels, False, axis) for s, c in shifts)
    if isinstance(value, Diag):
        return Diag(value.scale, value.shift + shift, value.layout, value.pads)
    return ConvMap(value.kernel, value.bias + shift, value.geometry, value.group, value.layout)


def _sum_terms(values, ctx: Context):
    """Σ sign·value: Diags add up; with a conv, every term becomes a kernel placed in one."""
    for _, v in values:
        if v.regroup is not None or v.writes is not None:
            raise NotExact("a Flatten/Reshape, or a padding written in part, inside a branch of a sum", code="layout")
    layouts = {v.layout for _, v in values}
    if len(layouts) != 1:
        raise NotExact("the branches are summed in different layouts", code="layout")
    layout = layouts.pop()
    if any(v.pads is not None for _, v in values):
        raise NotExact("a padded branch is summed without a conv after it", code="border")
    if all(isinstance(v, Diag) for _, v in values):
        return Diag(sum(s * v.scale for s, v in values), sum(s * v.shift for s, v in values), layout)
    convs = [v for _, v in values if isinstance(v, ConvMap)]
    out_channels = {c.out_channels for c in convs}
    if len(out_channels) != 1:
        raise NotExact(f"branches have different output channels {sorted(out_channels)}", code="channels")
    out = out_channels.pop()
    group = kernels.common_group([c.group for c in convs])
    maps: List[Tuple[float, ConvMap]] = []
    for sign, value in values:
        if isinstance(value, Diag):
            if out != ctx.channels:
                raise NotExact(f"an identity branch needs as many output as input channels ({out} vs {ctx.channels})", code="channels")
            identity = kernels.identity_kernel(ctx.channels, group, ctx.rank)
            kernel, bias = kernels.fold_affine(identity, np.zeros(out), value.scale, value.shift)
            value = ConvMap(kernel, bias, ConvGeometry.pointwise(ctx.rank), group)
        maps.append((sign, value))
    try:
        alignment = align([m.geometry for _, m in maps], ctx.spatial)
    except GeometryError as exc:
        raise NotExact(str(exc), code=exc.code) from None
    size = alignment.geometry.kernel
    _check_size(out * (ctx.channels // group) * math.prod(size), size)
    total = np.zeros((out, ctx.channels // group) + size)
    bias = np.zeros(out)
    for (sign, m), factors, offsets in zip(maps, alignment.dilation_factors, alignment.offsets):
        kernel = kernels.expand_groups(m.kernel, m.group, group)
        kernel = kernels.dilate_kernel(kernel, factors)
        kernels.add_placed(total, kernel, offsets, sign)
        bias += sign * m.bias
    return ConvMap(total, bias, alignment.geometry, group, layout)


def evaluate_block(expr: Expr, ctx: Context) -> ConvMap:
    """The one conv a block computes, when it costs no more than the block (_check_cost).

    A Reshape to a constant shape that ends a block of a Linear (a pointwise map with the
    channels last) is written after the Linear whatever it does to the channels (the dynamo
    exporter's view of a Linear → BatchNorm1d straight into heads): reshapes in a row are the last
    one, so the map need not commute with it."""
    ctx = replace(ctx, budget=(block_weights(expr, ctx), block_out_channels(expr, ctx)))
    try:
        value = evaluate(expr, ctx)
    except TooCostly:
        raise
    except NotExact:
        if not (isinstance(expr, Regroup) and expr.target is not None):
            raise
        inner = evaluate(expr.input, ctx)
        if not (isinstance(inner, ConvMap) and inner.geometry.is_pointwise and inner.pads is None and
                inner.writes is None and (inner.regroup is not None or inner.layout.index(1) == len(inner.layout) - 1)):
            raise
        value = replace(inner, reshape=expr.target)
    if not isinstance(value, ConvMap):
        raise NotExact("the block has no conv", code="not_linear")
    if value.pads is not None or value.writes is not None:   # one conv cannot end in a padding
        raise NotExact("the block ends in a padding after its last conv", code="border")
    _check_cost(value, ctx.budget[0], ctx)
    return value


def block_weights(expr: Expr, ctx: Context) -> int:
    """The weights of every conv of the block, and of every pool as the depthwise conv it is."""
    total = 0
    for e in block_exprs(expr, ctx.source):
        if isinstance(e, Conv) and e.weight is not None:
            total += int(np.size(e.weight))
        elif isinstance(e, AvgPool):
            total += math.prod(e.kernel) * _channels_in(e, ctx)
    return total


def _channels_in(expr: Expr, ctx: Context) -> int:
    """The channels an op reads: those of the conv below it, or the block input's."""
    e = expr.input
    while isinstance(e, (Affine, Transpose, Pad, AvgPool, Shared)) and e.tensor != ctx.source:
        e = e.input
    return int(e.weight.shape[0]) if isinstance(e, Conv) and e.weight is not None else ctx.channels


def _check_size(merged: int, size: Sequence[int]) -> None:
    """No kernel is ever allocated with more than MAX_MERGED_WEIGHTS (coprime dilations can ask
    for huge kernels); checked before it is."""
    if merged > MAX_MERGED_WEIGHTS:
        shape = "×".join(map(str, size))
        raise TooCostly(f"the merged {shape} conv would have {merged:,} weights, over the limit of {MAX_MERGED_WEIGHTS:,}")


def _check_early(ctx: Context, group: int, size: Sequence[int]) -> None:
    """Refuse a costly merge before composing its kernel (a 7×7 depthwise before a 1×1 to 4C is
    a dense 7×7 of 4C·C·49 weights, seconds and gigabytes to compute). Later ops only grow the
    kernel and lower the group, and the block's output channels are known: the merged conv has
    at least out · C/group · ∏size weights."""
    if ctx.budget is None or ctx.allow_larger:
        return
    branches, out = ctx.budget
    least = out * (ctx.channels // group) * math.prod(size)
    if least > branches:
        shape = "×".join(map(str, size))
        raise TooCostly(f"merging would cost more: the merged conv (at least {shape}) would have at least {least:,} "
                        f"weights and multiply-adds per output position, against {branches:,} for what it replaces "
                        f"(×{least / max(branches, 1):.1f}; --allow-larger merges it anyway)")


def block_out_channels(expr: Expr, ctx: Context) -> int:
    """The channels a block writes: its outermost conv's outputs (pools, affine and layout ops
    keep them), or its input's."""
    e = expr
    while True:
        if isinstance(e, Sum):
            e = e.terms[0][1]
        elif isinstance(e, Conv) and e.weight is not None:
            return int(np.shape(e.weight)[0])
        elif isinstance(e, (Leaf, Shared)) and e.tensor == ctx.source or getattr(e, "input", None) is None:
            return ctx.channels
        else:
            e = e.input


def _check_cost(value: ConvMap, branches: int, ctx: Context) -> None:
    """The merged conv may not have more weights than the convs (and pools) it replaces
    together, unless allowed. On the merged conv's output grid its weights are its
    multiply-adds per output position, and every op it replaces runs at least once per output
    position, so this bounds the multiply-adds as well as the parameters."""
    merged = value.kernel.size
    shape = "×".join(map(str, value.geometry.kernel))
    if merged > branches and not ctx.allow_larger:
        raise TooCostly(f"merging would cost more: the merged {shape} conv would have {merged:,} weights and multiply-adds "
                        f"per output position, against {branches:,} for what it replaces "
                        f"(×{merged / max(branches, 1):.1f}; --allow-larger merges it anyway)")


def cut(expr: Expr, tensor: str) -> Expr:
    """The tree with the sub-expression that computes `tensor` replaced by a Leaf."""
    if expr.tensor == tensor and not isinstance(expr, (Leaf, Shared)):
        return Leaf(tensor, reason="")
    if isinstance(expr, Sum):
        return replace(expr, terms=[(s, cut(t, tensor)) for s, t in expr.terms])
    if getattr(expr, "input", None) is not None:
        return replace(expr, input=cut(expr.input, tensor))
    return expr
