"""Rule files (rules/*.toml) → validated Rule objects, and matching a block against them.

The engine decides what is exact; a rule decides what is wanted and names it. A rule
lists the term patterns a block may have (closed vocabulary: TERM_KINDS), the ops
allowed after the sum, and the kind of grouping. Unknown keys and values are errors.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .linear import Context
from .linear import top_terms
from .terms import Affine, AvgPool, Conv, Expr, Pad, Shared, Transpose

TERM_KINDS = ("conv", "identity", "chain", "avgpool")
KERNEL_KINDS = ("conv", "chain", "avgpool")   # the kinds `kernel` and `size` apply to (a chain: its last op)
KERNELS = ("any", "1x1", "square", "1xk", "kx1")
POST_KINDS = ("batchnorm", "affine")
GROUPS = ("any", "1", "grouped", "depthwise")
PRESENCE = ("any", "yes", "no")


class RuleError(ValueError):
    """A rule file is invalid (the message names the file and the key)."""


@dataclass(frozen=True)
class TermPattern:
    kind: str
    kernel: str = "any"
    size: Tuple[int, int] = (1, 1 << 30)
    count: Tuple[int, int] = (1, 1)
    bn: str = "any"
    pre: str = "any"

    def accepts(self, term: "TermShape") -> bool:
        if term.kind != self.kind:
            return False
        if self.bn != "any" and term.bn != (self.bn == "yes"):
            return False
        if self.pre != "any" and term.pre != (self.pre == "yes"):
            return False
        if self.kind not in KERNEL_KINDS:
            return True
        k = term.kernel
        if not self.size[0] <= max(k, default=1) <= self.size[1]:
            return False
        return {
            "any": True,
            "1x1": all(d == 1 for d in k),
            "square": len(set(k)) == 1 and k[0] > 1,
            "1xk": len(k) == 2 and k[0] == 1 and k[1] > 1,
            "kx1": len(k) == 2 and k[0] > 1 and k[1] == 1,
        }[self.kernel]


@dataclass(frozen=True)
class Rule:
    name: str
    summary: str
    reference: str
    priority: int
    terms: Tuple[TermPattern, ...]
    post: Tuple[str, ...] = ()
    post_required: bool = False
    groups: str = "any"
    min_terms: int = 2
    path: str = ""

    def accepts(self, shape: "BlockShape") -> bool:
        if len(shape.terms) < self.min_terms:
            return False
        if any(p not in self.post for p in shape.post):
            return False
        if self.post_required and not shape.post:
            return False
        if self.groups != "any" and shape.groups != self.groups:
            return False
        return _assign(list(shape.terms), self.terms, [0] * len(self.terms))


def _assign(terms, patterns, used) -> bool:
    """Backtracking: every term takes a pattern with room left, and every pattern gets its minimum."""
    if not terms:
        return all(u >= p.count[0] for u, p in zip(used, patterns))
    term, rest = terms[0], terms[1:]
    for i, pattern in enumerate(patterns):
        if used[i] < pattern.count[1] and pattern.accepts(term):
            used[i] += 1
            if _assign(rest, patterns, used):
                return True
            used[i] -= 1
    return False


@dataclass(frozen=True)
class TermShape:
    kind: str                 # a TERM_KINDS entry, or another word no rule accepts
    kernel: Tuple[int, ...] = ()   # of the conv or pool (a chain: of its last op)
    group: int = 1
    bn: bool = False          # an affine op (BN) after it
    pre: bool = False         # an affine op (BN) before it, on the block input
    ops: Tuple[str, ...] = ()  # a chain's ops, input first

    def describe(self) -> str:
        if self.kind in KERNEL_KINDS:
            text = "→".join(self.ops)
        else:
            text = self.kind
        return ("bn→" if self.pre else "") + text + ("+bn" if self.bn else "")


@dataclass(frozen=True)
class BlockShape:
    terms: Tuple[TermShape, ...]
    post: Tuple[str, ...]
    groups: str

    def describe(self) -> str:
        text = " + ".join(t.describe() for t in self.terms)
        return text + "".join(f" → {p}" for p in self.post)


def _strip_affine(expr: Expr, source: str):
    """Affine layers on top of expr (no-ops, layout changes, padding and shared tensors inside
    the block are looked through) and the expression below them."""
    kinds = []
    while isinstance(expr, (Affine, Transpose, Pad, Shared)) and expr.tensor != source:
        if isinstance(expr, Affine) and expr.kind not in ("noop", "bias"):   # a Gemm's bias is the Gemm's
            kinds.append(expr.kind)
        expr = expr.input
    return kinds, expr


def _op_name(op) -> str:
    """'3x3 conv', '1x1 conv g4', '3x3 avgpool'."""
    if isinstance(op, AvgPool):
        return "x".join(map(str, op.kernel)) + " avgpool"
    if op.linear:
        return "linear"
    return "x".join(map(str, op.weight.shape[2:])) + " conv" + (f" g{op.group}" if op.group > 1 else "")


def _term_shape(expr: Expr, ctx: Context) -> TermShape:
    kinds, core = _strip_affine(expr, ctx.source)
    if core.tensor == ctx.source:
        return TermShape("identity", bn=bool(kinds))
    ops, below, pre = [], core, []
    while isinstance(below, (Conv, AvgPool)):   # down a chain of convs and pools
        if isinstance(below, Conv) and below.weight is None:
            return TermShape("conv with non-constant weight")
        ops.append(below)
        pre, below = _strip_affine(below.input, ctx.source)
    if not ops or below.tensor != ctx.source:
        return TermShape(type(below).__name__.lower())
    last = ops[0]
    kind = "chain" if len(ops) > 1 else "avgpool" if isinstance(last, AvgPool) else "conv"
    kernel = last.kernel if isinstance(last, AvgPool) else tuple(last.weight.shape[2:])
    group = last.group if isinstance(last, Conv) else ctx.channels
    return TermShape(kind, kernel, group, bn=bool(kinds), pre=bool(pre),
                     ops=tuple(_op_name(op) for op in reversed(ops)))


def block_shape(expr: Expr, ctx: Context) -> BlockShape:
    terms, has_sum = top_terms(expr)
    shapes = tuple(_term_shape(t, ctx) for t in terms)
    post = tuple(reversed(_strip_affine(expr, ctx.source)[0])) if has_sum else ()
    groups = {t.group for t in shapes if t.kind == "conv"}
    if groups == {1}:
        kind = "1"
    elif groups == {ctx.channels}:
        kind = "depthwise"
    else:
        kind = "grouped"
    return BlockShape(shapes, post, kind)


# ---------------------------------------------------------------- loading and validation

_RULE_KEYS = {"name", "summary", "reference", "priority", "terms", "post", "post_required", "groups", "min_terms"}
_TERM_KEYS = {"kind", "kernel", "size", "count", "bn", "pre"}


def _pair(value, where) -> Tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) for v in value)
            or value[0] < 0 or value[1] < value[0]):
        raise RuleError(f"{where} must be [min, max] with 0 <= min <= max")
    return value[0], value[1]


def _choice(value, allowed, where):
    if value not in allowed:
        raise RuleError(f"{where} is {value!r}; expected one of {', '.join(map(repr, allowed))}")
    return value


def parse_rule(data: dict, path: str) -> Rule:
    unknown = set(data) - _RULE_KEYS
    if unknown:
        raise RuleError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("name", "summary", "terms"):
        if key not in data:
            raise RuleError(f"{path}: missing key '{key}'")
    name = data["name"]
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise RuleError(f"{path}: name must be a word of letters, digits and underscores")
    for key in ("summary", "reference"):
        if not isinstance(data.get(key, ""), str):
            raise RuleError(f"{path}: {key} must be a string")
    priority = data.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise RuleError(f"{path}: priority must be an integer")
    post = data.get("post", [])
    if not isinstance(post, list):
        raise RuleError(f"{path}: post must be a list")
    for p in post:
        _choice(p, POST_KINDS, f"{path}: post entry")
    post_required = data.get("post_required", False)
    if not isinstance(post_required, bool):
        raise RuleError(f"{path}: post_required must be true or false")
    groups = _choice(data.get("groups", "any"), GROUPS, f"{path}: groups")
    min_terms = data.get("min_terms", 2)
    if not isinstance(min_terms, int) or isinstance(min_terms, bool) or min_terms < 1:
        raise RuleError(f"{path}: min_terms must be a positive integer")
    if not isinstance(data["terms"], list) or not data["terms"]:
        raise RuleError(f"{path}: terms must be a non-empty list of [[terms]] tables")
    patterns = []
    for n, term in enumerate(data["terms"]):
        where = f"{path}: terms[{n}]"
        if not isinstance(term, dict):
            raise RuleError(f"{where} must be a table")
        unknown = set(term) - _TERM_KEYS
        if unknown:
            raise RuleError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        kind = _choice(term.get("kind"), TERM_KINDS, f"{where}.kind")
        if kind not in KERNEL_KINDS and ({"kernel", "size"} & set(term)):
            raise RuleError(f"{where}: kernel and size apply to {', '.join(KERNEL_KINDS)} terms only")
        patterns.append(TermPattern(
            kind=kind,
            kernel=_choice(term.get("kernel", "any"), KERNELS, f"{where}.kernel"),
            size=_pair(term["size"], f"{where}.size") if "size" in term else (1, 1 << 30),
            count=_pair(term.get("count", [1, 1]), f"{where}.count"),
            bn=_choice(term.get("bn", "any"), PRESENCE, f"{where}.bn"),
            pre=_choice(term.get("pre", "any"), PRESENCE, f"{where}.pre"),
        ))
    return Rule(name, data["summary"], data.get("reference", ""), priority, tuple(patterns),
                tuple(post), post_required, groups, min_terms, path)


def builtin_rules_dir() -> Path:
    """rules/ inside the installed wheel, or at the top of the checkout (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "rules", here.parent / "rules"):
        if candidate.is_dir():
            return candidate
    raise RuleError("the built-in rules folder is missing from this installation")


