"""Deciding: find candidate blocks and decide, for each, whether it becomes one Conv (or Linear).

A candidate is rooted at an op that can end a block (terms.ROOT_OPS); its expression tree
(terms.Walker) is evaluated relative to the block input (linear.evaluate_block); a rule must
accept its shape (rulebook). The result is a Decision per block: fused, or the reason it stays.
Nothing here edits the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Set, Tuple

import numpy as np
import onnx

from .edit import default_opset
from .graph import GraphIndex, reads
from .linear import (Context, ConvMap, NotExact, TooCostly, bag_sums, chain_ops, choose_source, cut,
                     trailing_reshape,
                     evaluate_block, output_shape_kept, source_layout, top_terms)
from .report import BlockReport
from .risk import numeric_risk
from .rulebook import Rule, block_shape, first_accepting
from .shapes import computed_shape_arguments, static_shapes
from .terms import (ROOT_OPS, Affine, AvgPool, Conv, Expr, Leaf, Regroup, Shared, Sum, Transpose, Walker, block_exprs,
                    block_nodes)

MAX_CHANNELS = 1 << 20


@dataclass
class Decision:
    """What the analysis decided about one block, made whole by Analyser._decision and not
    changed by it afterwards. The rewrite records the block check in `report` and lets go of
    `expr` and the value's arrays once the block is written (they hold its weights)."""
    report: BlockReport
    expr: Expr                       # the part of the graph the decision is about
    value: Optional[ConvMap] = None  # the fused conv, when fused
    dtype: Optional[type] = None
    ctx: Optional[Context] = None
    exact: bool = False              # the block evaluates to one conv (it may still be unwanted: rule, cost)


@dataclass
class FuseOptions:
    rules: Sequence[Rule]
    initializers_as_constants: bool = False
    external_base: Optional[str] = None
    check_blocks: bool = True          # run each fused block alone in onnxruntime before rewriting it
    seed: int = 0
    rtol: Optional[float] = None
    atol: float = 0.0
    allow_larger: bool = False         # merge blocks even into a conv that costs more than the branches


