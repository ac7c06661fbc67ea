"""Linear expression tree → one convolution, exactly, or NotExact(reason).

The tree (terms.py) is evaluated bottom-up relative to the block input x. Every
sub-expression is either a per-channel affine map of x (Diag) or a convolution of x
(ConvMap); both are kept in float64. Sums align their branches with
geometry.align and add the placed kernels.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import kernels
from .geometry import ConvGeometry, GeometryError, align, conv_geometry
from .terms import Affine, Conv, Expr, Leaf, Shared, Sum, walk_expr


class NotExact(Exception):
    """The block cannot be rewritten as one conv exactly; the message says why."""


@dataclass
class Diag:
    """y[c] = scale[c]·x[c] + shift[c]."""
    scale: np.ndarray
    shift: np.ndarray


@dataclass
class ConvMap:
    """y = conv(x, kernel, groups=group, geometry) + bias."""
    kernel: np.ndarray
    bias: np.ndarray
    geometry: ConvGeometry
    group: int

    @property
    def out_channels(self) -> int:
        return self.kernel.shape[0]


@dataclass
class Context:
    source: str                         # the block input tensor
    channels: int                       # C of the block input
    rank: int                           # spatial rank
    spatial: Optional[Sequence[Optional[int]]]   # static spatial size of the block input, None per unknown axis


def top_terms(expr: Expr) -> Tuple[List[Expr], bool]:
    """The terms of the block's sum (nested sums flattened) and whether there is a sum at all."""
    core = expr
    while isinstance(core, Affine):
        core = core.input
    if not isinstance(core, Sum):
        return [expr], False
    def flatten(s: Sum) -> List[Expr]:
        return [x for _, t in s.terms for x in (flatten(t) if isinstance(t, Sum) else [t])]
    return flatten(core), True


def _reachable(term: Expr) -> Dict[str, Tuple[int, bool]]:
    """Tensors where the walk stopped or was shared below `term`: name → (depth, below a Conv)."""
    found: Dict[str, Tuple[int, bool]] = {}
    stack = [(term, 0, False)]
    seen = set()
    while stack:
        e, depth, below_conv = stack.pop()
        if (id(e), below_conv) in seen:
            continue
        seen.add((id(e), below_conv))
        if isinstance(e, (Leaf, Shared)):
            d, c = found.get(e.tensor, (depth, False))
            found[e.tensor] = (min(d, depth), c or below_conv)
        below = below_conv or isinstance(e, Conv)
        stack.extend((child, depth + 1, below) for child in e.children())
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
    return best if isinstance(expr, Affine) else None


def per_channel(value: np.ndarray, rank: int, channels: int, on_channels: bool) -> np.ndarray:
    """A constant broadcast against an (N, C, *spatial) tensor as a vector over C, or NotExact."""
    value = np.asarray(value, np.float64)
    if on_channels:
        flat = value.reshape(-1)
    else:
        full = rank + 2
        if value.ndim > full:
            raise NotExact(f"a constant of shape {list(value.shape)} changes the tensor's rank")
        shape = (1,) * (full - value.ndim) + value.shape
        if any(d != 1 for i, d in enumerate(shape) if i != 1):
            raise NotExact(f"a constant of shape {list(value.shape)} is not per-channel on axis 1")
        flat = value.reshape(-1)
    if flat.size not in (1, channels):
        raise NotExact(f"a per-channel constant has {flat.size} values for {channels} channels")
    return np.broadcast_to(flat, (channels,)).copy()


def evaluate(expr: Expr, ctx: Context):
    """The Diag or ConvMap that `expr` computes from ctx.source."""
    if isinstance(expr, (Leaf, Shared)):
        if expr.tensor == ctx.source:
            return Diag(np.ones(ctx.channels), np.zeros(ctx.channels))
        if isinstance(expr, Shared):
            raise NotExact(f"a tensor inside the block is used elsewhere: {expr.reason}")
        raise NotExact(f"a branch does not reach the block input: {expr.reason}")
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
    channels = _channels(inner, ctx)
    scale = np.ones(channels) if expr.scale is None else per_channel(expr.scale, ctx.rank, channels, expr.on_channels)
    shift = np.zeros(channels) if expr.shift is None else per_channel(expr.shift, ctx.rank, channels, expr.on_channels)
    if isinstance(inner, Diag):
        return Diag(inner.scale * scale, inner.shift * scale + shift)
    kernel, bias = kernels.fold_affine(inner.kernel, inner.bias, scale, shift)
    return ConvMap(kernel, bias, inner.geometry, inner.group)


