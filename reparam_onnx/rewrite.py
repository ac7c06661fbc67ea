"""The driver: find candidate blocks, decide, replace each fused block by one Conv.

Before: an Add/Sum tree (or a Conv→BN chain) whose terms are linear in one tensor x.
After:  Conv(x, W, B) writing the block's original output tensor.
Conditions: linear.evaluate succeeds (exactness), a rule accepts the block's shape.
The graph is edited in place, node by node: only the tensors that change are touched,
untouched weights are never copied, and the fused Conv takes the position of the
block's last node, so the node order stays topological.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import onnx

from .graph import GraphIndex, reads, unique_name
from .layout import cancel_transposes
from .linear import (COSTLY, Context, ConvMap, NotExact, TooCostly, bag_sums, chain_ops, choose_source, cut,
                     evaluate_block, inverse, source_layout, top_terms)
from .report import BlockReport
from .risk import numeric_risk
from .rulebook import Rule, block_shape, first_accepting
from .shapes import static_shapes
from .terms import ROOT_OPS, Affine, Conv, Expr, Sum, Walker, block_exprs, block_nodes
from .verify import check_block, random_array

MAX_PASSES = 8
RULE_KEY = "reparam_onnx.rule"   # metadata_props entry of every node a fusion writes: the rule's name
MAX_CHANNELS = 1 << 20


@dataclass
class Decision:
    report: BlockReport
    expr: Expr                       # the part of the graph the decision is about
    value: Optional[ConvMap] = None  # the fused conv, when fused
    dtype: Optional[type] = None
    ctx: Optional[Context] = None
    exact: bool = False              # the block evaluates to one conv (it may still be unwanted: rule, cost)


def op_counts(graph: onnx.GraphProto) -> Dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


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


class Fuser:
    """One pass over one graph."""

    def __init__(self, model: onnx.ModelProto, options: FuseOptions):
        self.model = model
        self.graph = model.graph
        self.options = options
        self.rules = options.rules
        self.shapes = static_shapes(model)
        self.index = GraphIndex(self.graph, self.shapes, default_opset(model), options.initializers_as_constants,
                                options.external_base)
        self.walker = Walker(self.index)

    # ---------------------------------------------------------------- deciding

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
            out.append(decision)
            nodes = block_nodes(decision.expr, decision.report.input) if decision.report.fused \
                else _top_nodes(decision.expr, whole_bag=decision.exact)
            claimed.update(id(n) for n in nodes)
        return out

    def decide(self, expr: Expr) -> Optional[Decision]:
        source = choose_source(expr)
        if source is None:
            return None
        decision = self._decide_from(expr, source)
        if top_terms(expr)[1]:
            return decision
        if decision.report.fused:
            # a chain is rewritten only into fewer nodes (MatMul→Add is already its own deploy form)
            return decision if _emitted(decision) < len(block_nodes(expr, source)) else None
        # A chain is first tried from as deep as the walk went (to fold a BN before an unpadded
        # conv, or compose two convs); when that fails, the chain from the outermost conv's input.
        conv = next((e for e in block_exprs(expr, source) if isinstance(e, Conv)), None)
        shorter = None if conv is None or conv.input.tensor == source else self.decide(cut(expr, conv.input.tensor))
        if shorter is not None:
            return shorter if shorter.report.fused or self._worth_reporting(expr, decision) else decision
        return decision if self._worth_reporting(expr, decision) else None

    @staticmethod
    def _worth_reporting(expr: Expr, decision: Decision) -> bool:
        """A chain left unfused is reported when it has an affine op to fold (Conv→BN, BN→Conv):
        convs in sequence that would cost more merged, or do not merge, are just a network."""
        if decision.report.fused:
            return True
        if decision.exact and decision.report.reason and decision.report.reason.startswith(COSTLY):
            return False
        return any(isinstance(op, Affine) for op in chain_ops(expr))

    def _decide_from(self, expr: Expr, source: str) -> Decision:
        ctx, problem = self.context(expr, source)
        value, reason = None, problem or self.exclusivity(expr, source)
        costly = False
        if reason is None:
            try:
                value = evaluate_block(expr, ctx)
            except TooCostly as exc:
                reason, costly = str(exc), True
            except NotExact as exc:
                reason = str(exc)
        if costly:
            decision = self._decision(expr, source, None, reason, block_shape(expr, ctx))
            decision.exact = True
            return decision
        if reason is None:
            shape = block_shape(expr, ctx)
            rule = first_accepting(self.rules, shape)
            if rule is None:
                inner = _peel(expr)
                if inner is not None:
                    decision = self.decide(inner)
                    if decision is not None and decision.report.fused:
                        return decision
                decision = self._decision(expr, source, None, f"no enabled rule accepts {shape.describe()}", shape)
                decision.exact = True
                return decision
            decision = self._decision(expr, source, rule.name, None, shape, value)
            decision.ctx = ctx
            return self._check_dtype(decision)
        shape = block_shape(expr, ctx) if ctx is not None else None
        return self._decision(expr, source, None, reason, shape)

    def context(self, expr: Expr, source: str) -> Tuple[Optional[Context], Optional[str]]:
        all_convs = [e for e in block_exprs(expr, source) if isinstance(e, Conv)]
        convs = [c for c in all_convs if c.weight is not None]
        if not convs:
            return None, next((c.problem for c in all_convs), "the block has no conv")
        ranks = {c.weight.ndim - 2 for c in convs}
        if len(ranks) != 1:
            return None, "branches are convolutions of different spatial ranks"
        rank = ranks.pop()
        dims, dtype = self.shapes.get(source, (None, None))
        if dtype is not None and np.dtype(dtype) not in (np.float32, np.float16, np.float64):
            return None, f"the block input has dtype {np.dtype(dtype).name}; only float16/32/64 are fused"
        try:
            layout = source_layout(expr, source, rank)
        except NotExact as exc:
            return None, str(exc)
        canonical = None
        if dims is not None and len(dims) == rank + 2:
            canonical = [dims[layout.index(axis)] for axis in range(rank + 2)]
        channels = canonical[1] if canonical is not None else None
        readers = [c for c in convs if c.input.tensor == source]
        if readers:
            from_weights = readers[0].weight.shape[1] * readers[0].group
            if channels is not None and channels != from_weights:
                return None, f"'{source}' has {channels} channels but its conv reads {from_weights}"
            channels = from_weights
        if channels is None or not 0 < channels <= MAX_CHANNELS:
            return None, f"the channel count of '{source}' is unknown or implausible"
        spatial = tuple(canonical[2:]) if canonical is not None else None
        return Context(source, channels, rank, spatial, layout, self.options.allow_larger), None

    def exclusivity(self, expr: Expr, source: str) -> Optional[str]:
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
                    return f"'{tensor}' inside the block is a graph output"
                for consumer in self.index.consumers.get(tensor, ()):
                    if id(consumer) in inside:
                        continue
                    if any(r is consumer for r in self.index.shape_readers.get(tensor, ())):
                        dying = self._parameter_nodes(nodes, source) if dying is None else dying
                        if id(consumer) in dying:
                            continue
                    return f"'{tensor}' inside the block is also read by '{consumer.name or consumer.op_type}'"
        return None

    def _parameter_nodes(self, nodes, source: str) -> Set[int]:
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

    def _decision(self, expr, source, rule, reason, shape, value=None) -> Decision:
        nodes = block_nodes(expr, source) if reason is None else _top_nodes(expr) or block_nodes(expr, source)
        kernel = list(value.geometry.kernel) if value is not None else None
        report = BlockReport(output=expr.tensor, input=source, fused=reason is None and rule is not None, rule=rule,
                             reason=reason, nodes=[n.name for n in nodes],
                             shape=shape.describe() if shape is not None else "", kernel=kernel)
        return Decision(report, expr, value)

    def _check_dtype(self, decision: Decision) -> Decision:
        """Fused weights take the dtype of the block's conv weights; they must fit in it."""
        convs = [e for e in block_exprs(decision.expr, decision.report.input) if isinstance(e, Conv)]
        dtypes = {np.dtype(c.weight.dtype) for c in convs}
        reason = None
        if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float16, np.float64):
            reason = f"conv weights have dtype(s) {sorted(d.name for d in dtypes)}; one of float16/32/64 is needed"
        else:
            dtype = dtypes.pop()
            limit = np.finfo(dtype).max
            value = decision.value
            if np.isnan(value.kernel).any() or np.isnan(value.bias).any():
                reason = "a parameter of the block is NaN"
            elif not (np.all(np.abs(value.kernel) <= limit) and np.all(np.abs(value.bias) <= limit)):
                reason = f"fused weights exceed the {dtype.name} range"
            else:
                decision.report.risk = numeric_risk(value.kernel, value.bias)   # of the exact float64 weights
                # cast once, now: the float64 kernels of every block need not wait for the rewrite
                value.kernel, value.bias = value.kernel.astype(dtype), value.bias.astype(dtype)
            decision.dtype = dtype.type
        if reason:
            decision.report.fused, decision.report.reason = False, reason
        return decision

    # ---------------------------------------------------------------- rewriting

    def apply(self, decisions: Sequence[Decision]) -> List[Tuple[Decision, List[onnx.NodeProto]]]:
        """Replace every fused block by its Conv; returns each block replaced, with the nodes that replaced it."""
        fused = [d for d in decisions if d.report.fused]
        if not fused:
            return []
        graph = self.graph
        names = _used_names(graph)
        read_before = reads(graph.node) | {o.name for o in graph.output}
        replace: Dict[int, List[onnx.NodeProto]] = {}
        removed: Set[int] = set()
        order = {id(n): i for i, n in enumerate(graph.node)}
        applied = []
        for d in fused:
            nodes = sorted(block_nodes(d.expr, d.report.input), key=lambda n: order[id(n)])
            root = self.index.producer[d.expr.tensor]
            new_nodes, params = self._build_conv(d, root, names)
            for node in new_nodes:   # provenance: which rule made the node
                entry = node.metadata_props.add()
                entry.key, entry.value = RULE_KEY, d.report.rule or ""
            if self.options.check_blocks and not self._check_alone(d, nodes, new_nodes, params):
                continue
            applied.append((d, new_nodes))
            for name, array in params.items():
                add_initializer(graph, name, array)
            removed.update(id(n) for n in nodes)
            replace[id(root)] = new_nodes
            d.report.nodes = [n.name for n in nodes]
        kept = []
        for node in graph.node:
            if id(node) in replace:
                kept.extend(replace[id(node)])
            elif id(node) not in removed:
                kept.append(node)
        _remove_dead(graph, kept, read_before, self.index.initializers_are_constant)
        return applied

    def _check_alone(self, d: Decision, nodes, new_nodes, new_params) -> bool:
        """Run the block and its replacement alone on random inputs; unfuse the block when they differ."""
        source, output = d.report.input, d.expr.tensor
        produced = {o for n in nodes for o in n.output}
        params = {i for n in nodes for i in n.input if i and i != source and i not in produced}
        try:
            values = {name: np.asarray(self.index.value(name)) for name in params}
        except Exception as exc:  # a parameter that folded before must fold again; say so if not
            d.report.fused, d.report.reason = False, f"isolated check could not run: {exc}"
            return False
        dtype = self.shapes.get(source, (None, None))[1] or d.dtype
        try:
            runs = check_inputs(d.ctx, d.value.geometry, self.shapes.get(source, (None, None))[0], dtype,
                                self.options.seed)
        except ValueError as exc:
            d.report.fused, d.report.reason = False, f"isolated check could not run: {exc}"
            return False
        result = check_block(source, dtype, output, (nodes, values), (new_nodes, new_params), self.model, runs,
                             self.options.seed, self.options.rtol, self.options.atol)
        d.report.check = result.worst
        if not result.passed:
            d.report.fused = False
            d.report.reason = (f"the block run alone differs from its fused conv: max|Δ|/max|ref| = "
                               f"{result.worst:.2e} > rtol {result.tolerance['rtol']:.0e}"
                               if result.ran else f"isolated check could not run: {result.message}")
        return result.passed

    def _build_conv(self, d: Decision, root: onnx.NodeProto, names: Set[str]):
        value, dtype = d.value, d.dtype
        base = root.name or d.expr.tensor
        node_name = unique_name(f"{base}/reparam", names)
        w_name = unique_name(f"{base}/reparam.weight", names)
        b_name = unique_name(f"{base}/reparam.bias", names)
        g = value.geometry
        source, output = d.report.input, d.expr.tensor
        canonical = tuple(range(g.rank + 2))
        if _as_linear(d):
            return _build_linear(d, node_name, w_name, b_name, names)
        nodes = []
        if d.ctx.layout != canonical:   # the block input is not (N, C, ...): lay it out for the conv
            to_canonical = unique_name(f"{base}/reparam.input", names)
            nodes.append(onnx.helper.make_node("Transpose", [source], [to_canonical], name=to_canonical,
                                               perm=list(inverse(d.ctx.layout))))
            source = to_canonical
        conv_out = output if value.layout == canonical else unique_name(f"{base}/reparam.output", names)
        nodes.append(onnx.helper.make_node(
            "Conv", [source, w_name, b_name], [conv_out], name=node_name,
            kernel_shape=list(g.kernel), strides=list(g.strides), pads=list(g.pads_begin + g.pads_end),
            dilations=list(g.dilations), group=value.group))
        if value.layout != canonical:   # and give the output the layout the graph had
            nodes.append(onnx.helper.make_node("Transpose", [conv_out], [output], name=unique_name(f"{base}/reparam.transpose", names),
                                               perm=list(value.layout)))
        return nodes, {w_name: value.kernel.astype(dtype, copy=False), b_name: value.bias.astype(dtype, copy=False)}


