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
from .terms import Affine, Conv, Expr, Leaf, Pad, Shared, Sum, Transpose, block_exprs


MAX_MERGED_WEIGHTS = 1 << 26   # a merged kernel is never larger than this, even when asked


class NotExact(Exception):
    """The block cannot be rewritten as one conv exactly; the message says why."""


@dataclass
class Diag:
    """y[c] = scale[c]·x[c] + shift[c], then zero-padded by `pads` (canonical spatial axes)."""
    scale: np.ndarray
    shift: np.ndarray
    layout: tuple = ()
    pads: Optional[Tuple[tuple, tuple]] = None     # (begin per spatial axis, end per spatial axis)


@dataclass
class ConvMap:
    """y = conv(x, kernel, groups=group, geometry) + bias."""
    kernel: np.ndarray
    bias: np.ndarray
    geometry: ConvGeometry
    group: int
    layout: tuple = ()

    @property
    def out_channels(self) -> int:
        return self.kernel.shape[0]


@dataclass
class Context:
    source: str                         # the block input tensor
    channels: int                       # C of the block input
    rank: int                           # spatial rank
    spatial: Optional[Sequence[Optional[int]]]   # static canonical spatial size of the block input (None: unknown)
    layout: tuple = ()                  # how the block input is laid out (identity: N, C, spatial...)
    allow_larger: bool = False          # merge even when the merged conv costs more than its branches

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
    for conv in (e for e in block_exprs(expr, source) if isinstance(e, Conv)):
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
                    raise NotExact("a Transpose changes the tensor's rank")
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
        below = below_conv or isinstance(e, Conv)
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
    return best if _affine_above_conv(expr) else None


def _affine_above_conv(expr: Expr) -> bool:
    """A chain is a block when a real (not no-op) affine op follows its conv."""
    seen_affine = False
    while isinstance(expr, (Affine, Transpose)):   # not through a Shared tensor: a chain has one path
        seen_affine = seen_affine or (isinstance(expr, Affine) and expr.kind != "noop")
        expr = expr.input
    return seen_affine and isinstance(expr, Conv)


def per_channel(value: np.ndarray, rank: int, channels: int, on_channels: bool, axis: int = 1) -> np.ndarray:
    """A constant broadcast against a rank+2 tensor whose channels are on `axis`, as a vector over C."""
    value = np.asarray(value, np.float64)
    if on_channels:
        flat = value.reshape(-1)
    else:
        full = rank + 2
        if value.ndim > full:
            raise NotExact(f"a constant of shape {list(value.shape)} changes the tensor's rank")
        shape = (1,) * (full - value.ndim) + value.shape
        if any(d != 1 for i, d in enumerate(shape) if i != axis):
            raise NotExact(f"a constant of shape {list(value.shape)} is not per-channel on axis {axis}")
        flat = value.reshape(-1)
    if flat.size not in (1, channels):
        raise NotExact(f"a per-channel constant has {flat.size} values for {channels} channels")
    return np.broadcast_to(flat, (channels,)).copy()


def evaluate(expr: Expr, ctx: Context):
    """The Diag or ConvMap that `expr` computes from ctx.source."""
    if isinstance(expr, (Leaf, Shared)) and expr.tensor == ctx.source:
        return Diag(np.ones(ctx.channels), np.zeros(ctx.channels), ctx.layout)
    if isinstance(expr, Shared):
        return evaluate(expr.input, ctx)   # whether its other consumers are inside the block is checked apart
    if isinstance(expr, Leaf):
        raise NotExact(f"a branch does not reach the block input: {expr.reason}")
    if isinstance(expr, Transpose):
        inner = evaluate(expr.input, ctx)
        if len(expr.perm) != len(inner.layout):
            raise NotExact("a Transpose changes the tensor's rank")
        layout = compose(inner.layout, expr.perm)
        if isinstance(inner, Diag):
            return Diag(inner.scale, inner.shift, layout, inner.pads)
        return ConvMap(inner.kernel, inner.bias, inner.geometry, inner.group, layout)
    if isinstance(expr, Pad):
        return _evaluate_pad(expr, ctx)
    if isinstance(expr, Affine):
        return _evaluate_affine(expr, ctx)
    if isinstance(expr, Conv):
        return _evaluate_conv(expr, ctx)
    if isinstance(expr, Sum):
        return _evaluate_sum(expr, ctx)
    raise NotExact(f"unsupported term {type(expr).__name__}")


