"""The block check: a fused block run alone in onnxruntime against the nodes it replaces.

The block's input takes the channels its weights read and, on a dynamic spatial axis, one
size per residue modulo the block's stride; parameters the block computes from shapes or
from its input are computed in the check too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .analyse import Analyser, Decision
from .linear import Context
from .shapes import BATCH
from .verify import check_block, random_array


@dataclass
class Verdict:
    """A block run alone against its replacement: `reason` says why it fails (None: it passed)."""
    reason: Optional[str] = None
    worst: Optional[float] = None


def check_alone(analyser: Analyser, d: Decision, nodes, new_nodes, new_params, order) -> Verdict:
    """Run the block and its replacement alone on random inputs."""
    source, output = d.report.input, d.report.output   # (the expression may be let go by now: rewrite.apply)
    nodes = _with_computed_parameters(analyser, nodes, source, order)
    produced = {o for n in nodes for o in n.output}
    params = {i for n in nodes for i in n.input if i and i != source and i not in produced}
    try:
        values = {name: np.asarray(analyser.index.value(name)) for name in params}
    except Exception as exc:  # a parameter that folded before must fold again; say so if not
        return Verdict(f"isolated check could not run: {exc}")
    dtype = analyser.shapes.get(source, (None, None))[1] or d.dtype
    dims = analyser.shapes.get(source, (None, None))[0]
    for batch in (1, BATCH):
        try:
            runs = check_inputs(d.ctx, d.value.geometry, dims, dtype, analyser.options.seed, batch)
        except ValueError as exc:
            return Verdict(f"isolated check could not run: {exc}")
        result = check_block(source, dtype, output, (nodes, values), (new_nodes, new_params), analyser.model, runs,
                             analyser.options.seed, analyser.options.rtol, analyser.options.atol)
        if result.ran or runs[0][source].shape[d.ctx.layout.index(0)] != 1:
            break
        # the original block does not run at batch 1 (TorchScript bakes the traced batch into
        # some shapes): check it where the whole-model verification runs it, at BATCH
    if result.passed:
        return Verdict(worst=result.worst)
    return Verdict(f"the block run alone differs from its fused conv: max|Δ|/max|ref| = "
                   f"{result.worst:.2e} > rtol {result.tolerance['rtol']:.0e}"
                   if result.ran else f"isolated check could not run: {result.message}", result.worst)


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


def check_inputs(ctx: Context, geometry, dims, dtype, seed: int, dynamic_batch: int = 1) -> List[Dict[str, np.ndarray]]:
    """Random inputs for the block input at check_sizes: channels from the weights (ctx), batch
    from the graph where static (else `dynamic_batch`), laid out as the graph has it."""
    rng = np.random.default_rng(seed)
    batch = dims[ctx.layout.index(0)] if dims is not None and len(dims) == len(ctx.layout) else None
    runs = []
    for size in check_sizes(ctx.spatial, geometry):
        canonical = (batch or dynamic_batch, ctx.channels) + size
        actual = [canonical[axis] for axis in ctx.layout]
        runs.append({ctx.source: random_array(actual, dtype, rng, ctx.source)})
    return runs


def _with_computed_parameters(analyser: Analyser, nodes, source: str, order) -> list:
    """The block's nodes, and those of the parameters it computes from shapes or from its input
    (Reshape to Shape(t); DBB's border values Expand-ed to Shape(x)): nodes outside the block
    that die with it (Analyser.parameter_nodes) and read only constants, the block's tensors,
    its input, or one another. They run in the check as they run in the model."""
    index = analyser.index
    produced = {o for n in nodes for o in n.output} | {source}
    dying = None
    added = True
    while added:
        added = False
        params = sorted({i for n in nodes for i in n.input if i and i not in produced})
        for name in params:
            if index.try_value(name) is not None or name not in index.producer:
                continue
            dying = analyser.parameter_nodes(nodes, source) if dying is None else dying
            node = index.producer[name]
            if id(node) in dying and all(i in produced or index.try_value(i) is not None
                                         or id(index.producer.get(i)) in dying for i in node.input if i):
                nodes = sorted(list(nodes) + [node], key=lambda n: order[id(n)])
                produced.update(node.output)
                added = True
    return nodes