def _emitted(d: Decision) -> int:
    """How many nodes _build_conv writes for a block."""
    if _as_linear(d):
        return 1 if d.value.geometry.rank == 0 else 2
    canonical = tuple(range(d.value.geometry.rank + 2))
    return 1 + (d.ctx.layout != canonical) + (d.value.layout != canonical)


def _as_linear(d: Decision) -> bool:
    """A block of Gemm/MatMul stays one: a pointwise, ungrouped map with channels last at both
    ends (rank 2: always) is written as Gemm (rank 2) or MatMul + Add, not a Conv."""
    value, rank = d.value, d.value.geometry.rank
    last = (0,) + tuple(range(2, rank + 2)) + (1,) if rank else (0, 1)
    g = value.geometry
    pointwise = all(k == 1 for k in g.kernel) and all(s == 1 for s in g.strides) and g.unpadded
    linear = any(isinstance(e, Conv) and e.linear for e in block_exprs(d.expr, d.report.input))
    return linear and pointwise and value.group == 1 and d.ctx.layout == last and value.layout == last


def _build_linear(d: Decision, node_name: str, w_name: str, b_name: str, names: Set[str]):
    """Gemm(x, W[O, C], b, transB=1) for a rank-2 input, else MatMul(x, Wᵀ[C, O]) + b."""
    value, dtype = d.value, d.dtype
    kernel = value.kernel.reshape(value.kernel.shape[:2]).astype(dtype, copy=False)
    bias = value.bias.astype(dtype, copy=False)
    source, output = d.report.input, d.expr.tensor
    if value.geometry.rank == 0:
        node = onnx.helper.make_node("Gemm", [source, w_name, b_name], [output], name=node_name, transB=1)
        return [node], {w_name: kernel, b_name: bias}
    product = unique_name(f"{node_name}.matmul", names)
    nodes = [onnx.helper.make_node("MatMul", [source, w_name], [product], name=node_name),
             onnx.helper.make_node("Add", [product, b_name], [output], name=unique_name(f"{node_name}.bias", names))]
    return nodes, {w_name: np.ascontiguousarray(kernel.T), b_name: bias}