def _channels(value, ctx) -> int:
    return value.out_channels if isinstance(value, ConvMap) else ctx.channels


def _evaluate_affine(expr: Affine, ctx: Context):
    if expr.problem:
        raise NotExact(expr.problem)
    inner = evaluate(expr.input, ctx)
    if expr.kind == "noop":
        return inner
    channels = _channels(inner, ctx)
    if expr.on_channels and inner.layout.index(1) != 1:
        raise NotExact("a BatchNormalization normalizes axis 1, which is not the channel axis here")
    axis = inner.layout.index(1)
    scale = np.ones(channels) if expr.scale is None else per_channel(expr.scale, ctx.rank, channels, expr.on_channels, axis)
    shift = np.zeros(channels) if expr.shift is None else per_channel(expr.shift, ctx.rank, channels, expr.on_channels, axis)
    if isinstance(inner, Diag):
        if inner.pads is not None and np.any(shift):
            raise NotExact("a per-channel shift after zero padding is not exact at the borders")
        return Diag(inner.scale * scale, inner.shift * scale + shift, inner.layout, inner.pads)
    # every ConvMap kernel is the evaluation's own array (_evaluate_conv copies the weight): fold in place
    kernel, bias = kernels.fold_affine(inner.kernel, inner.bias, scale, shift, inplace=True)
    return ConvMap(kernel, bias, inner.geometry, inner.group, inner.layout)


def _evaluate_pad(expr: Pad, ctx: Context):
    if expr.problem:
        raise NotExact(expr.problem)
    inner = evaluate(expr.input, ctx)
    if isinstance(inner, ConvMap):
        raise NotExact("zero padding after a conv inside a branch is not supported")
    if len(expr.pads) != len(inner.layout):
        raise NotExact("a Pad of a different rank")
    # actual axis i is canonical axis layout[i]
    canonical = {inner.layout[i]: pair for i, pair in enumerate(expr.pads)}
    if canonical.get(0, (0, 0)) != (0, 0) or canonical.get(1, (0, 0)) != (0, 0):
        raise NotExact("a Pad on the batch or channel axis")
    begin = tuple(canonical[a][0] for a in range(2, ctx.rank + 2))
    end = tuple(canonical[a][1] for a in range(2, ctx.rank + 2))
    if inner.pads is not None:
        begin = tuple(a + b for a, b in zip(begin, inner.pads[0]))
        end = tuple(a + b for a, b in zip(end, inner.pads[1]))
    return Diag(inner.scale, inner.shift, inner.layout, (begin, end))


