"""Property-based tests of ops in sequence: random chains [BN →] Conv [→ BN] [→ Pad] →
(Conv | AveragePool) [→ BN] over one input, at random geometry.

(a) with the block check and the whole-model verification off, so that nothing but the
    algebra stands between the chain and the output, the result is equivalent to the input;
(b) the chain becomes one Conv exactly when the conditions hold, computed here independently
    of the engine: the padding between the two ops (a Pad, the second op's own) sees at a padded
    position what the merged conv sees there — the first conv must then be 1×1, stride 1,
    unpadded, and the padding value its output for a zero input —, an AveragePool that pads
    counts its padding, a BN before a padded first conv has no shift; and the merged conv has
    no more weights than the two ops together.

Rules are made irrelevant by a permissive user rule and builtin_rules=False.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import pytest
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from conftest import SETTINGS, Builder, assert_equivalent, op_counts, run_model
from reparam_onnx import fuse_with_report

SEQUENTIAL_RULE = """
name = "any_chain"
summary = "any chain or conv"
priority = 1000
min_terms = 1
[[terms]]
kind = "chain"
count = [0, 1]
[[terms]]
kind = "conv"
count = [0, 1]
"""


@dataclass(frozen=True)
class Op:
    kind: str                      # "conv" or "avg"
    kernel: int
    stride: int
    pads: Tuple[int, int, int, int]
    dilation: int = 1
    group: int = 1
    bias: bool = False
    include_pad: bool = True       # AveragePool's count_include_pad

    def extent(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    @property
    def pointwise(self) -> bool:
        return self.kernel == 1 and self.stride == 1 and not any(self.pads)


@dataclass(frozen=True)
class Chain:
    c: int
    m: int
    o: int
    h: int
    w: int
    pre_bn: bool
    first: Op
    bn1: bool
    pad: str                       # "none", "zero", "value" (the first op's output at zero), "other"
    second: Op
    bn2: bool


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def chains(draw) -> Chain:
    c, m = draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4, 6]))
    k1 = draw(st.sampled_from([1, 1, 3]))
    pads1 = tuple(draw(st.integers(0, 1)) for _ in range(4)) if k1 > 1 and draw(st.booleans()) else (0,) * 4
    g1 = draw(st.sampled_from([g for g in _divisors(c) if m % g == 0]))
    first = Op("conv", k1, draw(st.sampled_from([1, 1, 2])), pads1,
               draw(st.sampled_from([1, 2])) if k1 > 1 else 1, g1, draw(st.booleans()))
    if draw(st.booleans()):
        o = draw(st.sampled_from([2, 4]))
        k2 = draw(st.sampled_from([1, 3]))
        g2 = draw(st.sampled_from([g for g in _divisors(m) if o % g == 0]))
        second = Op("conv", k2, draw(st.sampled_from([1, 2])),
                    tuple(draw(st.integers(0, 1)) for _ in range(4)) if k2 > 1 and draw(st.booleans()) else (0,) * 4,
                    draw(st.sampled_from([1, 2])) if k2 > 1 else 1, g2, draw(st.booleans()))
    else:
        o = m
        pads = (1, 1, 1, 1) if draw(st.booleans()) else (0,) * 4
        second = Op("avg", 3, draw(st.sampled_from([1, 2])), pads, group=m, include_pad=draw(st.booleans()))
    return Chain(c, m, o, draw(st.integers(5, 11)), draw(st.integers(5, 11)), draw(st.booleans()), first,
                 draw(st.booleans()), draw(st.sampled_from(["none", "zero", "value", "other"])), second,
                 draw(st.booleans()))


def _ints(b: Builder, values) -> str:
    name = b.name("i")
    b.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


def _first_part(b: Builder, spec: Chain, x: str) -> str:
    f = spec.first
    y = b.bn(x, spec.c) if spec.pre_bn else x
    y = b.conv(y, spec.c, spec.m, (f.kernel,) * 2, (f.stride,) * 2, f.pads, (f.dilation,) * 2, f.group, f.bias)
    return b.bn(y, spec.m) if spec.bn1 else y


def _value_at_zero(spec: Chain) -> np.ndarray:
    """What the first part gives a zero input, per channel, in float32 (away from any border)."""
    b = Builder(seed=7)
    x = b.input([1, spec.c, 9, 9])
    y = _first_part(b, spec, x)
    (out,) = run_model(b.model(y), {x: np.zeros((1, spec.c, 9, 9), np.float32)}).values()
    return out[0, :, out.shape[2] // 2, out.shape[3] // 2]


def build(spec: Chain):
    b = Builder(seed=7)
    x = b.input([2, spec.c, spec.h, spec.w])
    y = _first_part(b, spec, x)
    if spec.pad != "none":
        value = {"zero": np.zeros(spec.m), "value": _value_at_zero(spec),
                 "other": _value_at_zero(spec) + 0.5}[spec.pad].astype(np.float32)
        t = b.const(value.reshape(1, spec.m, 1, 1))
        y = b.node("Add", [b.node("Pad", [b.node("Sub", [y, t]), _ints(b, [0, 0, 1, 1, 0, 0, 1, 1])], mode="constant"), t])
    s = spec.second
    if s.kind == "conv":
        y = b.conv(y, spec.m, spec.o, (s.kernel,) * 2, (s.stride,) * 2, s.pads, (s.dilation,) * 2, s.group, s.bias)
    else:
        y = b.node("AveragePool", [y], kernel_shape=[3, 3], strides=[s.stride] * 2, pads=list(s.pads),
                   count_include_pad=int(s.include_pad))
    if spec.bn2:
        y = b.bn(y, spec.o)
    return b.model(y)


def _sizes_ok(spec: Chain) -> bool:
    """Every op has an output of at least one position."""
    h, w = spec.h, spec.w
    for op, extra in ((spec.first, 0), (spec.second, 2 if spec.pad != "none" else 0)):
        h = (h + extra + op.pads[0] + op.pads[2] - op.extent()) // op.stride + 1
        w = (w + extra + op.pads[1] + op.pads[3] - op.extent()) // op.stride + 1
        if h < 1 or w < 1:
            return False
    return True


def expected_one_conv(spec: Chain) -> Tuple[bool, str]:
    f, s = spec.first, spec.second
    if spec.pre_bn and any(f.pads):
        return False, "a BN shift before a padded conv"
    own = any(s.pads)
    if s.kind == "avg" and own and not s.include_pad:
        return False, "an AveragePool leaving its padding out"
    if spec.pad != "none" or own:
        if not f.pointwise:
            return False, "padding after a conv that is not pointwise"
        at_zero_is_zero = not (spec.pre_bn or f.bias or spec.bn1)
        if spec.pad == "other" or spec.pad == "zero" and not at_zero_is_zero:
            return False, "a padding value that is not the first op's output at zero"
        if own and not at_zero_is_zero:
            return False, "zero padding after a bias"
    merged, total = merged_weights(spec), block_weights(spec)
    if merged > total:
        return False, f"costs more ({merged} > {total})"
    return True, "exact"


def merged_weights(spec: Chain) -> int:
    f, s = spec.first, spec.second
    spacings = ([f.stride * s.dilation] if s.kernel > 1 else []) + ([f.dilation] if f.kernel > 1 else [])
    d = math.gcd(*spacings) if spacings else 1
    size = (f.stride * s.dilation * (s.kernel - 1) + f.dilation * (f.kernel - 1)) // d + 1
    g = math.gcd(f.group, s.group)
    return spec.o * (spec.c // g) * size * size


def block_weights(spec: Chain) -> int:
    f, s = spec.first, spec.second
    return spec.m * (spec.c // f.group) * f.kernel ** 2 + spec.o * (spec.m // s.group) * s.kernel ** 2


@pytest.fixture(scope="module")
def chain_rules(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("rules")
    (folder / "chain.toml").write_text(SEQUENTIAL_RULE)
    return str(folder)


@settings(max_examples=120, **SETTINGS)
@given(chains())
def test_chains_collapse_exactly_when_the_conditions_hold(chain_rules, spec):
    assume(_sizes_ok(spec))
    model = build(spec)
    expected, why = expected_one_conv(spec)
    note(f"expected one conv: {expected} ({why})")
    event(why.split(" (")[0])
    result = fuse_with_report(model, rules=[chain_rules], builtin_rules=False, check_blocks=False, verify=False)
    assert_equivalent(model, result.model)                       # (a) the algebra alone is exact
    counts = op_counts(result.model)
    one = counts.get("Conv", 0) == 1 and len(result.model.graph.node) == 1
    note(f"result: {counts}; {[(b.code, b.reason) for b in result.report.unfused]}")
    assert one == expected, why                                  # (b) exactly when the conditions hold