def add_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray) -> None:
    """A new initializer written straight into the graph, as numpy_helper.from_array would make
    it (from_array then extend would copy the data once more)."""
    tensor = graph.initializer.add()
    tensor.dims.extend(array.shape)
    tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.raw_data = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    tensor.name = name


def check_sizes(spatial: Optional[Sequence[Optional[int]]], geometry) -> List[tuple]:
    """Canonical spatial sizes to run a fused block alone at: its static size; on a dynamic
    axis, sizes from one its taps can read, covering every residue modulo the stride (and
    both parities), since that is what a conv's output grid depends on."""
    rank = geometry.rank
    spatial = tuple(spatial) if spatial is not None else (None,) * rank
    dynamic = [a for a in range(rank) if spatial[a] is None]
    count = max([geometry.strides[a] for a in dynamic] + [2]) if dynamic else 1
    return [tuple(spatial[a] if spatial[a] is not None else geometry.extent(a) + geometry.strides[a] + r
                  for a in range(rank)) for r in range(count)]


def check_inputs(ctx: Context, geometry, dims, dtype, seed: int) -> List[Dict[str, np.ndarray]]:
    """Random inputs for the block input at check_sizes: channels from the weights (ctx), batch
    from the graph where static (else 1), laid out as the graph has it."""
    rng = np.random.default_rng(seed)
    batch = dims[ctx.layout.index(0)] if dims is not None and len(dims) == len(ctx.layout) else None
    runs = []
    for size in check_sizes(ctx.spatial, geometry):
        canonical = (batch or 1, ctx.channels) + size
        actual = [canonical[axis] for axis in ctx.layout]
        runs.append({ctx.source: random_array(actual, dtype, rng, ctx.source)})
    return runs


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




