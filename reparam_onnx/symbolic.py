"""Shape arithmetic with dynamic dims kept as symbols.

Exporters compute index tensors from the shape of an activation whose batch is dynamic
(TorchScript writes `x[:, :, 0:p, :] = v` as a ScatterND whose indices are a meshgrid of
Range(Shape(x)[k])). Such a tensor has no constant value, but it is a function of the dims,
and of its own index, that is the same for every batch size. A `Grid` is that function:

    value[i] = Σ_key terms[key][i_c] · key(i)      key: 1, i[a] (a dynamic axis a), or a dim d

where i_c is the index on the static axes (a dynamic axis has size 1 in the arrays). Ops are
followed exactly or not at all: a comparison that some dim value could decide either way, a
reshape that moves data across axes, or any op not here, and the value is unknown (None).
A dynamic dim is named by the tensor it is first read from and its axis, found by walking back
through ops that keep that axis (never by a dim_param, which a file may declare wrongly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .graph import MAX_FOLD_ELEMENTS, GraphIndex, attributes
from .layout import UNARY

_KEEP_N_C = {"AveragePool", "MaxPool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
Dim = Tuple[str, str, int]          # ("dim", tensor, axis): a dynamic dim, ≥ 0
Size = Union[int, Dim]
ONE = "1"                           # the constant term's key
_INT64_MAX = np.iinfo(np.int64).max
MAX_DEPTH = 48                      # nodes deep: index grids are a dozen; deeper is not followed


def _index_key(axis: int) -> tuple:
    return ("i", axis)


@dataclass
class Grid:
    """An integer tensor of `dims` (int, or a Dim) as an affine function of its dynamic-axis
    indices and of dynamic dims. Every array has the static shape: `dims` with 1 for a Dim."""
    dims: Tuple[Size, ...]
    terms: Dict[object, np.ndarray]

    @staticmethod
    def constant(value) -> "Grid":
        value = np.asarray(value)
        return Grid(tuple(int(d) for d in value.shape), {ONE: value.astype(np.int64)})

    @property
    def static_shape(self) -> tuple:
        return tuple(1 if isinstance(d, tuple) else d for d in self.dims)

    def concrete(self) -> Optional[np.ndarray]:
        """The value, when it depends on no dynamic dim or index."""
        if set(self.terms) - {ONE} or any(isinstance(d, tuple) for d in self.dims):
            return None
        return self.terms.get(ONE, np.zeros(self.static_shape, np.int64))

    def sizes(self) -> Optional[List[Size]]:
        """A 1-D grid read as a shape: each entry a static int or exactly one dim."""
        if len(self.dims) != 1 or isinstance(self.dims[0], tuple):
            return None
        out = []
        for k in range(self.dims[0]):
            parts = {key: int(a[k]) for key, a in self.terms.items() if int(a[k]) != 0}
            if set(parts) <= {ONE}:
                out.append(parts.get(ONE, 0))
            elif len(parts) == 1 and isinstance(next(iter(parts)), tuple) and next(iter(parts))[0] == "dim" \
                    and next(iter(parts.values())) == 1:
                out.append(next(iter(parts)))
            else:
                return None
        return out

    def _aligned(self, rank: int) -> "Grid":
        """The same tensor with leading unit axes up to `rank` (numpy broadcasting's view)."""
        extra = rank - len(self.dims)
        terms = {}
        for key, a in self.terms.items():
            if isinstance(key, tuple) and key[0] == "i":
                key = _index_key(key[1] + extra)
            terms[key] = a.reshape((1,) * extra + a.shape)
        return Grid((1,) * extra + self.dims, terms)


def broadcast_dims(*shapes: Sequence[Size], loose: bool = False) -> Optional[Tuple[Size, ...]]:
    """Multidirectional broadcasting; None unless every pair of sizes is provably compatible
    (loose: such an axis is None, its size unknown, and the others are still given)."""
    rank = max(len(s) for s in shapes)
    out = []
    for k in range(rank):
        sizes = {s[k - rank + len(s)] for s in shapes if k - rank + len(s) >= 0} - {1}
        if len(sizes) > 1 or None in sizes:
            if not loose:
                return None
            out.append(None)
            continue
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _combine(grids: Sequence[Grid], dims: Tuple[Size, ...]) -> List[Grid]:
    """The grids broadcast to `dims`, every term array materialized at the static shape."""
    shape = tuple(1 if isinstance(d, tuple) else d for d in dims)
    if math.prod(shape) > MAX_FOLD_ELEMENTS:
        raise _Unknown()   # not materialized: as the index folds no larger constant
    out = []
    for g in grids:
        g = g._aligned(len(dims))
        terms = {}
        for key, a in g.terms.items():
            if isinstance(key, tuple) and key[0] == "i" and g.dims[key[1]] != dims[key[1]]:
                raise _Unknown()   # a dynamic axis of size 1 in one operand: cannot happen, but say so
            terms[key] = np.broadcast_to(a, shape)
        out.append(Grid(dims, terms))
    return out


class _Unknown(Exception):
    pass


class Symbolic:
    """Grids of the tensors of one graph, computed on demand and memoized."""

    def __init__(self, index: GraphIndex):
        self.index = index
        self._memo: Dict[str, Optional[Grid]] = {}
        self._depth = 0

    def value(self, name: str) -> Optional[Grid]:
        """The grid of an integer tensor; None when it is not one or not followed."""
        if name not in self._memo:
            self._memo[name] = None   # a cycle reads as unknown
            dtype = self.index.shapes.get(name, (None, None))[1]
            if dtype is not None and not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
                return None   # an activation, or any float tensor: not shape arithmetic
            if self._depth > MAX_DEPTH:
                return None
            self._depth += 1
            try:
                self._memo[name] = self._value(name)
            except (_Unknown, ValueError, IndexError, TypeError, KeyError, OverflowError, ZeroDivisionError):
                self._memo[name] = None
            finally:
                self._depth -= 1
        return self._memo[name]

    def sizes(self, name: str) -> Optional[List[Size]]:
        g = self.value(name)
        return None if g is None else g.sizes()

    def dims(self, name: str, loose: bool = False) -> Optional[Tuple[Size, ...]]:
        """The tensor's dims: static ones from shape inference, dynamic ones as symbols; an
        Expand or Reshape output as its shape input says. Loose: an Expand's axis whose sizes
        are not provably compatible is None (the graph runs only where they are) and the
        other axes are still given."""
        node = self.index.producer.get(name)
        if node is not None and node.op_type == "Expand":
            inner, target = self.dims(node.input[0], loose), self.sizes(node.input[1])
            return None if inner is None or target is None else broadcast_dims(inner, target, loose=loose)
        if node is not None and node.op_type == "Reshape":
            inner, target = self.dims(node.input[0], loose), self.sizes(node.input[1])
            if inner is None or target is None:
                return None
            if None in inner:   # its output is the target, when the target says every size
                return tuple(target) if all(t != 0 and t != -1 for t in target) else None
            return reshaped_dims(inner, target, attributes(node).get("allowzero", 0))
        grid = self.value(name)
        if grid is not None:
            return grid.dims
        info = self.index.shapes.get(name)
        if info is None or info[0] is None:
            return None
        return tuple(d if d is not None else self._dim(name, k) for k, d in enumerate(info[0]))

    def _dim(self, name: str, axis: int) -> Dim:
        """The dynamic dim `axis` of `name`, named after the tensor it comes from unchanged."""
        while True:
            node = self.index.producer.get(name)
            if node is None or node.domain not in ("", "ai.onnx"):
                break
            op = node.op_type
            if op in ("ScatterND", "BatchNormalization") or op in UNARY or \
                    op == "Pad" and self._pads_axis(node, axis) == (0, 0):
                name = node.input[0]   # the output's dims are the input's
            elif op in _KEEP_N_C and axis < 2 or op == "Conv" and axis == 0:
                name = node.input[0]   # a pool keeps batch and channels, a conv the batch
            elif op == "Slice" and axis not in self._sliced_axes(node):
                name = node.input[0]
            else:
                break
        return ("dim", name, axis)

    def _pads_axis(self, node, axis):
        if len(node.input) < 2 or len(node.input) > 3 and node.input[3]:
            return None   # pads of chosen axes only (opset 18): not followed
        pads = self.index.try_value(node.input[1])
        rank = None if pads is None else pads.size // 2
        if rank is None or axis >= rank:
            return None
        return int(pads[axis]), int(pads[axis + rank])

    def _sliced_axes(self, node) -> set:
        if len(node.input) < 3:
            return set(range(64))   # opset < 10: attributes; not followed
        starts = self.index.try_value(node.input[1])
        axes = self.index.try_value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        info = self.index.shapes.get(node.input[0])
        rank = None if info is None or info[0] is None else len(info[0])
        if starts is None or rank is None or (axes is None and len(node.input) > 3 and node.input[3]):
            return set(range(64))
        axes = range(starts.size) if axes is None else axes
        return {int(a) % rank for a in np.asarray(axes).reshape(-1)}

    # -- evaluation --------------------------------------------------------------------------

    def _value(self, name: str) -> Optional[Grid]:
        value = self.index.try_value(name)
        if value is not None:
            if not np.issubdtype(value.dtype, np.integer) and value.dtype != np.bool_:
                return None
            return Grid.constant(value)
        node = self.index.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx") or len([o for o in node.output if o]) != 1:
            return None
        handler = _HANDLERS.get(node.op_type)
        return handler(self, node) if handler else None

    def _inputs(self, node, count=None) -> List[Grid]:
        names = list(node.input if count is None else node.input[:count])
        grids = [self.value(n) if n else None for n in names]
        if any(g is None for g in grids):
            raise _Unknown()
        return grids

    def _const(self, name, default=None):
        if not name:
            return default
        value = self.index.try_value(name)
        if value is None:
            raise _Unknown()
        return value


def _shape(s: Symbolic, node):
    dims = s.dims(node.input[0])
    if dims is None:
        return None
    attrs = attributes(node)
    dims = dims[slice(int(attrs.get("start", 0)), int(attrs["end"]) if "end" in attrs else None)]
    terms = {ONE: np.array([0 if isinstance(d, tuple) else d for d in dims], np.int64)}
    for k, d in enumerate(dims):
        if isinstance(d, tuple):
            terms.setdefault(d, np.zeros(len(dims), np.int64))[k] = 1
    return Grid((len(dims),), terms)


def _gather(s: Symbolic, node):
    (data,) = s._inputs(node, 1)
    indices = s._const(node.input[1])
    axis = int(attributes(node).get("axis", 0)) % len(data.dims)
    if isinstance(data.dims[axis], tuple):
        return None
    idx = np.where(indices < 0, indices + data.dims[axis], indices)
    if np.any((idx < 0) | (idx >= data.dims[axis])):
        return None
    dims = data.dims[:axis] + tuple(int(d) for d in idx.shape) + data.dims[axis + 1:]
    terms = {}
    for key, a in data.terms.items():
        if isinstance(key, tuple) and key[0] == "i" and key[1] > axis:
            key = _index_key(key[1] + idx.ndim - 1)
        terms[key] = np.take(np.broadcast_to(a, data.static_shape), idx, axis=axis)
    return Grid(dims, terms)


def _cast(s: Symbolic, node):
    to = attributes(node).get("to")
    import onnx
    if to not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
        return None
    return s._inputs(node, 1)[0]


def _range(s: Symbolic, node):
    start, limit, delta = s._inputs(node, 3)
    if start.concrete() is None or delta.concrete() is None or int(start.concrete()) != 0 \
            or int(delta.concrete()) != 1 or limit.dims != ():
        return None
    parts = {k: int(a) for k, a in limit.terms.items() if int(a) != 0}
    if set(parts) <= {ONE}:
        if parts.get(ONE, 0) > MAX_FOLD_ELEMENTS:
            return None
        return Grid.constant(np.arange(parts.get(ONE, 0), dtype=np.int64))
    if len(parts) == 1 and isinstance(next(iter(parts)), tuple) and next(iter(parts.values())) == 1:
        dim = next(iter(parts))
        return Grid((dim,), {_index_key(0): np.ones(1, np.int64)})
    return None


def _arith(s: Symbolic, node):
    a, b = s._inputs(node, 2)
    dims = broadcast_dims(a.dims, b.dims)
    if dims is None:
        return None
    a, b = _combine([a, b], dims)
    op = node.op_type
    if op in ("Add", "Sub"):
        sign = 1 if op == "Add" else -1
        terms = {k: v.copy() for k, v in a.terms.items()}
        for k, v in b.terms.items():
            terms[k] = terms[k] + sign * v if k in terms else sign * v
        return Grid(dims, terms)
    # Mul: one factor must be a plain constant
    for x, y in ((a, b), (b, a)):
        c = y.terms.get(ONE) if set(y.terms) <= {ONE} else None
        if c is not None or not y.terms:
            c = np.zeros(x.static_shape, np.int64) if c is None else c
            return Grid(dims, {k: v * c for k, v in x.terms.items()})
    return None


def _equal(s: Symbolic, node):
    a, b = s._inputs(node, 2)
    dims = broadcast_dims(a.dims, b.dims)
    if dims is None or any(isinstance(d, tuple) for d in dims):
        return None
    a, b = _combine([a, b], dims)
    diff = {k: v.copy() for k, v in a.terms.items()}
    for k, v in b.terms.items():
        diff[k] = diff[k] - v if k in diff else -v
    const = diff.pop(ONE, np.zeros(a.static_shape, np.int64))
    if not diff:
        return Grid.constant(const == 0)
    # const + Σ c_d · d == 0 for dims d ≥ 0: decided only when no choice of dims can make it hold
    coefs = np.stack(list(diff.values()))
    never = ((const > 0) & np.all(coefs >= 0, axis=0)) | ((const < 0) & np.all(coefs <= 0, axis=0))
    free = np.all(coefs == 0, axis=0)
    if not np.all(never | free):
        return None
    return Grid.constant(np.where(free, const == 0, False))


def _where(s: Symbolic, node):
    cond, x, y = s._inputs(node, 3)
    c = cond.concrete()
    if c is None:
        return None
    dims = broadcast_dims(cond.dims, x.dims, y.dims)
    if dims is None:
        return None
    x, y = _combine([x, y], dims)
    shape = x.static_shape
    c = np.broadcast_to(c.astype(bool), shape)
    zero = np.zeros(shape, np.int64)
    return Grid(dims, {k: np.where(c, x.terms.get(k, zero), y.terms.get(k, zero)) for k in set(x.terms) | set(y.terms)})


def _expand(s: Symbolic, node):
    (data,) = s._inputs(node, 1)
    target = s.sizes(node.input[1])
    if target is None:
        return None
    dims = broadcast_dims(data.dims, target)
    return None if dims is None else _combine([data], dims)[0]


def _unsqueeze(s: Symbolic, node):
    (data,) = s._inputs(node, 1)
    axes = attributes(node).get("axes") if s.index.opset < 13 else s._const(node.input[1], None)
    if axes is None:
        return None
    rank = len(data.dims) + len(np.asarray(axes).reshape(-1))
    axes = sorted(int(a) % rank for a in np.asarray(axes).reshape(-1))
    dims, kept = [], iter(range(len(data.dims)))
    where = {}
    for k in range(rank):
        if k in axes:
            dims.append(1)
        else:
            old = next(kept)
            where[old] = k
            dims.append(data.dims[old])
    terms = {}
    for key, a in data.terms.items():
        if isinstance(key, tuple) and key[0] == "i":
            key = _index_key(where[key[1]])
        terms[key] = np.broadcast_to(a, data.static_shape).reshape(tuple(1 if isinstance(d, tuple) else d for d in dims))
    return Grid(tuple(dims), terms)


def _concat(s: Symbolic, node):
    grids = s._inputs(node)
    rank = len(grids[0].dims)
    axis = int(attributes(node).get("axis", 0)) % rank
    if any(len(g.dims) != rank or isinstance(g.dims[axis], tuple) for g in grids):
        return None
    if any(g.dims[:axis] + g.dims[axis + 1:] != grids[0].dims[:axis] + grids[0].dims[axis + 1:] for g in grids):
        return None
    keys = set().union(*(g.terms for g in grids))
    terms = {}
    for key in keys:
        parts = [np.broadcast_to(g.terms[key], g.static_shape) if key in g.terms else np.zeros(g.static_shape, np.int64)
                 for g in grids]
        terms[key] = np.concatenate(parts, axis=axis)
    dims = list(grids[0].dims)
    dims[axis] = sum(g.dims[axis] for g in grids)
    return Grid(tuple(dims), terms)


def _slice(s: Symbolic, node):
    (data,) = s._inputs(node, 1)
    if s.index.opset < 10:
        return None
    starts, ends = s._const(node.input[1]), s._const(node.input[2])
    rank = len(data.dims)
    axes = s._const(node.input[3] if len(node.input) > 3 else "", np.arange(starts.size))
    steps = s._const(node.input[4] if len(node.input) > 4 else "", np.ones(starts.size, np.int64))
    index = [slice(None)] * rank
    dims = list(data.dims)
    for a, b, e, st in zip(np.asarray(axes).reshape(-1), starts.reshape(-1), ends.reshape(-1), steps.reshape(-1)):
        a = int(a) % rank
        if isinstance(dims[a], tuple):
            return None
        b, e = int(max(min(b, _INT64_MAX), -_INT64_MAX)), int(max(min(e, _INT64_MAX), -_INT64_MAX))
        index[a] = slice(b, e, int(st))
        dims[a] = len(range(*slice(b, e, int(st)).indices(dims[a])))
    terms = {k: np.broadcast_to(v, data.static_shape)[tuple(index)] for k, v in data.terms.items()}
    return Grid(tuple(dims), terms)


def _reshape(s: Symbolic, node):
    (data,) = s._inputs(node, 1)
    target = s.sizes(node.input[1])
    if target is None:
        return None
    dims = reshaped_dims(data.dims, target, attributes(node).get("allowzero", 0))
    if dims is None:
        return None
    # only unit axes come and go: the other axes keep their order, so the data does not move
    old = [k for k, d in enumerate(data.dims) if d != 1]
    new = [k for k, d in enumerate(dims) if d != 1]
    if [data.dims[k] for k in old] != [dims[k] for k in new]:
        return None
    moved = dict(zip(old, new))
    shape = tuple(1 if isinstance(d, tuple) else d for d in dims)
    terms = {}
    for key, a in data.terms.items():
        if isinstance(key, tuple) and key[0] == "i":
            key = _index_key(moved[key[1]])
        terms[key] = np.broadcast_to(a, data.static_shape).reshape(shape)
    return Grid(dims, terms)


def monomial(sizes: Sequence[Size]) -> tuple:
    """A product of sizes as (the static ones' product, the dims sorted): equal products compare equal."""
    coef, syms = 1, []
    for d in sizes:
        if isinstance(d, tuple):
            syms.append(d)
        else:
            coef *= d
    return coef, sorted(syms)


def reshaped_dims(dims: Sequence[Size], target: Sequence[Size], allowzero) -> Optional[Tuple[Size, ...]]:
    """Reshape's output dims, when provable: 0 copies the input's dim, one -1 takes what is left."""
    out = []
    for k, t in enumerate(target):
        if t == 0 and not allowzero:
            if k >= len(dims):
                return None
            t = dims[k]
        out.append(t)
    if out.count(-1) > 1 or any(isinstance(t, int) and t < -1 for t in out):
        return None

    total, known = monomial(dims), monomial(t for t in out if t != -1)
    if -1 in out:
        syms = list(total[1])
        for d in known[1]:
            if d not in syms:
                return None
            syms.remove(d)
        if known[0] == 0 or total[0] % known[0] or len(syms) > 1 or syms and total[0] // known[0] != 1:
            return None
        out[out.index(-1)] = syms[0] if syms else total[0] // known[0]
    elif total != known:
        return None
    return tuple(out)


_HANDLERS = {
    "Shape": _shape, "Gather": _gather, "Cast": _cast, "Range": _range, "Add": _arith, "Sub": _arith,
    "Mul": _arith, "Equal": _equal, "Where": _where, "Expand": _expand,
    "Unsqueeze": _unsqueeze, "Concat": _concat, "Slice": _slice, "Reshape": _reshape,
    "Identity": lambda s, node: s._inputs(node, 1)[0],
}


def scatter_box(s: Symbolic, indices: str, data: str) -> Optional[Tuple[int, Tuple[int, ...]]]:
    """ScatterND(data, indices) writing whole slices along one axis: (axis, the slice indices).

    Holds when indices has dims (D_0..D_{r-1}, r) and component k is i[k] along a dynamic
    axis D_k that is data's axis k itself, or a static table along axis k alone; every table
    but one is 0..n-1 over the whole of data's axis (n = its dim), and the one left is the rows.
    Data's axes from r on are written whole by ScatterND's definition."""
    grid, data_dims = s.value(indices), s.dims(data)
    if grid is None or data_dims is None or not grid.dims or isinstance(grid.dims[-1], tuple):
        return None
    r = grid.dims[-1]
    if len(grid.dims) != r + 1 or r > len(data_dims) or r == 0:
        return None
    partial = []
    for k in range(r):
        comp = {key: np.take(np.broadcast_to(a, grid.static_shape), k, axis=r) for key, a in grid.terms.items()}
        comp = {key: a for key, a in comp.items() if np.any(a != 0)}
        if isinstance(grid.dims[k], tuple):   # a dynamic axis: the component must be i[k], the whole axis
            if set(comp) != {_index_key(k)} or np.any(comp[_index_key(k)] != 1) or grid.dims[k] != data_dims[k]:
                return None
            continue
        if set(comp) - {ONE}:
            return None
        table = np.broadcast_to(comp.get(ONE, np.zeros((), np.int64)), grid.static_shape[:r])
        rows = table[tuple(slice(None) if a == k else 0 for a in range(r))]
        line = rows.reshape([grid.dims[k] if a == k else 1 for a in range(r)])
        if not np.array_equal(table, np.broadcast_to(line, table.shape)):
            return None   # the component varies along another axis: not a box
        n = data_dims[k]
        if isinstance(n, int) and rows.size == n and np.array_equal(rows, np.arange(n)):
            continue
        partial.append((k, tuple(int(v) for v in rows)))
    return partial[0] if len(partial) == 1 else None