def _evaluate_conv(expr: Conv, ctx: Context):
    name = expr.nodes[0].name if expr.nodes else expr.tensor
    if expr.problem:
        raise NotExact(expr.problem)
    weight = np.array(expr.weight, np.float64)   # a copy, always: later folds scale it in place
    if weight.ndim - 2 != ctx.rank:
        raise NotExact(f"Conv '{name}' has a different spatial rank than the block")
    group = expr.group
    inner = evaluate(expr.input, ctx)
    if isinstance(inner, ConvMap):
        raise NotExact(f"Conv '{name}' follows another conv inside a branch (sequential branches are not supported yet)")
    if inner.layout != ctx.canonical:
        raise NotExact(f"Conv '{name}' reads its input in another layout than the block's other convs")
    if weight.shape[1] * group != ctx.channels or weight.shape[0] % group:
        raise NotExact(f"Conv '{name}' weight {list(weight.shape)} with group {group} does not fit {ctx.channels} input channels")
    spatial = ctx.spatial
    if inner.pads is not None and spatial is not None:
        spatial = [None if n is None else n + b + e for n, b, e in zip(spatial, *inner.pads)]
    try:
        geometry = conv_geometry(expr.attrs, weight.shape[2:], spatial)
    except GeometryError as exc:
        raise NotExact(f"Conv '{name}': {exc}") from None
    if inner.pads is not None:
        # the Pad before the conv becomes the conv's own padding
        geometry = ConvGeometry(geometry.kernel, geometry.strides,
                                tuple(a + b for a, b in zip(geometry.pads_begin, inner.pads[0])),
                                tuple(a + b for a, b in zip(geometry.pads_end, inner.pads[1])), geometry.dilations)
    bias = np.zeros(weight.shape[0]) if expr.bias is None else np.asarray(expr.bias, np.float64).reshape(-1)
    if bias.shape != (weight.shape[0],):
        raise NotExact(f"Conv '{name}' bias has {bias.size} values for {weight.shape[0]} channels")
    # the block input itself (scale 1) is the common case: no pass over the weight for it
    kernel = weight if np.all(inner.scale == 1) else kernels.scale_input_channels(weight, inner.scale, group)
    if np.any(inner.shift):
        if not geometry.unpadded:
            raise NotExact(f"a per-channel shift before the padded Conv '{name}' is not exact at the borders")
        bias = bias + kernels.bias_of_input_shift(weight, inner.shift, group)
    return ConvMap(kernel, bias, geometry, group, ctx.canonical)


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
    layouts = {v.layout for _, v in values}
    if len(layouts) != 1:
        raise NotExact("the branches are summed in different layouts")
    layout = layouts.pop()
    if any(isinstance(v, Diag) and v.pads is not None for _, v in values):
        raise NotExact("a zero-padded branch is summed without a conv")
    if all(isinstance(v, Diag) for _, v in values):
        return Diag(sum(s * v.scale for s, v in values), sum(s * v.shift for s, v in values), layout)
    convs = [v for _, v in values if isinstance(v, ConvMap)]
    out_channels = {c.out_channels for c in convs}
    if len(out_channels) != 1:
        raise NotExact(f"branches have different output channels {sorted(out_channels)}")
    out = out_channels.pop()
    group = kernels.common_group([c.group for c in convs])
    maps: List[Tuple[float, ConvMap]] = []
    for sign, value in values:
        if isinstance(value, Diag):
            if out != ctx.channels:
                raise NotExact(f"an identity branch needs as many output as input channels ({out} vs {ctx.channels})")
            identity = kernels.identity_kernel(ctx.channels, group, ctx.rank)
            kernel, bias = kernels.fold_affine(identity, np.zeros(out), value.scale, value.shift)
            value = ConvMap(kernel, bias, ConvGeometry.pointwise(ctx.rank), group)
        maps.append((sign, value))
    try:
        alignment = align([m.geometry for _, m in maps], ctx.spatial)
    except GeometryError as exc:
        raise NotExact(str(exc)) from None
    size = alignment.geometry.kernel
    _check_cost(out * (ctx.channels // group) * math.prod(size), sum(c.kernel.size for c in convs), size, ctx)
    total = np.zeros((out, ctx.channels // group) + size)
    bias = np.zeros(out)
    for (sign, m), factors, offsets in zip(maps, alignment.dilation_factors, alignment.offsets):
        kernel = kernels.expand_groups(m.kernel, m.group, group)
        kernel = kernels.dilate_kernel(kernel, factors)
        kernels.add_placed(total, kernel, offsets, sign)
        bias += sign * m.bias
    return ConvMap(total, bias, alignment.geometry, group, layout)


def _check_cost(merged: int, branches: int, size: Sequence[int], ctx: Context) -> None:
    """The merged conv may not have more weights than its conv branches together (on one
    output grid, weights are the multiply-adds per output position), unless allowed;
    and never more than MAX_MERGED_WEIGHTS (coprime dilations can ask for huge kernels)."""
    shape = "×".join(map(str, size))
    if merged > MAX_MERGED_WEIGHTS:
        raise NotExact(f"the merged {shape} conv would have {merged:,} weights, over the limit of "
                       f"{MAX_MERGED_WEIGHTS:,} (its branches have {branches:,})")
    if merged > branches and not ctx.allow_larger:
        raise NotExact(f"the merged {shape} conv would cost more than its branches: {merged:,} weights and "
                       f"multiply-adds per output position against {branches:,} (×{merged / max(branches, 1):.1f}; "
                       f"--allow-larger merges it anyway)")


def cut(expr: Expr, tensor: str) -> Expr:
    """The tree with the sub-expression that computes `tensor` replaced by a Leaf."""
    if expr.tensor == tensor and not isinstance(expr, (Leaf, Shared)):
        return Leaf(tensor, reason="")
    if isinstance(expr, Sum):
        return replace(expr, terms=[(s, cut(t, tensor)) for s, t in expr.terms])
    if getattr(expr, "input", None) is not None:
        return replace(expr, input=cut(expr.input, tensor))
    return expr