class Analyser:
    """The decisions of one pass over one graph."""

    def __init__(self, model: onnx.ModelProto, options: FuseOptions):
        self.model = model
        self.graph = model.graph
        self.options = options
        self.rules = options.rules
        self.shapes = static_shapes(model)
        self.index = self._index()
        computed = computed_shape_arguments(self.index)
        if computed:   # inference again, with what it could not compute: more shapes are static
            self.shapes = static_shapes(model, constants=computed)
            self.index = self._index()
        self.walker = Walker(self.index)

    def forget_expressions(self) -> None:
        """Drop the walker: its memo holds every expression walked, and through them every
        weight read. What comes after deciding reads weights through the index alone, which
        forgets each replaced block's."""
        self.walker = None

    def _index(self) -> GraphIndex:
        return GraphIndex(self.graph, self.shapes, default_opset(self.model), self.options.initializers_as_constants,
                          self.options.external_base)

    def decisions(self) -> List[Decision]:
        claimed: Set[int] = set()
        out = []
        for node in reversed(self.graph.node):
            if id(node) in claimed or node.op_type not in ROOT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            if not node.output or not node.output[0]:
                continue
            decision = self.decide(self.walker.walk(node.output[0], root=True))
            if decision is None:
                continue
            k = _said_already(decision, out)
            if k is not None:   # the one report lists the inner block's nodes too
                nodes = list(dict.fromkeys(out[k].report.nodes + decision.report.nodes))
                out[k] = replace(out[k], report=replace(out[k].report, nodes=nodes))
                continue
            out.append(decision)
            nodes = block_nodes(decision.expr, decision.report.input) if decision.report.fused \
                else _top_nodes(decision.expr, whole_bag=decision.exact)
            claimed.update(id(n) for n in nodes)
        return out

    def decide(self, expr: Expr) -> Optional[Decision]:
        source = choose_source(expr)
        if source is None:
            return None
        # a Flatten/Reshape of the input itself is not part of the block: its output is the input
        # (the dynamo exporter writes GlobalAveragePool → Flatten as ReduceMean → Reshape)
        regroup = next((e for e in block_exprs(expr, source) if isinstance(e, Regroup) and
                        isinstance(e.input, (Leaf, Shared)) and e.input.tensor == source), None)
        if regroup is not None:
            return self.decide(cut(expr, regroup.tensor))
        decision = self._decide_from(expr, source)
        if decision.report.fused and not _as_linear(decision):
            decision = self._kept_linear(expr, source, decision)
            if decision is None:
                return None
        if top_terms(expr)[1]:
            return decision
        if decision.report.fused:
            # a chain is rewritten only into fewer nodes (MatMul→Add is already its own deploy form),
            # or as many when a BatchNormalization goes (MatMul → BN becomes MatMul + Add)
            nodes = block_nodes(expr, source)
            fewer = _emitted(decision) < len(nodes) or _emitted(decision) == len(nodes) and \
                any(n.op_type == "BatchNormalization" for n in nodes)
            return decision if fewer else None
        # A chain is first tried from as deep as the walk went (to fold a BN before an unpadded
        # conv, or compose two convs); when that fails, from the outermost conv's input (the
        # ops before it fold into their own conv), then from each graph tensor further down,
        # deepest first (BN → AvgPool → 1×1: the pool and the conv cost more merged, the moved
        # BN folds into the conv).
        conv = next((e for e in block_exprs(expr, source) if isinstance(e, Conv)), None)
        shorter = None   # the chain from the outermost conv's input: what is reported
        for k, below in enumerate([] if conv is None else _tensors_below(conv, source)):
            tried = self.decide(cut(expr, below))
            if tried is not None and tried.report.fused:
                return tried
            shorter = tried if k == 0 else shorter
        if shorter is not None:
            return shorter if self._worth_reporting(expr, decision) else decision
        return decision if self._worth_reporting(expr, decision) else None

    def _kept_linear(self, expr: Expr, source: str, decision: Decision) -> Optional[Decision]:
        """A block of Linears (Gemm/MatMul) that came out as a Conv because it took in a graph
        Transpose (to tokens) stays Linear, as the framework's deploy form has it: the block cut
        above the Transpose when that is one Linear of no more nodes (NextViT's q once its pre-BN
        is folded in); nothing when the block is then just a Linear and the layout op (taking in
        the Transpose is no re-parameterization)."""
        weights = [e for e in block_exprs(expr, source) if isinstance(e, Conv)]
        if not weights or not all(c.linear for c in weights):
            return decision
        for layout in (e for e in block_exprs(expr, source) if isinstance(e, Transpose) and
                       [n.op_type for n in e.nodes] == ["Transpose"]):
            inner = cut(expr, layout.tensor)
            linear = self.decide(inner)
            if linear is None:
                below = block_exprs(layout.input, source)
                if not any(isinstance(e, (Affine, Conv, AvgPool)) and getattr(e, "kind", "") != "noop"
                           for e in below):
                    return None
            elif linear.report.fused and _as_linear(linear) and \
                    _emitted(linear) <= len(block_nodes(inner, layout.tensor)):
                return linear
        return decision

    def _worth_reporting(self, expr: Expr, decision: Decision) -> bool:
        """A chain left unfused is reported when it has an affine op to fold (Conv→BN, BN→Conv)
        and fails a condition of such a fold: always for a BatchNormalization, or an op after a Conv
        (not a Linear: MatMul + Add is its own deploy form); for another op, unless it is not
        per-channel (an attention mask) or in a layout no Linear keeps. Convs in sequence that
        would cost more merged are just a network."""
        if decision.report.fused:
            return True
        if decision.report.code == "cost" or self._product_of_activations(expr) is not None:
            return False
        ops = chain_ops(expr)   # output first
        affine = [op for op in ops if isinstance(op, Affine)]
        first_conv = next((i for i, op in enumerate(ops) if isinstance(op, Conv)), None)
        conv_then_affine = first_conv is not None and first_conv > 0 and not ops[first_conv].linear
        if conv_then_affine or any(op.kind == "batchnorm" for op in affine):
            return True
        return bool(affine) and decision.report.code not in ("channels", "layout", "shape", "not_linear")

    def _product_of_activations(self, expr: Expr, source: Optional[str] = None) -> Optional[onnx.NodeProto]:
        """The Conv/MatMul/Gemm of the block that multiplies by a tensor computed from the model's
        inputs (attention's q·kᵀ, a dynamic conv): not a layer with weights, so what holds it is
        not linear in its input. A weight that is a graph input itself (fed at run time, or an
        initializer listed as one), or a random draw, is still a weight that does not fold
        (code operand, and the reason says why)."""
        for node in block_nodes(expr, source):
            if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1:
                weight = node.input[1]
                if weight in self.index.producer and self.index.try_value(weight) is None \
                        and self.index.reads_an_input(weight):
                    return node
        return None

    def _decide_from(self, expr: Expr, source: str) -> Decision:
        ctx, failure = self.context(expr, source)
        failure = failure or self.exclusivity(expr, source)
        value = None
        if failure is None:
            try:
                value = evaluate_block(expr, ctx)
            except NotExact as exc:
                failure = exc
        if value is not None and (value.regroup is not None or value.reshape is not None):
            # a Flatten/Reshape inside: one Linear, with the input's shape or then reshaped
            if value.reshape is None:
                failure = output_shape_kept(value, ctx, self.shapes.get(source, (None, None))[0])
                target = None if failure is None else trailing_reshape(value, ctx)
                if target is not None:
                    value, failure = replace(value, reshape=target), None
            if failure is None and not as_linear(value, ctx, expr):
                failure = NotExact("a Flatten/Reshape inside a block that is not one Gemm or MatMul", code="shape")
        if isinstance(failure, TooCostly):
            return self._decision(expr, source, None, failure, block_shape(expr, ctx), exact=True)
        if failure is None:
            shape = block_shape(expr, ctx)
            rule = first_accepting(self.rules, shape)
            if rule is None:
                inner = _peel(expr)
                if inner is not None:
                    decision = self.decide(inner)
                    if decision is not None and decision.report.fused:
                        return decision
                return self._decision(expr, source, None,
                                      NotExact(f"no enabled rule accepts {shape.describe()}", code="no_rule"), shape,
                                      exact=True)
            value, dtype, risk, failure = self._in_dtype(expr, source, value)
            return self._decision(expr, source, rule.name, failure, shape, value, ctx=ctx, dtype=dtype, risk=risk)
        shape = block_shape(expr, ctx) if ctx is not None else None
        return self._decision(expr, source, None, failure, shape)

    def context(self, expr: Expr, source: str) -> Tuple[Optional[Context], Optional[NotExact]]:
        all_convs = [e for e in block_exprs(expr, source) if isinstance(e, Conv)]
        convs = [c for c in all_convs if c.weight is not None]
        if not convs:
            broken = next((c for c in all_convs if c.problem), None)
            if broken is None:
                return None, NotExact("the block has no conv", code="not_linear")
            return None, NotExact(broken.problem, code="operand", nodes=[n.name for n in broken.nodes])
        product = self._product_of_activations(expr, source)
        if product is not None:
            return None, NotExact(f"{product.op_type} '{product.name}' multiplies by an activation "
                                  f"('{product.input[1]}'): not linear in the block input", code="not_linear",
                                  nodes=[product.name])
        ranks = {c.weight.ndim - 2 for c in convs}
        if len(ranks) != 1:
            return None, NotExact("branches are convolutions of different spatial ranks", code="geometry")
        rank = ranks.pop()
        dims, dtype = self.shapes.get(source, (None, None))
        if dtype is not None and np.dtype(dtype) not in (np.float32, np.float16, np.float64):
            return None, NotExact(f"the block input has dtype {np.dtype(dtype).name}; only float16/32/64 are fused",
                                  code="dtype")
        try:
            layout = source_layout(expr, source, rank)
        except NotExact as exc:
            return None, exc
        canonical = None
        if dims is not None and len(dims) == rank + 2:
            canonical = [dims[layout.index(axis)] for axis in range(rank + 2)]
        channels = canonical[1] if canonical is not None else None
        readers = [c for c in convs if c.input.tensor == source]
        if readers:
            from_weights = readers[0].weight.shape[1] * readers[0].group
            if channels is not None and channels != from_weights:
                return None, NotExact(f"'{source}' has {channels} channels but its conv reads {from_weights}",
                                      code="channels", nodes=[n.name for n in readers[0].nodes])
            channels = from_weights
        if channels is None and dims is not None and len(dims) != rank + 2:
            op = "Gemm/MatMul" if all(c.linear for c in convs) else "conv"
            return None, NotExact(f"'{source}' has rank {len(dims)} but the block's {op} reads rank {rank + 2}: "
                                  f"a Reshape between them changes the rank", code="shape")
        if channels is None or not 0 < channels <= MAX_CHANNELS:
            return None, NotExact(f"the channel count of '{source}' is unknown or implausible", code="channels")
        spatial = tuple(canonical[2:]) if canonical is not None else None
        # a padding value stored in the model rounds like its weights: compare at their precision
        stored = np.dtype(dtype) if dtype is not None else np.dtype(convs[0].weight.dtype)
        eps = float(np.finfo(stored).eps) if stored.kind == "f" else float(np.finfo(np.float32).eps)
        return Context(source, channels, rank, spatial, layout, self.options.allow_larger, eps), None

    def exclusivity(self, expr: Expr, source: str) -> Optional[NotExact]:
        """Every tensor inside the block is read only inside it and is not a graph output; a
        reader of its shape or dtype only counts as inside when it dies with the block (it
        computes nothing but the block's parameters: the dynamo exporter's CastLike(1, y))."""
        nodes = block_nodes(expr, source)
        inside = {id(n) for n in nodes}
        dying = None
        for node in nodes:
            for tensor in node.output:
                if not tensor or tensor == expr.tensor:
                    continue
                if tensor in self.index.outputs:
                    return NotExact(f"'{tensor}' inside the block is a graph output", code="shared", nodes=[node.name])
                for consumer in self.index.consumers.get(tensor, ()):
                    if id(consumer) in inside:
                        continue
                    if any(r is consumer for r in self.index.shape_readers.get(tensor, ())):
                        dying = self.parameter_nodes(nodes, source) if dying is None else dying
                        if id(consumer) in dying:
                            continue
                    return NotExact(f"'{tensor}' inside the block is also read by '{consumer.name or consumer.op_type}'",
                                    code="shared", nodes=[node.name, consumer.name])
        return None

    def parameter_nodes(self, nodes, source: str) -> Set[int]:
        """Nodes outside the block whose every output is read only by the block or by other such
        nodes (and is no graph output): the block's parameter subgraphs, removed with it."""
        inside = {id(n) for n in nodes}
        dying: Set[int] = set()

        def only_feeds_the_block(node) -> bool:
            return all(o not in self.index.outputs and
                       all(id(c) in inside or id(c) in dying for c in self.index.consumers.get(o, ()))
                       for o in node.output if o)

        stack = [self.index.producer[i] for n in nodes for i in n.input if i and i != source and i in self.index.producer]
        while stack:
            node = stack.pop()
            if id(node) in inside or id(node) in dying or not only_feeds_the_block(node):
                continue
            dying.add(id(node))
            # a producer refused before may qualify now that this reader is known to die
            stack.extend(self.index.producer[i] for i in reads([node]) if i != source and i in self.index.producer)
        return dying

    def _decision(self, expr, source, rule, failure: Optional[NotExact], shape, value=None, ctx=None, dtype=None,
                  risk=None, exact=False) -> Decision:
        """The decision, whole: nothing changes it afterwards (the rewrite records its block
        check in the report, and lets the arrays go once written)."""
        evaluated = failure is None or value is not None   # (an exact block whose weights do not fit its dtype)
        nodes = block_nodes(expr, source) if evaluated else _top_nodes(expr) or block_nodes(expr, source)
        kernel = list(value.geometry.kernel) if value is not None else None
        report = BlockReport(output=expr.tensor, input=source, fused=failure is None and rule is not None, rule=rule,
                             reason=str(failure) if failure else None, nodes=[n.name for n in nodes],
                             code=failure.code if failure else None,
                             reason_nodes=[n for n in failure.nodes if n] if failure else [],
                             shape=shape.describe() if shape is not None else "", kernel=kernel, risk=risk)
        return Decision(report, expr, value if failure is None else None, dtype, ctx, exact)

    def _in_dtype(self, expr: Expr, source: str, value: ConvMap):
        """(the fused conv in the dtype of the block's conv weights, that dtype, the numeric risk
        of the exact float64 weights, None), or a failure when they do not fit in it."""
        convs = [e for e in block_exprs(expr, source) if isinstance(e, Conv)]
        dtypes = {np.dtype(c.weight.dtype) for c in convs}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float16, np.float64):
            return value, None, None, NotExact(f"conv weights have dtype(s) {sorted(d.name for d in dtypes)}; "
                                               f"one of float16/32/64 is needed", code="dtype")
        dtype = dtypes.pop()
        # cast once, now (the float64 kernels of every block need not wait for the rewrite); a
        # weight beyond the dtype's range becomes ±inf, a NaN stays NaN: one pass finds both
        kernel, bias = value.kernel.astype(dtype), value.bias.astype(dtype)
        if not (np.isfinite(kernel).all() and np.isfinite(bias).all()):
            reason = "a parameter of the block is NaN" if np.isnan(value.kernel).any() or \
                np.isnan(value.bias).any() else f"fused weights exceed the {dtype.name} range"
            return value, dtype.type, None, NotExact(reason, code="dtype")
        risk = numeric_risk(value.kernel, value.bias)
        return replace(value, kernel=kernel, bias=bias), dtype.type, risk, None


