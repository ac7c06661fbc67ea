"""Pure NumPy kernel arithmetic for structural re-parameterization.

Everything here works in float64 on plain arrays; nothing imports ONNX.
A conv kernel K has shape (O, C/g, k_1, ..., k_n) for an n-D convolution with
g groups; a bias has shape (O,). Per-channel affine maps are (scale, shift)
pairs of shape (C,).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def bn_affine(gamma, beta, mean, var, eps):
    """BatchNormalization as y = s·x + t with s = γ/√(σ²+ε), t = β − μ·s.

    Defined when every parameter is finite and σ²+ε > 0 in every channel; otherwise (the
    runtime computes NaN or ±inf there) ValueError says what is wrong in the first such channel.
    """
    gamma, beta, mean, var = np.broadcast_arrays(*(np.asarray(p, np.float64) for p in (gamma, beta, mean, var)))
    eps = float(eps)
    for what, values in (("scale", gamma), ("bias", beta), ("mean", mean), ("variance", var)):
        bad = _first(~np.isfinite(values))
        if bad is not None:
            raise ValueError(f"a non-finite {what} ({values.flat[bad]}) in channel {bad}")
    if not math.isfinite(eps):
        raise ValueError(f"epsilon {eps}")
    denominator = var + eps
    c = _first(denominator <= 0)
    if c is not None:
        if var.flat[c] < 0:
            raise ValueError(f"a negative variance ({var.flat[c]:g}, epsilon {eps:g}) in channel {c}")
        if eps == 0:
            raise ValueError(f"zero variance with epsilon 0 in channel {c}")
        raise ValueError(f"variance {var.flat[c]:g} with epsilon {eps:g} in channel {c}: their sum is not positive")
    with np.errstate(over="ignore"):   # a huge γ or μ, or a tiny σ²+ε: checked next
        s = gamma / np.sqrt(denominator)
        t = beta - mean * s
    c = _first(~(np.isfinite(s) & np.isfinite(t)))
    if c is not None:
        raise ValueError(f"a scale γ/√(σ²+ε) or shift β − μ·s beyond the float64 range in channel {c}")
    return s, t


def _first(mask) -> "int | None":
    """The flat index of the first True, or None."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def fold_affine(kernel, bias, scale, shift, inplace: bool = False):
    """Per-output-channel affine after a conv: K' = K·s[o], b' = b·s + t (K scaled in place when asked)."""
    spatial = (1,) * (kernel.ndim - 1)
    if inplace:
        kernel *= scale.reshape((-1,) + spatial)
        return kernel, bias * scale + shift
    return kernel * scale.reshape((-1,) + spatial), bias * scale + shift


def fold_bn(kernel, bias, gamma, beta, mean, var, eps):
    """BN after a conv: K' = K·s, b' = β + (b − μ)·s with s = γ/√(σ²+ε)."""
    return fold_affine(kernel, bias, *bn_affine(gamma, beta, mean, var, eps))


