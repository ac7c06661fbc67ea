"""What was fused, what was not and why, and how the result was verified."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from . import risk as _risk
from .risk import NumericRisk

# Why a block stays: BlockReport.code, one of these (the sentence in `reason` gives the figures).
REASON_CODES = {
    "not_linear": "a branch reaches an op that is not linear in the block input (Relu, MaxPool, ...)",
    "operand": "a parameter is not a usable constant (computed from an input, a broken BatchNormalization, ...)",
    "shared": "a tensor inside the block is read outside it, or is a graph output",
    "border": "padding (a Pad, a conv's own) would not see at the borders what the merged conv sees",
    "geometry": "strides, output sizes, tap alignment or a dynamic size prevent one conv",
    "channels": "channel counts, groups or per-channel constants do not fit",
    "layout": "the branches read or write their channels on different axes",
    "shape": "a Flatten/Reshape inside the block is not proven to give one Linear's output",
    "cost": "the merged conv would cost more than what it replaces (--allow-larger)",
    "no_rule": "exact, but no enabled rule names the block",
    "dtype": "the fused weights do not fit the model's dtype, or it is not float16/32/64",
    "check": "the block run alone differs from its fused form, or the check could not run",
}


@dataclass
class BlockReport:
    """One candidate block: a sum of branches over one input, or a Conv→BN chain."""
    output: str                       # the block's output tensor; the fused Conv keeps this name
    input: str                        # the block's input tensor
    fused: bool
    rule: Optional[str]               # the rule that named it (None when no rule accepted it)
    reason: Optional[str]             # why it was not fused: a sentence
    nodes: List[str]                  # names of the nodes the block consists of (or replaced)
    shape: str = ""                   # e.g. "3x3 conv+bn + 1x1 conv+bn + identity+bn"
    kernel: Optional[List[int]] = None   # spatial size of the merged kernel
    error: Optional[float] = None     # whole-model verification: max|Δ|/max|ref| of this block's output
    check: Optional[float] = None     # the block run alone against its fused conv: max|Δ|/max|ref|
    absorbed: List[Dict[str, str]] = field(default_factory=list)   # blocks fused in an earlier pass and then
                                                                   # taken into this one: {"rule", "output"}
    risk: Optional[NumericRisk] = None   # float16 range and int8 spread of the fused weights (risk.py)
    code: Optional[str] = None        # why it was not fused: a REASON_CODES key
    reason_nodes: List[str] = field(default_factory=list)   # the original graph nodes the reason is about

    @property
    def fusable(self) -> bool:
        """Exact and wanted: what --check counts."""
        return self.rule is not None and self.reason is None


@dataclass
class Verification:
    ran: bool
    passed: bool
    message: str = ""
    tolerance: Dict[str, float] = field(default_factory=dict)     # rtol, atol
    errors: Dict[str, float] = field(default_factory=dict)        # tensor -> max|Δ|/max|ref|
    inputs: Dict[str, List[int]] = field(default_factory=dict)    # the concrete input shapes of the first run
    runs: int = 0                                                 # input sets compared (odd and even sizes)
    noise: Dict[str, float] = field(default_factory=dict)         # tensor -> how far the original moves on a 1-ulp input nudge

    @property
    def worst(self) -> Optional[float]:
        return max(self.errors.values()) if self.errors else None


@dataclass
class Report:
    blocks: List[BlockReport] = field(default_factory=list)
    ops_before: Dict[str, int] = field(default_factory=dict)
    ops_after: Dict[str, int] = field(default_factory=dict)
    verification: Optional[Verification] = None
    notes: List[str] = field(default_factory=list)
    written: bool = False             # whether a fused model was produced for writing

    @property
    def fused(self) -> List[BlockReport]:
        return [b for b in self.blocks if b.fused]

    @property
    def unfused(self) -> List[BlockReport]:
        return [b for b in self.blocks if not b.fused]

    def per_rule(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for b in self.fused:
            counts[str(b.rule)] = counts.get(str(b.rule), 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["summary"] = {
            "fused": len(self.fused),
            "not_fused": len(self.unfused),
            "per_rule": self.per_rule(),
        }
        data["summary"]["risk"] = risk_summary(self)
        return data

    def to_text(self, verbose: bool = False, dry_run: bool = False) -> str:
        lines = []
        per_rule = self.per_rule()
        verb = "would fuse" if dry_run else "fused"
        lines.append(f"{verb} {len(self.fused)} block(s)" + (": " + ", ".join(f"{n} {r}" for r, n in per_rule.items())
                                                          if per_rule else ""))
        for b in self.fused if verbose else []:
            taken = ", ".join(f"[{a['rule']}] {a['output']}" for a in b.absorbed)
            lines.append(f"  {verb} [{b.rule}] {b.output} <- {b.input}: {b.shape}"
                         + (f" (taking in {taken}, fused in an earlier pass)" if taken else ""))
            lines.extend(_risk.block_lines(b.risk))
        if self.unfused:
            lines.append(f"left {len(self.unfused)} block(s) as they were:")
            for b in self.unfused:
                lines.append(f"  {b.output}: {b.reason}")
        lines.append("ops: " + _op_delta(self.ops_before, self.ops_after))
        for note in self.notes:
            lines.append(f"note: {note}")
        lines.extend(_risk.warning_lines(risk_summary(self)))
        v = self.verification
        if v is not None:
            if not v.ran:
                lines.append(f"verification: not run ({v.message})")
            else:
                worst = f"{v.worst:.2e}" if v.worst is not None else "n/a"
                status = "passed" if v.passed else "FAILED"
                lines.append(f"verification: {status}, worst max|Δ|/max|ref| = {worst} "
                             f"(rtol {v.tolerance.get('rtol'):.0e}) over {len(v.errors)} tensor(s)"
                             + (f", {v.runs} input sizes" if v.runs > 1 else ""))
                if not v.passed:
                    for name, err in sorted(v.errors.items(), key=lambda kv: -kv[1])[:10]:
                        lines.append(f"  {name}: {err:.3e}")
        return "\n".join(lines)


def _op_delta(before: Dict[str, int], after: Dict[str, int]) -> str:
    parts = []
    for op in sorted(set(before) | set(after)):
        b, a = before.get(op, 0), after.get(op, 0)
        parts.append(f"{op} {b}" if a == b else f"{op} {b}→{a}")
    return ", ".join(parts) + f" (nodes {sum(before.values())}→{sum(after.values())})"


def risk_summary(report: Report) -> Dict[str, Any]:
    """The whole-model numeric risk figures over the fused blocks (risk.summary)."""
    return _risk.summary([(b.output, b.risk) for b in report.fused])
