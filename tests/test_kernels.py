"""The NumPy kernel transforms, each checked against a direct float64 convolution."""
from __future__ import annotations

import numpy as np
import pytest

from reparam_onnx import kernels
from reparam_onnx.geometry import ConvGeometry, GeometryError, align, conv_geometry, same_pads


def conv2d(x, w, b=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    """A direct, slow, float64 2-D convolution with ONNX semantics (NCHW, pads [hb, wb, he, we])."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (h + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wd + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    y = np.zeros((n, o, oh, ow))
    og = o // group
    for oc in range(o):
        g = oc // og
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg,
                           i * dilations[0]: i * dilations[0] + strides[0] * (oh - 1) + 1: strides[0],
                           j * dilations[1]: j * dilations[1] + strides[1] * (ow - 1) + 1: strides[1]]
                y[:, oc] += np.einsum("nchw,c->nhw", patch, w[oc, :, i, j])
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


rng = np.random.default_rng(0)


@pytest.mark.parametrize("group", [1, 2, 6])
def test_identity_kernel_copies_input(group):
    x = rng.standard_normal((2, 6, 5, 7))
    assert np.array_equal(conv2d(x, kernels.identity_kernel(6, group, 2), group=group), x)


def test_fold_bn_matches_bn_after_conv():
    x = rng.standard_normal((1, 3, 6, 5))
    w, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    gamma, beta, mean, var = rng.uniform(.5, 2, 4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(.5, 2, 4)
    y = conv2d(x, w, b, pads=(1, 1, 1, 1))
    ref = gamma[None, :, None, None] * (y - mean[None, :, None, None]) / np.sqrt(var + 1e-3)[None, :, None, None] \
        + beta[None, :, None, None]
    k, bias = kernels.fold_bn(w, b, gamma, beta, mean, var, 1e-3)
    np.testing.assert_allclose(conv2d(x, k, bias, pads=(1, 1, 1, 1)), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group,new_group", [(4, 2), (4, 1), (2, 1), (6, 3)])
def test_expand_groups_is_the_same_conv(group, new_group):
    x = rng.standard_normal((1, 12, 5, 5))
    w = rng.standard_normal((12, 12 // group, 3, 3))
    wide = kernels.expand_groups(w, group, new_group)
    assert wide.shape == (12, 12 // new_group, 3, 3)
    np.testing.assert_allclose(conv2d(x, wide, pads=(1,) * 4, group=new_group), conv2d(x, w, pads=(1,) * 4, group=group),
                               atol=1e-12)


def test_dilate_kernel_is_the_same_conv():
    x = rng.standard_normal((1, 2, 11, 9))
    w = rng.standard_normal((3, 2, 3, 2))
    dense = kernels.dilate_kernel(w, (2, 3))
    assert dense.shape == (3, 2, 5, 4)
    np.testing.assert_allclose(conv2d(x, dense), conv2d(x, w, dilations=(2, 3)), atol=1e-12)


def test_place_kernel_puts_taps_at_offsets():
    w = np.ones((1, 1, 1, 2))
    placed = kernels.place_kernel(w, (2, 0), (3, 3))
    assert placed[0, 0].tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 0]]


def test_input_scale_and_shift_before_unpadded_conv():
    x = rng.standard_normal((1, 4, 6, 6))
    w = rng.standard_normal((6, 2, 3, 3))
    s, t = rng.uniform(.5, 2, 4), rng.standard_normal(4)
    ref = conv2d(x * s[None, :, None, None] + t[None, :, None, None], w, group=2)
    k = kernels.scale_input_channels(w, s, 2)
    b = kernels.bias_of_input_shift(w, t, 2)
    np.testing.assert_allclose(conv2d(x, k, b, group=2), ref, atol=1e-12)


# ---------------------------------------------------------------- geometry


def geo(k, s=1, pads=None, d=1):
    pads = pads or (k // 2, k // 2)
    return ConvGeometry((k,), (s,), (pads[0],), (pads[1],), (d,))


def test_align_centres_only_in_the_symmetric_case():
    a = align([geo(3), geo(1, pads=(0, 0))])
    assert a.offsets == [[0], [1]] and a.geometry.kernel == (3,)
    same = align([geo(3, 2, (0, 1)), geo(1, 2, (0, 0))], [14])     # TF SAME, stride 2, even input
    assert same.offsets == [[0], [0]]


def test_align_rejects_unequal_strides_and_half_taps():
    with pytest.raises(GeometryError, match="strides"):
        align([geo(3, 1), geo(1, 2, (0, 0))])
    with pytest.raises(GeometryError, match="misaligned"):
        align([geo(3, pads=(2, 2), d=2), geo(3, pads=(1, 3), d=2)])


def test_align_needs_static_size_when_slack_differs():
    branches = [geo(3, 2, (1, 1)), geo(1, 2, (1, 0))]   # slack −1 vs 0: equal outputs only for odd L
    with pytest.raises(GeometryError, match="dynamic"):
        align(branches)
    assert align(branches, [9]).geometry.pads_begin == (1,)
    with pytest.raises(GeometryError, match="output sizes"):
        align(branches, [10])


def test_align_expands_dilation_to_common_divisor():
    a = align([geo(7, pads=(3, 3)), geo(3, pads=(2, 2), d=2)])
    assert a.geometry.kernel == (7,) and a.dilation_factors == [[1], [2]] and a.offsets == [[0], [1]]


@pytest.mark.parametrize("length,upper,expected", [(14, True, (0, 1)), (13, True, (1, 1)), (14, False, (1, 0))])
def test_same_pads(length, upper, expected):
    assert same_pads(length, 3, 2, 1, upper) == expected


def test_conv_geometry_same_with_stride_needs_size():
    with pytest.raises(GeometryError, match="static spatial"):
        conv_geometry({"auto_pad": b"SAME_UPPER", "strides": [2, 2]}, (3, 3), None)
    g = conv_geometry({"auto_pad": "SAME_LOWER"}, (3, 3), None)
    assert g.pads_begin == (1, 1) and g.pads_end == (1, 1)
