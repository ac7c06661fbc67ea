"""Convolution geometry: kernel size, strides, pads, dilations, and how branches align.

ONNX pads are [x1_begin, x2_begin, ..., x1_end, x2_end]. For every spatial axis an
output position j reads input positions j·s − p_begin + d·t for taps t < k, and the
output length is ⌊(L + p_begin + p_end − d·(k − 1) − 1) / s⌋ + 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


class GeometryError(ValueError):
    """The geometry cannot be expressed exactly (the message says why)."""


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple
    strides: tuple
    pads_begin: tuple
    pads_end: tuple
    dilations: tuple

    @property
    def rank(self) -> int:
        return len(self.kernel)

    def extent(self, axis: int) -> int:
        return self.dilations[axis] * (self.kernel[axis] - 1) + 1

    def slack(self, axis: int) -> int:
        """p_begin + p_end − extent: equal slack and stride give equal output lengths for every L."""
        return self.pads_begin[axis] + self.pads_end[axis] - self.extent(axis)

    def out_size(self, axis: int, length: int) -> int:
        return (length + self.slack(axis)) // self.strides[axis] + 1

    @property
    def unpadded(self) -> bool:
        return not any(self.pads_begin) and not any(self.pads_end)

    @staticmethod
    def pointwise(rank: int) -> "ConvGeometry":
        """The geometry of a 1×…×1, stride-1, unpadded conv (the identity branch)."""
        one, zero = (1,) * rank, (0,) * rank
        return ConvGeometry(one, one, zero, zero, one)


def same_pads(length: int, kernel: int, stride: int, dilation: int, upper: bool):
    """auto_pad SAME_*: total = max((⌈L/s⌉ − 1)·s + d(k−1) + 1 − L, 0), the odd pixel at the end for UPPER."""
    total = max((math.ceil(length / stride) - 1) * stride + dilation * (kernel - 1) + 1 - length, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def conv_geometry(attrs: dict, kernel_shape: Sequence[int], spatial: Optional[Sequence[Optional[int]]]) -> ConvGeometry:
    """Explicit geometry of a Conv/AveragePool node from its attributes.

    `spatial` is the static input size per axis (None where unknown); it is needed
    only for auto_pad SAME_* with a stride > 1, whose pads depend on the input size.
    """
    rank = len(kernel_shape)
    kernel = tuple(int(k) for k in attrs.get("kernel_shape") or kernel_shape)
    strides = tuple(int(s) for s in attrs.get("strides") or (1,) * rank)
    dilations = tuple(int(d) for d in attrs.get("dilations") or (1,) * rank)
    if len(kernel) != rank or len(strides) != rank or len(dilations) != rank:
        raise GeometryError("kernel_shape, strides or dilations do not match the weight's rank")
    if tuple(kernel) != tuple(kernel_shape):
        raise GeometryError(f"kernel_shape {list(kernel)} differs from the weight's {list(kernel_shape)}")
    if min(kernel + strides + dilations, default=1) < 1:
        raise GeometryError("kernel sizes, strides and dilations must be positive")
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", ""):
        pads = tuple(int(p) for p in attrs.get("pads") or (0,) * (2 * rank))
        if len(pads) != 2 * rank:
            raise GeometryError("pads do not match the weight's rank")
        begin, end = pads[:rank], pads[rank:]
    elif auto_pad == "VALID":
        begin = end = (0,) * rank
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for axis in range(rank):
            length = spatial[axis] if spatial is not None else None
            if length is None:
                if strides[axis] != 1:
                    raise GeometryError(f"auto_pad={auto_pad} with stride {strides[axis]} needs a static spatial input size")
                length = strides[axis]  # with stride 1 the pads do not depend on the length
            b, e = same_pads(length, kernel[axis], strides[axis], dilations[axis], auto_pad == "SAME_UPPER")
            begin.append(b)
            end.append(e)
        begin, end = tuple(begin), tuple(end)
    else:
        raise GeometryError(f"unknown auto_pad {auto_pad!r}")
    if any(p < 0 for p in begin + end):
        raise GeometryError("negative pads")
    return ConvGeometry(kernel, strides, begin, end, dilations)


@dataclass(frozen=True)
class Alignment:
    """Where each branch kernel goes inside the merged kernel."""
    geometry: ConvGeometry            # of the merged conv
    dilation_factors: list            # per branch, per axis: expand the branch kernel by this
    offsets: list                     # per branch, per axis: tap offset inside the merged kernel


def align(branches: Sequence[ConvGeometry], spatial: Optional[Sequence[Optional[int]]] = None) -> Alignment:
    """The one conv whose taps are the union of every branch's taps, or GeometryError.

    Per axis: all strides equal; the common dilation D is the gcd of the branch dilations
    (a size-1 axis has no dilation to honour); the merged conv starts at the earliest
    tap, p = max p_begin, and a branch sits at offset (p − p_begin)/D, which must be a
    whole number. The output lengths must agree: for every L when the slacks are equal,
    otherwise only at the static input length `spatial`, when it is known.
    """
    rank = branches[0].rank
    if any(b.rank != rank for b in branches):
        raise GeometryError("branches have different spatial ranks")
    kernel, strides, begin, end, dilations = [], [], [], [], []
    factors = [[1] * rank for _ in branches]
    offsets = [[0] * rank for _ in branches]
    for axis in range(rank):
        stride = branches[0].strides[axis]
        if any(b.strides[axis] != stride for b in branches):
            raise GeometryError(f"branches have different strides {sorted({b.strides for b in branches})}")
        dils = [b.dilations[axis] for b in branches if b.kernel[axis] > 1]
        dil = math.gcd(*dils) if dils else 1
        sizes = []
        for n, b in enumerate(branches):
            factor = b.dilations[axis] // dil if b.kernel[axis] > 1 else 1
            factors[n][axis] = factor
            sizes.append(factor * (b.kernel[axis] - 1) + 1)
        p_begin = max(b.pads_begin[axis] for b in branches)
        for n, b in enumerate(branches):
            shift = p_begin - b.pads_begin[axis]
            if shift % dil:
                raise GeometryError(f"branch taps are misaligned: pad offset {shift} is not a multiple of dilation {dil}")
            offsets[n][axis] = shift // dil
        size = max(o[axis] + s for o, s in zip(offsets, sizes))
        extent = dil * (size - 1) + 1
        slacks = {b.slack(axis) for b in branches}
        length = spatial[axis] if spatial is not None else None
        if len(slacks) == 1:
            p_end = slacks.pop() + extent - p_begin
        elif length is not None:
            counts = {b.out_size(axis, length) for b in branches}
            if len(counts) != 1:
                raise GeometryError(f"branches produce different output sizes {sorted(counts)} on axis {axis}")
            count = counts.pop()
            p_end = max(0, (count - 1) * stride + extent - length - p_begin)
            if (length + p_begin + p_end - extent) // stride + 1 != count:
                raise GeometryError(f"no padding reproduces the output size {count} on axis {axis}")
        else:
            raise GeometryError("branches produce different output sizes (their padding differs) and the input size is dynamic")
        if p_end < 0:
            raise GeometryError(f"branch taps are misaligned: the merged conv would need negative padding on axis {axis}")
        kernel.append(size)
        strides.append(stride)
        begin.append(p_begin)
        end.append(p_end)
        dilations.append(dil)
    merged = ConvGeometry(tuple(kernel), tuple(strides), tuple(begin), tuple(end), tuple(dilations))
    return Alignment(merged, factors, offsets)


@dataclass(frozen=True)
class Composition:
    """outer ∘ inner as one conv: its geometry, where outer taps land and how inner taps spread."""
    geometry: ConvGeometry
    steps: tuple           # per axis: outer tap t lands at steps·t in the composed kernel
    inner_factors: tuple   # per axis: inner kernel dilated by this


def compose(inner: ConvGeometry, outer: ConvGeometry) -> Composition:
    """The conv equal to `outer` applied to the output of `inner`, or GeometryError.

    Per axis, an outer output j reads inner output j·s_o + d_o·t_o − p_o, which reads input
    (j·s_o + d_o·t_o)·s_i + d_i·t_i − p_i − s_i·p_o: a conv of stride s_i·s_o, taps at
    s_i·d_o·t_o + d_i·t_i (dilation D = their gcd) and pads p_i + s_i·p_o. That holds for the
    padded positions too only when the outer conv is unpadded, or when the inner conv is 1×1,
    stride 1 and unpadded (the value it gives a padded position is then its bias: the caller
    checks that against the padding value). Output lengths agree for every input length:
    ⌊(⌊X/s_i⌋ + 1 − e_o)/s_o⌋ = ⌊(X + s_i(1 − e_o))/(s_i·s_o)⌋.
    """
    pointwise = all(k == 1 for k in inner.kernel) and all(s == 1 for s in inner.strides) and inner.unpadded
    if not outer.unpadded and not pointwise:
        raise GeometryError("a padded conv after a conv that is not 1×1, stride 1 and unpadded is not exact at the borders")
    kernel, strides, begin, end, dilations, steps, factors = [], [], [], [], [], [], []
    for axis in range(inner.rank):
        s_i, d_i, k_i = inner.strides[axis], inner.dilations[axis], inner.kernel[axis]
        s_o, d_o, k_o = outer.strides[axis], outer.dilations[axis], outer.kernel[axis]
        spacings = ([s_i * d_o] if k_o > 1 else []) + ([d_i] if k_i > 1 else [])
        dil = math.gcd(*spacings) if spacings else 1
        extent = s_i * d_o * (k_o - 1) + d_i * (k_i - 1)
        kernel.append(extent // dil + 1)
        strides.append(s_i * s_o)
        begin.append(inner.pads_begin[axis] + s_i * outer.pads_begin[axis])
        end.append(inner.pads_end[axis] + s_i * outer.pads_end[axis])
        dilations.append(dil)
        steps.append(s_i * d_o // dil)
        factors.append(d_i // dil if k_i > 1 else 1)
    geometry = ConvGeometry(tuple(kernel), tuple(strides), tuple(begin), tuple(end), tuple(dilations))
    return Composition(geometry, tuple(steps), tuple(factors))
