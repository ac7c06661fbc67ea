"""Property-based tests for layout handling: random blocks whose input is NHWC or NCHW and
whose branches are wrapped in Transposes the ways exporters write them (tf2onnx, Keras,
jax2onnx): a shared or per-branch input Transpose, Conv in NCHW, an optional Transpose
back so the sum happens in NHWC; per-channel Mul/Add/BatchNormalization on the convs,
the identity and after the sum, with constants shaped [C], [1,1,1,C], [1,C,1,1], [C,1,1]
or scalar; explicit zero Pad nodes (occasionally reflect/edge); a Relu after the block and
sometimes a second block after it (so the Transpose-cancelling pass runs).

(a) fuse_with_report never raises on a valid model and the result is equivalent;
(b) a block is fused exactly when every constant is per-channel in the layout it meets,
    every BatchNormalization sees channels on axis 1, every Pad pads with zeros, all terms
    are summed in one layout and the geometry holds (equal strides, equal output sizes;
    dilation 1, so taps always align). Then each block is one Conv and only the Transposes
    the model's own input/output layout needs remain. A block with a constant that is not
    per-channel in its layout is left with a reason that says so.

Rules are made irrelevant by a permissive user rule and builtin_rules=False. Equivalence is
measured before a final Relu (see without_final_relu). Three false alarms the properties once found
(outputs that cancel, or a Relu that zeroes almost everything, made max|ref| no measure of
float rounding) are regression tests at the end: verification now also allows a few times
the original model's own movement under a one-ulp input nudge (verify.compare).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import onnx
import pytest
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from conftest import SETTINGS, runs, Builder, assert_equivalent, op_counts, random_feeds, run_model
from reparam_onnx import fuse_with_report

TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
LAYOUTS = ("nchw", "nhwc")
CHANNEL_AXIS = {"nchw": 1, "nhwc": 3}

# constant shapes for n channels
SHAPES = {"C": lambda n: (n,), "111C": lambda n: (1, 1, 1, n), "1C11": lambda n: (1, n, 1, 1),
          "C11": lambda n: (n, 1, 1), "S": lambda n: (1,)}
GOOD = {"nchw": ("1C11", "C11", "1C11", "C11", "S"), "nhwc": ("C", "111C", "C", "111C", "S")}
ANY = ("C", "111C", "1C11", "C11")

def flip(layout: str) -> str:
    return "nhwc" if layout == "nchw" else "nchw"


# ---------------------------------------------------------------- the random model


@dataclass(frozen=True)
class Op:
    """A per-channel-looking op: BatchNormalization, or Mul/Add with a constant of `shape`."""
    kind: str                                # "bn" | "mul" | "add"
    shape: str = ""                          # a SHAPES key (Mul/Add only)
    const_first: bool = False                # Mul(c, x) instead of Mul(x, c)


@dataclass(frozen=True)
class ConvTerm:
    kernel: Tuple[int, int]
    strides: Tuple[int, int]
    pads: Tuple[int, int, int, int]          # total zero padding, ONNX order h_b, w_b, h_e, w_e
    group: int
    bias: bool
    pad_node: Optional[str]                  # None: pads on the Conv; else a Pad node of this mode, Conv pads 0
    own_transpose: bool                      # NHWC input: its own input Transpose, not the shared one
    inner: Tuple[Op, ...]                    # after the conv, in NCHW
    layout: str                              # the layout it is summed in ("nhwc": an output Transpose)
    outer: Tuple[Op, ...]                    # after the output Transpose (NHWC)


@dataclass(frozen=True)
class IdentityTerm:
    segments: Tuple[Tuple[Op, ...], ...]     # ops between Transposes; the layout flips between segments
    via_shared: bool                         # the first Transpose is the block's shared input Transpose


@dataclass(frozen=True)
class Block:
    layout_in: str
    c: int
    o: int
    convs: Tuple[ConvTerm, ...]
    identity: Optional[IdentityTerm]
    sum_layout: str
    post: Tuple[Op, ...]                     # after the sum, in sum_layout
    combine: str                             # "add" | "sum"
    order: Tuple[int, ...]
    tree: Tuple[int, ...]

    def identity_layouts(self) -> List[str]:
        layouts = [self.layout_in]
        for _ in self.identity.segments[1:]:
            layouts.append(flip(layouts[-1]))
        return layouts


@dataclass(frozen=True)
class Spec:
    layout: str
    c: int
    h: int
    w: int
    blocks: Tuple[Block, ...]
    relu_last: bool                          # a Relu after the last block (always one between blocks)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def op_lists(draw, layout: str, loose: str, most: int = 2) -> Tuple[Op, ...]:
    out = []
    for _ in range(draw(st.integers(0, most))):
        kinds = {"nchw": ["mul", "add", "bn"], "nhwc": ["mul", "add"] + ["bn", "bn"] * (loose == "bn")}[layout]
        kind = draw(st.sampled_from(kinds))
        if kind == "bn":
            out.append(Op("bn"))
        else:
            shapes = ANY if loose == "shapes" and draw(st.booleans()) else GOOD[layout]
            out.append(Op(kind, draw(st.sampled_from(shapes)), draw(st.integers(0, 4)) == 0))
    return tuple(out)


@st.composite
def blocks(draw, layout_in: str, c: int, loose: str) -> Block:
    """`loose`: "" draws only per-channel constants, BatchNormalization in NCHW, zero Pads and one
    sum layout; "shapes" also constants of any shape, "bn" BatchNormalization in NHWC, "pad"
    reflect/edge Pads, "layout" terms summed in the other layout."""
    identity = draw(st.booleans())
    n = draw(st.integers(1 if identity else 2, 3))
    o = c if identity else c * draw(st.sampled_from([1, 1, 2]))
    sum_layout = draw(st.sampled_from(LAYOUTS))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if (identity or loose) and draw(st.integers(0, 4)):   # stride 1 keeps H = W = C for odd constants
        stride = (1, 1)
    shared_stride = draw(st.integers(0, 5)) > 0
    # Most blocks keep every branch's slack (p_begin + p_end − k) equal, which gives equal
    # output sizes; the rest draw pads freely (often different sizes: invalid or unfusable).
    matched = draw(st.integers(0, 4)) > 0
    slack = (-1, -1) if identity or draw(st.booleans()) else (draw(st.integers(-1, 0)), draw(st.integers(-1, 0)))
    convs = []
    for _ in range(n):
        kernel, begin, end = [], [], []
        for axis in (0, 1):
            k = draw(st.integers(1, 5))
            total = slack[axis] + k
            if matched and total >= 0:
                if total % 2 == 0 and draw(st.booleans()):
                    pb = total // 2                                        # symmetric
                else:
                    pb = draw(st.integers(max(0, total - 3), min(3, total)))   # often asymmetric
                pe = total - pb
            else:
                pb = draw(st.integers(0, 3))
                pe = pb if draw(st.booleans()) else draw(st.integers(0, 3))
            kernel.append(k)
            begin.append(pb)
            end.append(pe)
        strides = stride if shared_stride else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        pad_node = draw(st.sampled_from([None, None, None, "constant"] + (["reflect", "edge"] if loose == "pad" else [])))
        own = pad_node is not None or draw(st.integers(0, 2)) == 0
        layout = flip(sum_layout) if loose == "layout" and draw(st.integers(0, 3)) == 0 else sum_layout
        inner = draw(op_lists("nchw", loose))
        outer = draw(op_lists("nhwc", loose)) if layout == "nhwc" else ()
        convs.append(ConvTerm(tuple(kernel), strides, tuple(begin + end), draw(st.sampled_from(_divisors(c))),
                              draw(st.booleans()), pad_node, own, inner, layout, outer))
    ident = None
    if identity:
        target = flip(sum_layout) if loose == "layout" and draw(st.integers(0, 3)) == 0 else sum_layout
        hops = 1 if target != layout_in else draw(st.sampled_from([0, 0, 2]))
        layouts = [layout_in] + [flip(layout_in), layout_in][:hops]
        segments = tuple(draw(op_lists(lay, loose)) for lay in layouts)
        via_shared = layout_in == "nhwc" and hops > 0 and not segments[0] and draw(st.booleans())
        ident = IdentityTerm(segments, via_shared)
    n_terms = n + identity
    order = tuple(draw(st.permutations(range(n_terms))))
    tree = tuple(draw(st.integers(0, 100)) for _ in range(n_terms))
    # when every term was flipped, the sum happens in the other layout
    layouts = {cv.layout for cv in convs} | ({target} if identity else set())
    sum_layout = layouts.pop() if len(layouts) == 1 else sum_layout
    return Block(layout_in, c, o, tuple(convs), ident, sum_layout, draw(op_lists(sum_layout, loose, 1)),
                 draw(st.sampled_from(["add", "add", "add", "sum"])), order, tree)


@st.composite
def specs(draw, modes=("", "", "", "shapes", "bn", "pad", "layout")) -> Spec:
    loose = draw(st.sampled_from(modes))
    layout = draw(st.sampled_from(LAYOUTS))
    odd = loose in ("shapes", "bn", "layout")
    c = draw(st.integers(2 if odd else 1, 4))
    # spatial sizes equal to C make wrongly shaped constants, a BatchNormalization of NHWC and
    # terms in different layouts broadcast (valid ONNX, not per-channel)
    h = c if odd and draw(st.integers(0, 3)) else draw(st.one_of(st.just(c), st.integers(1, 8)))
    w = c if odd and draw(st.integers(0, 3)) else draw(st.one_of(st.just(c), st.integers(1, 8)))
    first = draw(blocks(layout, c, loose))
    chain = [first]
    if draw(st.booleans()):
        chain.append(draw(blocks(first.sum_layout, first.o, loose)))
    return Spec(layout, c, h, w, tuple(chain), draw(st.booleans()))


# ---------------------------------------------------------------- building


def _apply(b: Builder, y: str, ops, channels: int) -> str:
    for op in ops:
        if op.kind == "bn":
            y = b.bn(y, channels)
            continue
        value = b.rng.uniform(0.5, 1.5, channels) if op.kind == "mul" else b.rng.normal(0, 0.5, channels)
        if op.shape == "S":
            value = value[:1]
        const = b.const(value.reshape(SHAPES[op.shape](channels)), op.kind)
        y = b.node("Mul" if op.kind == "mul" else "Add", [const, y] if op.const_first else [y, const])
    return y


def _int64(b: Builder, values, kind: str) -> str:
    name = b.name(kind)
    b.inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name


def build_block(b: Builder, blk: Block, x: str) -> str:
    shared: List[str] = []

    def shared_transpose() -> str:
        if not shared:
            shared.append(b.node("Transpose", [x], perm=TO_NCHW))
        return shared[0]

    terms = []
    for cv in blk.convs:
        src, conv_pads = x, cv.pads
        if cv.pad_node:
            hb, wb, he, we = cv.pads
            pads = [0, hb, wb, 0, 0, he, we, 0] if blk.layout_in == "nhwc" else [0, 0, hb, wb, 0, 0, he, we]
            src = b.node("Pad", [x, _int64(b, pads, "pads")], mode=cv.pad_node)
            conv_pads = (0, 0, 0, 0)
        if blk.layout_in == "nhwc":
            src = b.node("Transpose", [src], perm=TO_NCHW) if cv.own_transpose else shared_transpose()
        y = b.conv(src, blk.c, blk.o, cv.kernel, cv.strides, conv_pads, group=cv.group, bias=cv.bias)
        y = _apply(b, y, cv.inner, blk.o)
        if cv.layout == "nhwc":
            y = _apply(b, b.node("Transpose", [y], perm=TO_NHWC), cv.outer, blk.o)
        terms.append(y)
    if blk.identity is not None:
        y = x
        for i, (layout, ops) in enumerate(zip(blk.identity_layouts(), blk.identity.segments)):
            if i == 1 and blk.identity.via_shared:
                y = shared_transpose()
            elif i:
                y = b.node("Transpose", [y], perm=TO_NHWC if layout == "nhwc" else TO_NCHW)
            y = _apply(b, y, ops, blk.c)
        terms.append(y)
    terms = [terms[i] for i in blk.order]
    total = b.node("Sum", terms) if blk.combine == "sum" else _add_tree(b, terms, list(blk.tree))
    return _apply(b, total, blk.post, blk.o)


def _add_tree(b: Builder, terms, choices):
    if len(terms) == 1:
        return terms[0]
    split = 1 + choices.pop() % (len(terms) - 1)
    return b.node("Add", [_add_tree(b, terms[:split], choices), _add_tree(b, terms[split:], choices)])


def build(spec: Spec, seed: int = 0):
    """(model, the output tensor of every block, the input tensor of every block)."""
    b = Builder(seed=seed)
    x = b.input([1, spec.h, spec.w, spec.c] if spec.layout == "nhwc" else [1, spec.c, spec.h, spec.w])
    outs, ins = [], []
    for i, blk in enumerate(spec.blocks):
        ins.append(x)
        y = build_block(b, blk, x)
        outs.append(y)
        x = b.node("Relu", [y]) if i + 1 < len(spec.blocks) or spec.relu_last else y
    return b.model(x), outs, ins


def tensor_dims(model, names) -> Dict[str, Optional[tuple]]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    found = {}
    for info in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim)
        found[info.name] = dims if dims and None not in dims else None
    return {n: found.get(n) for n in names}


# ---------------------------------------------------------------- the expectation


def per_channel(op: Op, layout: str, channels: int) -> bool:
    """Whether the op's constant varies only along the axis that holds the channels."""
    if op.kind == "bn":
        return layout == "nchw"
    shape = SHAPES[op.shape](channels)
    full = (1,) * (4 - len(shape)) + shape
    return all(d == 1 for i, d in enumerate(full) if i != CHANNEL_AXIS[layout])