def _said_already(d: Decision, earlier: List[Decision]) -> Optional[int]:
    """The earlier unfused block this one is inside of, reported for the same reason (a Linear's
    MatMul under its bias Add): one report says it for both."""
    if d.report.fused:
        return None
    for k, e in enumerate(earlier):
        if not e.report.fused and e.report.reason == d.report.reason and e.expr is not None and \
                any(x.tensor == d.expr.tensor for x in block_exprs(e.expr, e.report.input)):
            return k
    return None


def _emitted(d: Decision) -> int:
    """How many nodes _build_conv writes for a block."""
    if _as_linear(d):
        return (1 if d.value.geometry.rank == 0 else 2) + (d.value.reshape is not None)
    canonical = tuple(range(d.value.geometry.rank + 2))
    return 1 + (d.ctx.layout != canonical) + (d.value.layout != canonical)


def _as_linear(d: Decision) -> bool:
    return as_linear(d.value, d.ctx, d.expr)


def as_linear(value: ConvMap, ctx: Context, expr: Expr) -> bool:
    """A block of Gemm/MatMul stays one: a pointwise, ungrouped map with channels last at both
    ends (rank 2: always) is written as Gemm (rank 2) or MatMul + Add, not a Conv."""
    rank = value.geometry.rank
    last = (0,) + tuple(range(2, rank + 2)) + (1,) if rank else (0, 1)
    linear = any(isinstance(e, Conv) and e.linear for e in block_exprs(expr, ctx.source))
    return linear and value.geometry.is_pointwise and value.group == 1 and ctx.layout == last and value.layout == last