def _used_names(graph: onnx.GraphProto) -> Set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
    return names


def _remove_dead(graph: onnx.GraphProto, kept: List[onnx.NodeProto], read_before: Set[str],
                 drop_inputs: bool = False) -> None:
    """Make `kept` the graph's nodes and drop what a rewrite left unread: tensors read before
    and not now lose their producers (constant subgraphs, transitively) and their initializers.

    An initializer that is also a graph input stays (it is part of the model's interface)
    unless drop_inputs: then it was treated as a constant, and goes with its input entry.
    Initializers and nodes that nothing read before stay: they are not the rewrite's doing.
    """
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in kept for o in n.output}
    uses = Counter()
    for node in kept:
        uses.update(reads([node]))
    dead_nodes: Set[int] = set()
    pending = sorted(name for name in read_before if not uses[name] and name not in outputs)
    visited = set(pending)
    while pending:
        name = pending.pop()
        visited.add(name)
        node = producer.get(name)
        if node is None or id(node) in dead_nodes:
            continue
        if any(uses[o] or o in outputs for o in node.output if o):
            continue
        dead_nodes.add(id(node))
        for inp in reads([node]):
            uses[inp] -= 1
            pending.append(inp)
    final = [n for n in kept if id(n) not in dead_nodes]
    live = reads(final) | outputs
    graph_inputs = {i.name for i in graph.input}
    initializers = {t.name for t in graph.initializer}
    dead_inits = {name for name in visited if name not in live and name in initializers
                  and (drop_inputs or name not in graph_inputs)}
    for i in reversed(range(len(graph.input))):
        if graph.input[i].name in dead_inits:
            del graph.input[i]
    # Delete by index: rebuilding the list would copy every weight.
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in dead_inits:
            del graph.initializer[i]
    del graph.node[:]
    graph.node.extend(final)
    present = {o for n in final for o in n.output} | {i.name for i in graph.input}
    infos = [v for v in graph.value_info if v.name in present]
    if len(infos) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(infos)