def expected(blk: Block, dims: tuple) -> Tuple[bool, Set[str], Set[str], Optional[str]]:
    """(fused?, the reason words of every layout problem, those inside the terms, the geometry
    problem), from the spec alone. The engine evaluates the terms, then their sum (layouts,
    geometry), then the ops after the sum, and names the first problem it meets."""
    h, w = (dims[1], dims[2]) if blk.layout_in == "nhwc" else (dims[2], dims[3])
    problems: Set[str] = set()

    def check(ops, layout, channels):
        for op in ops:
            if not per_channel(op, layout, channels):
                problems.add("channel axis" if op.kind == "bn" else "per-channel")

    layouts = set()
    for cv in blk.convs:
        check(cv.inner, "nchw", blk.o)
        check(cv.outer, "nhwc", blk.o)
        layouts.add(cv.layout)
        if cv.pad_node not in (None, "constant"):
            problems.add("not zero padding")
    if blk.identity is not None:
        for layout, ops in zip(blk.identity_layouts(), blk.identity.segments):
            check(ops, layout, blk.c)
        layouts.add(blk.identity_layouts()[-1])
    in_terms = set(problems)
    if len(layouts) > 1:
        problems.add("different layouts")
    check(blk.post, blk.sum_layout, blk.o)

    geometry = None
    strides = {cv.strides for cv in blk.convs} | ({(1, 1)} if blk.identity else set())
    sizes = {tuple((n + cv.pads[a] + cv.pads[a + 2] - cv.kernel[a]) // cv.strides[a] + 1
                   for a, n in enumerate((h, w))) for cv in blk.convs}
    if blk.identity:
        sizes.add((h, w))
    if len(strides) > 1:
        geometry = "strides differ"
    elif len(sizes) > 1:
        geometry = "output sizes differ"
    return not problems and geometry is None, problems, in_terms, geometry