def _evaluate_conv(expr: Conv, ctx: Context):
    name = expr.nodes[0].name if expr.nodes else expr.tensor
    if expr.problem:
        raise NotExact(expr.problem)
    weight = np.asarray(expr.weight, np.float64)
    if weight.ndim - 2 != ctx.rank:
        raise NotExact(f"Conv '{name}' has a different spatial rank than the block")
    group = expr.group
    inner = evaluate(expr.input, ctx)
    if isinstance(inner, ConvMap):
        raise NotExact(f"Conv '{name}' follows another conv inside a branch (sequential branches are not supported yet)")
    if weight.shape[1] * group != ctx.channels or weight.shape[0] % group:
        raise NotExact(f"Conv '{name}' weight {list(weight.shape)} with group {group} does not fit {ctx.channels} input channels")
    try:
        geometry = conv_geometry(expr.attrs, weight.shape[2:], ctx.spatial)
    except GeometryError as exc:
        raise NotExact(f"Conv '{name}': {exc}") from None
    bias = np.zeros(weight.shape[0]) if expr.bias is None else np.asarray(expr.bias, np.float64).reshape(-1)
    if bias.shape != (weight.shape[0],):
        raise NotExact(f"Conv '{name}' bias has {bias.size} values for {weight.shape[0]} channels")
    kernel = kernels.scale_input_channels(weight, inner.scale, group)
    if np.any(inner.shift):
        if not geometry.unpadded:
            raise NotExact(f"a per-channel shift before the padded Conv '{name}' is not exact at the borders")
        bias = bias + kernels.bias_of_input_shift(weight, inner.shift, group)
    return ConvMap(kernel, bias, geometry, group)


def _evaluate_sum(expr: Sum, ctx: Context):
    values = [(sign, evaluate(term, ctx)) for sign, term in expr.terms]
    if all(isinstance(v, Diag) for _, v in values):
        return Diag(sum(s * v.scale for s, v in values), sum(s * v.shift for s, v in values))
    convs = [v for _, v in values if isinstance(v, ConvMap)]
    out_channels = {c.out_channels for c in convs}
    if len(out_channels) != 1:
        raise NotExact(f"branches have different output channels {sorted(out_channels)}")
    out = out_channels.pop()
    group = kernels.common_group([c.group for c in convs])
    maps: List[ConvMap] = []
    for sign, value in values:
        if isinstance(value, Diag):
            if out != ctx.channels:
                raise NotExact(f"an identity branch needs as many output as input channels ({out} vs {ctx.channels})")
            identity = kernels.identity_kernel(ctx.channels, group, ctx.rank)
            kernel, bias = kernels.fold_affine(identity, np.zeros(out), value.scale, value.shift)
            value = ConvMap(kernel, bias, ConvGeometry.pointwise(ctx.rank), group)
        maps.append(ConvMap(sign * value.kernel, sign * value.bias, value.geometry, value.group))
    try:
        alignment = align([m.geometry for m in maps], ctx.spatial)
    except GeometryError as exc:
        raise NotExact(str(exc)) from None
    size = alignment.geometry.kernel
    total = np.zeros((out, ctx.channels // group) + size)
    bias = np.zeros(out)
    for m, factors, offsets in zip(maps, alignment.dilation_factors, alignment.offsets):
        kernel = kernels.expand_groups(m.kernel, m.group, group)
        kernel = kernels.dilate_kernel(kernel, factors)
        total += kernels.place_kernel(kernel, offsets, size)
        bias += m.bias
    return ConvMap(total, bias, alignment.geometry, group)


def cut(expr: Expr, tensor: str) -> Expr:
    """The tree with the sub-expression that computes `tensor` replaced by a Leaf."""
    if expr.tensor == tensor and not isinstance(expr, (Leaf, Shared)):
        return Leaf(tensor, reason="")
    if isinstance(expr, Affine):
        return Affine(expr.tensor, expr.nodes, input=cut(expr.input, tensor), scale=expr.scale, shift=expr.shift,
                      kind=expr.kind, problem=expr.problem, on_channels=expr.on_channels)
    if isinstance(expr, Conv):
        return Conv(expr.tensor, expr.nodes, input=cut(expr.input, tensor), weight=expr.weight, bias=expr.bias,
                    attrs=expr.attrs, problem=expr.problem)
    if isinstance(expr, Sum):
        return Sum(expr.tensor, expr.nodes, terms=[(s, cut(t, tensor)) for s, t in expr.terms])
    if isinstance(expr, Shared):
        return Shared(expr.tensor, expr.nodes, input=cut(expr.input, tensor), reason=expr.reason)
    return expr