def graph_tensor_below(op: Expr) -> Optional[str]:
    """The tensor of the graph an op reads: its input, or below the exprs internal to its node
    (a MatMul's Transpose to channels first has no tensor of its own); None past the walk."""
    e = op.input
    while not e.nodes and not isinstance(e, (Leaf, Shared)):
        e = e.input
    return e.tensor


def _tensors_below(op: Expr, source: str) -> List[str]:
    """The graph tensors of a chain between `source` and the op's input: first the tensor the op
    reads (graph_tensor_below), then the others deepest first."""
    out, e = [], op.input
    while e is not None and not isinstance(e, (Leaf, Shared, Sum)) and e.tensor != source:
        if e.nodes:
            out.append(e.tensor)
        e = getattr(e, "input", None)
    first = graph_tensor_below(op)
    return ([first] if first is not None and first != source else []) + [t for t in reversed(out) if t != first]


def _top_nodes(expr: Expr, whole_bag: bool = False) -> List[onnx.NodeProto]:
    """The nodes of a block left unfused that no other candidate should start from: its
    post-ops and its top sum. Nested sums stay free when the block is not exact: a nested sum
    can be a block of its own (RepGhost's inside a residual Add over another input). When the
    block is exact but unwanted (no rule, too costly), every sum of its bag is taken: fusing a
    part of it would leave a model that is neither the training form nor the deploy form.
    Branches stay free either way: a branch is a Conv→BN chain of its own."""
    out = []
    e = expr
    while isinstance(e, Affine):
        out.extend(e.nodes)
        e = e.input
    if isinstance(e, Sum):
        out.extend(e.nodes)
        if whole_bag:
            out.extend(n for s in bag_sums(e) for n in s.nodes)
    return out


def _peel(expr: Expr) -> Optional[Expr]:
    """The block without its outermost post-op, when it has one above a sum: an op of its own
    node (the op stays in the graph after the inner block, so it must not share a node with it)."""
    if isinstance(expr, Affine) and top_terms(expr)[1]:   # the sum at the top, not one beyond the input
        inner = {id(n) for n in block_nodes(expr.input)}
        if not any(id(n) in inner for n in expr.nodes):
            return expr.input
    return None