def fuse_graph(model: onnx.ModelProto, options: FuseOptions, write: bool = True) -> Tuple[List[BlockReport], List[str]]:
    """Fuse in place, pass after pass until nothing changes; returns every block decided, and notes.

    With write=False the model is analysed only (one pass, nothing replaced). The fused
    blocks reported are the fused Convs of the result, one each: a block whose Conv a later
    pass takes into a larger block is reported as part of that block (`absorbed`). After
    fusing, inverse Transposes around the fused blocks cancel.

    IR < 4 requires every initializer to be a graph input: the new ones are listed at the end.
    Until then the graph is rewritten as IR 4, where shape inference sees initializers that
    are not inputs (and a weight the rewrite made stays a constant for the next pass).
    """
    graph = model.graph
    ir_version = model.ir_version
    initializers_before = {t.name for t in graph.initializer}
    if write:
        model.ir_version = max(ir_version, 4)
    try:
        # NaN or inf in weights and statistics is arithmetic, not an error: non-finite fused
        # weights leave their block unfused (Fuser._check_dtype), and numpy prints no warning.
        with np.errstate(all="ignore"):
            result = _fuse_passes(model, options, write)
    finally:
        model.ir_version = ir_version
    if ir_version < 4:
        _list_as_inputs(graph, [t for t in graph.initializer if t.name not in initializers_before])
    return result