def input_channel_index(out_channels: int, in_per_group: int, group: int) -> np.ndarray:
    """Index of the input channel that K[o, i] reads, shape (O, C/g): (o // (O/g))·(C/g) + i."""
    out_per_group = out_channels // group
    o = np.arange(out_channels)[:, None]
    i = np.arange(in_per_group)[None, :]
    return (o // out_per_group) * in_per_group + i


def scale_input_channels(kernel, scale, group):
    """A per-input-channel scale before a conv: K'[o, i] = K[o, i]·s[c(o, i)]."""
    idx = input_channel_index(kernel.shape[0], kernel.shape[1], group)
    return kernel * scale[idx].reshape(idx.shape + (1,) * (kernel.ndim - 2))


def bias_of_input_shift(kernel, shift, group):
    """A per-input-channel shift t before an unpadded conv adds Σ_{i,taps} K[o, i]·t[c(o, i)]."""
    idx = input_channel_index(kernel.shape[0], kernel.shape[1], group)
    taps = kernel.reshape(kernel.shape[0], kernel.shape[1], -1).sum(axis=2)
    return (taps * shift[idx]).sum(axis=1)


def identity_kernel(channels: int, group: int, rank: int) -> np.ndarray:
    """The conv that copies its input: I[o, o mod (C/g), 0, ...] = 1, kernel 1 per axis."""
    per_group = channels // group
    kernel = np.zeros((channels, per_group) + (1,) * rank)
    kernel[(np.arange(channels), np.arange(channels) % per_group) + (0,) * rank] = 1.0
    return kernel


def dilate_kernel(kernel, factors: Sequence[int]):
    """Insert (r − 1) zeros between taps per spatial axis: size k → r·(k − 1) + 1."""
    if all(r == 1 for r in factors):
        return kernel
    shape = kernel.shape[:2] + tuple(r * (k - 1) + 1 for r, k in zip(factors, kernel.shape[2:]))
    out = np.zeros(shape)
    out[(slice(None), slice(None)) + tuple(slice(None, None, r) for r in factors)] = kernel
    return out


def place_kernel(kernel, offsets: Sequence[int], size: Sequence[int]):
    """Zero kernel of spatial `size` with `kernel` placed at per-axis tap `offsets`."""
    if tuple(size) == kernel.shape[2:] and not any(offsets):
        return kernel
    out = np.zeros(kernel.shape[:2] + tuple(size))
    add_placed(out, kernel, offsets)
    return out


def add_placed(total, kernel, offsets: Sequence[int], sign: float = 1.0) -> None:
    """total += sign·(kernel placed at per-axis tap `offsets`), in place: no kernel-sized temporary."""
    region = total[(slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offsets, kernel.shape[2:]))]
    if sign == 1.0:
        region += kernel
    elif sign == -1.0:
        region -= kernel
    else:
        region += sign * kernel


def expand_groups(kernel, group: int, new_group: int):
    """Rewrite a g-group conv as a conv with g' groups (g' divides g), block-diagonally."""
    if group == new_group:
        return kernel
    out_ch, in_per = kernel.shape[:2]
    ratio = group // new_group
    out = np.zeros((out_ch, in_per * ratio) + kernel.shape[2:])
    out_per_group = out_ch // group
    for o_group in range(group):
        rows = slice(o_group * out_per_group, (o_group + 1) * out_per_group)
        col = (o_group % ratio) * in_per
        out[rows, col:col + in_per] = kernel[rows]
    return out


def common_group(groups: Sequence[int]) -> int:
    """The largest group count every conv can be rewritten to: gcd of all groups."""
    return math.gcd(*groups) if groups else 1


def compose_kernels(outer, outer_group: int, inner, inner_group: int, steps: Sequence[int],
                    inner_factors: Sequence[int], size: Sequence[int]):
    """outer ∘ inner as one kernel: K[o, i, steps·t_o + factors·t_i] += Σ_m K_o[o, m, t_o]·K_i[m, i, t_i].

    Both convs are first rewritten to g = gcd(groups) groups, so that output group j of the
    inner conv is input group j of the outer one; the result has g groups. `steps` is where
    an outer tap lands per axis and `inner_factors` dilates the inner kernel, both in units
    of the composed kernel's dilation (geometry.compose). Returns (kernel, g).
    """
    group = math.gcd(outer_group, inner_group)
    outer = expand_groups(outer, outer_group, group)
    inner = dilate_kernel(expand_groups(inner, inner_group, group), inner_factors)
    out_ch, mid_per = outer.shape[:2]
    mid, in_per = inner.shape[:2]
    outer_g = outer.reshape((group, out_ch // group, mid_per) + outer.shape[2:])
    inner_g = inner.reshape((group, mid // group, in_per) + inner.shape[2:])
    total = np.zeros((out_ch, in_per) + tuple(size))
    inner_flat = inner_g.reshape(group, mid // group, -1)   # [g, m, i·taps]: one matrix product per outer tap
    for tap in np.ndindex(*outer.shape[2:]):
        part = np.matmul(outer_g[(Ellipsis,) + tap], inner_flat)   # Σ_m, by BLAS (einsum's loop took minutes)
        add_placed(total, part.reshape((out_ch, in_per) + inner.shape[2:]), [t * s for t, s in zip(tap, steps)])
    return total, group


def average_kernel(channels: int, size: Sequence[int]) -> np.ndarray:
    """AveragePool (padding counted) as a depthwise conv: every tap 1/∏k."""
    return np.full((channels, 1) + tuple(size), 1.0 / math.prod(size))