def load_rules(extra_dirs: Iterable[str] = (), builtin: bool = True, disabled: Iterable[str] = ()) -> List[Rule]:
    """All rules but the disabled ones, highest priority first (then by name); duplicate
    names, and disabling a rule that does not exist, are errors."""
    dirs = ([builtin_rules_dir()] if builtin else []) + [Path(d) for d in extra_dirs]
    rules: List[Rule] = []
    seen = {}
    for folder in dirs:
        if not folder.is_dir():
            raise RuleError(f"rules folder '{folder}' does not exist")
        for path in sorted(folder.glob("*.toml")):
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise RuleError(f"{path.name}: not valid TOML ({exc})") from None
            rule = parse_rule(data, path.name)
            if rule.name in seen:
                raise RuleError(f"rule '{rule.name}' is defined twice ({seen[rule.name]} and {path.name})")
            seen[rule.name] = path.name
            rules.append(rule)
    unknown = sorted(set(disabled) - set(seen))
    if unknown:
        raise RuleError(f"no rule named {', '.join(map(repr, unknown))} to disable (rules: {', '.join(sorted(seen))})")
    rules = [r for r in rules if r.name not in set(disabled)]
    rules.sort(key=lambda r: (-r.priority, r.name))
    return rules


def first_accepting(rules: Sequence[Rule], shape: BlockShape) -> Optional[Rule]:
    return next((r for r in rules if r.accepts(shape)), None)