def _fuse_passes(model: onnx.ModelProto, options: FuseOptions, write: bool) -> Tuple[List[BlockReport], List[str]]:
    fused: List[BlockReport] = []
    made: Dict[str, BlockReport] = {}      # name of a node a fusion created → the block it fused
    last: List[Decision] = []
    for _ in range(MAX_PASSES):
        fuser = Fuser(model, options)
        last = fuser.decisions()
        if not write:
            fused.extend(d.report for d in reversed(last) if d.report.fused)   # graph order
            break
        applied = fuser.apply(last)
        for d, new_nodes in reversed(applied):
            _take_in_absorbed(d.report, made, fused)
            made.update((n.name, d.report) for n in new_nodes)
            fused.append(d.report)
        if not applied:
            break
    # what is fused, and what the last pass left (earlier verdicts may be stale)
    left = [d.report for d in reversed(last) if not d.report.fused]
    notes = []
    created = {n.name for n in model.graph.node if n.op_type == "Transpose" and n.name in made}
    pairs = _cancel_transposes(model, options, created) if created else 0
    if pairs:
        notes.append(f"cancelled {pairs} pair(s) of inverse Transposes around fused blocks")
    if fused:
        dropped = drop_unvouched_value_info(model)
        if dropped:
            notes.append(f"dropped {dropped} value_info entr{'y' if dropped == 1 else 'ies'} whose shapes the graph "
                         f"does not guarantee (a runtime that trusts them can fail on the rewritten graph)")
    return fused + left, notes


def drop_unvouched_value_info(model: onnx.ModelProto) -> int:
    """Keep the value_info entries the guaranteed shapes agree with (static_shapes: declared
    input dims and initializers, inferred): an entry is dropped when it names a static dim the
    graph does not guarantee or contradicts, or another element type. A file may carry stale
    entries from an earlier export; onnxruntime's memory planner trusts them, and a rewritten
    graph (its nodes in another order) can fail where the original ran by luck."""
    shapes = static_shapes(model)
    keep = [info for info in model.graph.value_info if _vouched(info, shapes.get(info.name))]
    dropped = len(model.graph.value_info) - len(keep)
    if dropped:
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
    return dropped


def _vouched(info: onnx.ValueInfoProto, known) -> bool:
    if not info.type.HasField("tensor_type"):
        return True
    t = info.type.tensor_type
    if known is None:
        return not t.HasField("shape") or all(not d.HasField("dim_value") for d in t.shape.dim)
    dims, dtype = known
    if t.elem_type and dtype is not None and onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) != dtype:
        return False
    if not t.HasField("shape"):
        return True
    if dims is None:
        return all(not d.HasField("dim_value") for d in t.shape.dim)
    if len(t.shape.dim) != len(dims):
        return False
    return all(not d.HasField("dim_value") or d.dim_value == g for d, g in zip(t.shape.dim, dims))


def _take_in_absorbed(report: BlockReport, made: Dict[str, BlockReport], fused: List[BlockReport]) -> None:
    """A block that took in Convs fused by an earlier pass replaces their reports: its nodes
    become the original nodes of them all, and `absorbed` names the blocks it took in."""
    nodes, absorbed = [], []
    for name in report.nodes:
        earlier = made.get(name)
        if earlier is None:
            nodes.append(name)
        elif all(earlier is not a for a in absorbed):
            absorbed.append(earlier)
            nodes.extend(earlier.nodes)
    if absorbed:
        fused[:] = [r for r in fused if all(r is not a for a in absorbed)]
        report.nodes = nodes
        report.absorbed = [entry for a in absorbed for entry in [{"rule": a.rule, "output": a.output}] + a.absorbed]


def _cancel_transposes(model: onnx.ModelProto, options: FuseOptions, created: Set[str]) -> int:
    """Cancel inverse Transpose pairs that begin or end at one the fusion created; drop what they
    left unread. Returns how many pairs."""
    graph = model.graph
    read_before = reads(graph.node) | {o.name for o in graph.output}
    pairs = 0
    for _ in range(MAX_PASSES):
        index = GraphIndex(graph, static_shapes(model), default_opset(model), options.initializers_as_constants)
        done = cancel_transposes(model, index, created)
        pairs += done
        if not done:
            break
    if pairs:
        _remove_dead(graph, list(graph.node), read_before, options.initializers_as_constants)
    return pairs


def _list_as_inputs(graph: onnx.GraphProto, initializers: Sequence[onnx.TensorProto]) -> None:
    """IR < 4: every initializer is also a graph input, with its type and shape."""
    listed = {i.name for i in graph.input}
    for t in initializers:
        if t.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