def without_final_relu(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model whose output is the final Relu's input. A Relu that zeroes almost everything
    makes max|ref| a poor scale for float32 rounding (found by these properties: max|Δ|/max|ref|
    2e-5 with max|ref| = 0.002 after the Relu, pre-activations ~1, and both models equally far
    from float64); comparing before it bounds the Relu's output error just as well."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    last = next((n for n in graph.node if n.output[0] == graph.output[0].name), None)
    if last is not None and last.op_type == "Relu":
        graph.output[0].name = last.input[0]
        graph.node.remove(last)
    return out


def fuse_and_check(model: onnx.ModelProto, **options):
    """conftest.fuse_and_check, comparing before a final Relu (see without_final_relu)."""
    before = model.SerializeToString()
    result = fuse_with_report(model, **options)
    assert model.SerializeToString() == before, "the input model was modified"
    assert_equivalent(without_final_relu(model), without_final_relu(result.model))
    run_model(result.model, random_feeds(model))
    return result


def block_report(result, output: str):
    reports = [r for r in result.report.blocks if r.output == output]
    assert len(reports) == 1, (output, [(r.output, r.fused, r.reason) for r in result.report.blocks])
    return reports[0]


def describe(spec: Spec) -> str:
    return "\n".join([f"{spec.layout} c={spec.c} h={spec.h} w={spec.w} relu_last={spec.relu_last}"] +
                     [repr(blk) for blk in spec.blocks])


def features(spec: Spec) -> List[str]:
    """Coverage labels for --hypothesis-show-statistics."""
    out = [f"input {spec.layout}, output {spec.blocks[-1].sum_layout}, {len(spec.blocks)} block(s)"]
    convs = [cv for blk in spec.blocks for cv in blk.convs]
    if any(blk.layout_in == "nhwc" and not cv.own_transpose for blk in spec.blocks for cv in blk.convs):
        out.append("a shared input Transpose")
    if any(cv.pad_node == "constant" for cv in convs):
        out.append("a zero Pad node")
    if any(len(blk.identity.segments) == 3 for blk in spec.blocks if blk.identity):
        out.append("an identity through a Transpose pair")
    return out


# ---------------------------------------------------------------- properties


@settings(max_examples=50, **SETTINGS)
@given(specs())
def test_builtin_rules_never_raise_and_stay_equivalent(spec):
    """(a) with the shipped rules and verification on: no exception, an equivalent model."""
    model, _, _ = build(spec)
    assume(runs(model))
    note(describe(spec))
    fuse_and_check(model)


@settings(max_examples=80, **SETTINGS)
@given(specs())
def test_fused_exactly_when_per_channel_in_its_layout(permissive_rules, spec):
    """(a) and (b): every block fused iff exact in its layouts; then one Conv per block and only
    the Transposes that the model's input and output layouts need."""
    check_verdicts(spec, permissive_rules)


@pytest.mark.parametrize("mode", ["shapes", "bn", "pad", "layout"])
@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_not_per_channel_in_its_layout_is_left(permissive_rules, mode, data):
    """The same property where constants of every shape ("shapes"), BatchNormalization of NHWC
    tensors ("bn"), reflect/edge Pads ("pad") or terms summed in the other layout ("layout") are
    drawn often (the odd shapes at H = W = C, where they broadcast)."""
    check_verdicts(data.draw(specs(modes=(mode,)), label="spec"), permissive_rules)


def check_verdicts(spec: Spec, permissive_rules: str):
    model, outs, ins = build(spec)
    assume(runs(model))
    dims = tensor_dims(model, ins)
    assume(all(dims[i] is not None for i in ins))
    verdicts = [expected(blk, dims[i]) for blk, i in zip(spec.blocks, ins)]
    note(describe(spec) + f"\nexpected: {verdicts}")
    for fused, problems, _, geometry in verdicts:
        event("expected fused" if fused else
              f"expected not fused: {', '.join(sorted(problems)) or geometry}")
    for feature in features(spec):
        event(feature)
    # the subject is layouts: the cost guard (its own property in test_properties.py) is off
    result = fuse_and_check(model, rules=[permissive_rules], builtin_rules=False, allow_larger=True)
    for blk, out, (fused, problems, in_terms, geometry) in zip(spec.blocks, outs, verdicts):
        report = block_report(result, out)
        assert report.fused == fused, report.reason
        if fused:
            assert report.reason is None and report.rule == "any"
        else:
            assert report.reason
            if problems and geometry is None:
                assert any(p in report.reason for p in problems), (problems, report.reason)
            if in_terms == {"per-channel"} or (problems == {"per-channel"} and geometry is None):
                assert "per-channel" in report.reason, report.reason
    if all(v[0] for v in verdicts):
        relus = len(spec.blocks) - 1 + spec.relu_last
        transposes = (spec.layout == "nhwc") + (spec.blocks[-1].sum_layout == "nhwc")
        want = {op: n for op, n in (("Conv", len(spec.blocks)), ("Transpose", transposes), ("Relu", relus)) if n}
        assert op_counts(result.model) == want


# ---------------------------------------------------------------- engine issues found by the properties
#
# Both come from one root cause: the engine's tolerance is max|Δ| ≤ rtol·max|ref| on the
# compared tensor, and a 1×1 tensor whose O(1) terms cancel has a tiny max|ref|, so float32
# rounding of the (unchanged) intermediates, ~1e-7 absolute, exceeds it. No fused arithmetic
# is wrong. The properties hit this with random weights at 1×1 inputs (e.g. a block output of
# 0.0032 from O(1) terms: the original graph in float32 is 8.6e-5 off float64, the fused one
# 1.1e-5, and the engine reported 7.5e-5 > 1e-5). These are minimal versions with the
# cancellation made explicit; the verification input of a [1,1,1,1] tensor is
# default_rng(0).standard_normal = 0.1257.

X0 = float(np.random.default_rng(0).standard_normal((1, 1, 1, 1)).ravel()[0])
GAMMA, MEAN, VAR = 1.3, 0.2, 0.8


def _bn1(b: Builder, y: str, beta: float) -> str:
    params = [b.const(np.array([v]), k) for v, k in ((GAMMA, "gamma"), (beta, "beta"), (MEAN, "mean"), (VAR, "var"))]
    return b.node("BatchNormalization", [y] + params, epsilon=1e-5)


def _bn1_of(w: float, beta: float, x: float) -> float:
    return GAMMA * (w * x - MEAN) / np.sqrt(VAR + 1e-5) + beta


def test_exact_fold_before_a_cancelling_add_verifies():
    """out = BN(Conv1x1(x)) − 6.4·Relu(x) ≈ −8e-7 from O(1) terms: once a VerificationError."""
    w, beta = 1.1, 0.9
    b = Builder()
    x = b.input([1, 1, 1, 1])
    a = _bn1(b, b.node("Conv", [x, b.const(np.full((1, 1, 1, 1), w))], kernel_shape=[1, 1]), beta)
    c = -_bn1_of(w, beta, X0) / X0 * (1 + 1e-6)
    model = b.model(b.node("Add", [a, b.node("Mul", [b.node("Relu", [x]), b.const(np.array([c]))])]))
    result = fuse_with_report(model)
    assert [r.rule for r in result.report.blocks if r.fused] == ["conv_bn"]


def test_exact_block_whose_output_cancels_is_fused():
    """BN(Conv1x1(x)) + x ≈ 1e-6: once left unfused by its isolated check (1.49e-02 > 1e-05)."""
    w = 0.7
    beta = -(_bn1_of(w, 0.0, X0)) - X0 + 1e-6
    b = Builder()
    x = b.input([1, 1, 1, 1])
    y = b.add(_bn1(b, b.node("Conv", [x, b.const(np.full((1, 1, 1, 1), w))], kernel_shape=[1, 1]), beta), x)
    result = fuse_with_report(b.model(y))
    assert [r.fused for r in result.report.blocks] == [True], result.report.blocks[0].reason


def test_block_before_a_relu_that_zeroes_almost_everything_verifies(permissive_rules):
    """Relu keeps max|ref| = 0.016 of pre-activations ~1: once a VerificationError (1.04e-5 > 1e-5)."""
    bn, add = Op("bn"), Op("add", "1C11", True)
    conv = dict(strides=(1, 1), bias=True, own_transpose=True, layout="nchw", outer=())
    block = Block("nchw", 2, 2, (
        ConvTerm((3, 5), pads=(1, 2, 1, 2), group=1, pad_node="constant", inner=(bn, add), **conv),
        ConvTerm((2, 4), pads=(0, 2, 1, 1), group=2, pad_node=None, inner=(add,), **conv),
        ConvTerm((4, 5), pads=(1, 2, 2, 2), group=1, pad_node=None, inner=(), **conv),
    ), None, "nchw", (), "add", (0, 1, 2), (0, 0, 1))
    model, _, _ = build(Spec("nchw", 2, 1, 2, (block,), relu_last=True))
    result = fuse_with_report(model, rules=[permissive_rules], builtin_rules=False)
    assert op_counts(result.model) == {"Conv": 1, "Relu": 1}
