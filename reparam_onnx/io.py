"""Loading and saving models: external data, atomic writes, nothing else touched."""
from __future__ import annotations

import math
import mmap
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import onnx
from google.protobuf.message import DecodeError

from .errors import InputError

TWO_GIB = 2**31
_ITEM_SIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
              onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
              onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
              onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
              onnx.TensorProto.BOOL: 1}
EXTERNAL_THRESHOLD = 1024   # bytes; smaller tensors stay inside the model file
# the external-data keys onnx reads or writes; any other key might change what the bytes
# mean to some reader, so it is refused rather than ignored
EXTERNAL_KEYS = ("location", "offset", "length", "checksum", "basepath")

INPUT_MODEL = "the input model"

PathLike = Union[str, os.PathLike]
Files = List[Tuple[str, Path]]   # (what the file is to the run, its path)


def load(source: Union[PathLike, onnx.ModelProto],
         lazy: bool = False) -> Tuple[onnx.ModelProto, Optional[Path], List[Path]]:
    """(model, folder of the model file or None, the external data files it read).

    A ModelProto is returned as given (callers copy before editing). A path is read
    with its external data, which must lie inside the model's folder. With lazy=True the
    graph initializers whose external data is LAZY_MIN bytes or more (of a plain element
    type) are left in their files, checked but not read: each stays external, marked as
    lazy (see lazy()); lazy_array() reads one, load_lazy() puts them into the model, and
    save() copies their bytes from the file into the output.
    """
    if isinstance(source, onnx.ModelProto):
        if _has_external(source):
            raise InputError("the model refers to external data; pass its path instead of a loaded ModelProto")
        return source, None, []
    path = Path(source)
    if not path.exists():
        raise InputError(f"'{path}' does not exist")
    if path.is_dir():
        raise InputError(f"'{path}' is a directory, not an ONNX model")
    if path.stat().st_size == 0:
        raise InputError(f"'{path}' is empty")
    try:
        model, lengths = _parse_with_lengths(path, take=True)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"'{path}' is not an ONNX model ({_first_line(exc) or type(exc).__name__})") from None
    if not model.HasField("graph") or not model.graph.node and not model.graph.output:
        raise InputError(f"'{path}' is not an ONNX model (no graph)")
    external: Dict[int, int] = {}
    files = _load_external(model, path.parent, external, lazy) if _has_external(model) else []
    if lengths is not None and len(lengths) == len(model.graph.initializer):
        _loaded.clear()
        _loaded[id(model)] = (model, [external.get(i, n) for i, n in enumerate(lengths)])
    return model, path.parent, files


# What _read_model's scan learnt of the initializers' raw_data lengths, until _parse takes it;
# and load()'s, until raw_lengths() hands it over (one model each, held until then).
_scanned: Dict[int, Tuple[onnx.ModelProto, Optional[List[Optional[int]]]]] = {}
_loaded: Dict[int, Tuple[onnx.ModelProto, List[Optional[int]]]] = {}


def raw_lengths(model: onnx.ModelProto) -> Optional[List[Optional[int]]]:
    """For the model load() just returned: the length of each initializer's raw_data (None: no
    raw_data), as read from the file's wire format and the external data entries, without
    copying the data out of the model (validate.check_model compares them with the dims);
    None when not known."""
    entry = _loaded.pop(id(model), None)
    _loaded.clear()
    return entry[1] if entry is not None and entry[0] is model else None


def _has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model.graph))


def _all_tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    """Initializers, sparse initializers and tensor attributes, subgraphs included: any of
    them may keep its data in a file."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices


def _load_external(model: onnx.ModelProto, folder: Path, lengths: Optional[Dict[int, int]] = None,
                   lazy: bool = False) -> List[Path]:
    """Load the external data into the model; `lengths` gets the length read of each initializer
    (by its index) that had its data outside. lazy=True: large initializers are marked lazy
    instead of read (see load)."""
    from onnx.external_data_helper import load_external_data_for_tensor
    root = folder.resolve()
    files = []
    count = len(model.graph.initializer)   # _all_tensors yields the initializers first, in order
    for position, tensor in enumerate(_all_tensors(model.graph)):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location, offset, length = _external_entry(tensor)
        target = Path(location)
        if target.is_absolute() or ".." in target.parts:
            raise InputError(f"external data '{location}' of '{tensor.name}' is outside the model's folder; "
                             f"copy it next to the model")
        full = folder / target
        if not full.exists() and not full.is_symlink():
            raise InputError(f"external data file '{location}' of '{tensor.name}' is missing")
        if full.is_symlink() or not full.resolve().is_relative_to(root):
            raise InputError(f"external data '{location}' is a symlink; external data must be a regular file "
                             f"inside the model's folder: copy the file next to the model")
        if not full.is_file():
            raise InputError(f"external data '{location}' of '{tensor.name}' is not a regular file")
        if full.stat().st_nlink > 1:
            raise InputError(f"external data '{location}' is hard-linked; external data must be a regular file "
                             f"inside the model's folder: copy the file next to the model")
        info = full.stat()
        size = info.st_size
        _check_bounds(tensor, location, offset, length, size)
        if lengths is not None and position < count:   # what onnx read: `length` bytes, or to the end
            lengths[position] = length if length is not None else size - offset
        if full.resolve() not in files:
            files.append(full.resolve())
        if lazy and position < count and _lazy_kind(tensor, length if length is not None else size - offset):
            _make_lazy(tensor, location, offset, length if length is not None else size - offset, full.resolve(),
                       info)
            continue
        try:
            load_external_data_for_tensor(tensor, str(folder))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read external data '{location}': {_first_line(exc)}") from None
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return files


# ---------------------------------------------------------------- lazy external data
#
# A large weight in an external data file need not be copied into the model: it stays an
# external tensor, its entries made canonical (location, offset, length) and followed by one
# entry naming the data file's resolved path (LAZY_KEY). Whoever needs its values reads them
# from the file (lazy_array); save() copies its bytes from the file into the output, where
# onnx.save would write the loaded tensor's; load_lazy() gives the model the tensor load()
# would have made. The file is the same either way.

LAZY_KEY = "\0reparam-onnx-source"   # no writer uses this key: a reader unaware of it refuses it
LAZY_MIN = 64 << 10                  # bytes; smaller external tensors are read into the model
# element types whose values are the raw bytes as they are (numpy_helper.to_array's frombuffer)
_LAZY_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
               onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
               onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}
# data file -> (device, inode, size, mtime) when load() looked at it: a file changed since is refused
_sources: Dict[Path, Tuple[int, int, int, int]] = {}


def _lazy_kind(tensor: onnx.TensorProto, length: int) -> bool:
    """The tensor may stay in its file: a plain element type, LAZY_MIN bytes or more, and as
    many as its dims say (a wrong length is read, and refused by the checks as before)."""
    return tensor.data_type in _LAZY_TYPES and length >= LAZY_MIN and not tensor.HasField("segment") and \
        length == math.prod(tensor.dims) * _ITEM_SIZE[tensor.data_type]


def _make_lazy(tensor: onnx.TensorProto, location: str, offset: int, length: int, full: Path, info) -> None:
    tensor.ClearField("raw_data")   # onnx ignores it when the data is external
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length)),
                       (LAZY_KEY, str(full))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    _sources[full] = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def lazy(tensor: onnx.TensorProto) -> bool:
    """A tensor load(lazy=True) left in its data file."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and len(tensor.external_data) == 4 and \
        tensor.external_data[3].key == LAZY_KEY


def has_lazy(model: onnx.ModelProto) -> bool:
    return any(lazy(t) for t in model.graph.initializer)


def _lazy_entry(tensor: onnx.TensorProto) -> Tuple[str, Path, int, int]:
    """(location, data file, offset, length) of a lazy tensor."""
    location, offset, length, source = (e.value for e in tensor.external_data)
    return location, Path(source), int(offset), int(length)


def lazy_bytes(tensor: onnx.TensorProto) -> bytes:
    """A lazy tensor's bytes, read from its data file; InputError when the file is gone, was
    changed since load() checked it, or is too short."""
    location, source, offset, length = _lazy_entry(tensor)
    try:
        with open(source, "rb") as handle:
            info = os.fstat(handle.fileno())
            seen = _sources.get(source)
            if seen is not None and seen != (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns):
                raise InputError(f"external data file '{location}' changed while the model was being fused")
            handle.seek(offset)
            data = handle.read(length)
    except OSError as exc:
        raise InputError(f"cannot read external data '{location}': {exc.strerror or exc}") from None
    if len(data) != length:
        raise InputError(f"external data of '{tensor.name}': offset {offset} + length {length} is past the end "
                         f"of '{location}'")
    return data


def lazy_array(tensor: onnx.TensorProto) -> Any:
    """A lazy tensor's values (read-only, as numpy_helper.to_array gives a loaded tensor's)."""
    import numpy as np
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(lazy_bytes(tensor), dtype).reshape(tuple(tensor.dims))


def load_lazy(model: onnx.ModelProto) -> None:
    """Read every lazy tensor into the model: the tensor load() would have made."""
    for tensor in model.graph.initializer:
        if lazy(tensor):
            data = lazy_bytes(tensor)
            tensor.raw_data = data   # as onnx's load_external_data_for_tensor and _load_external leave it
            del data
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def _external_entry(tensor: onnx.TensorProto) -> Tuple[str, int, Optional[int]]:
    """(location, offset, length or None) of a tensor's external data: each key known and
    given once, a location, and offset and length written as plain decimal digits."""
    where = f"external data of '{tensor.name}'"
    fields = {}
    for entry in tensor.external_data:
        if entry.key not in EXTERNAL_KEYS:
            raise InputError(f"{where} has the unknown key '{entry.key}' (known: {', '.join(EXTERNAL_KEYS)})")
        if entry.key in fields:
            raise InputError(f"{where} gives '{entry.key}' twice")
        fields[entry.key] = entry.value
    if not fields.get("location"):
        raise InputError(f"{where} has no 'location'")
    numbers = {}
    for key in ("offset", "length"):
        value = fields.get(key)
        # int() would also take ' 5', '+5', '1_0', other digits than 0-9, and stall on a million digits
        if value is not None and not re.fullmatch(r"[0-9]{1,20}", value):
            raise InputError(f"{where}: '{key}' is {value[:40]!r}, not a byte count")
        numbers[key] = None if value is None else int(value)
    return fields["location"], numbers["offset"] or 0, numbers["length"]


def _check_bounds(tensor: onnx.TensorProto, location: str, offset: int, length: Optional[int], size: int) -> None:
    """The tensor's bytes lie inside its data file."""
    end = offset + (length or 0)
    if offset > size or end > size:
        what = f"offset {offset}" + (f" + length {length}" if length is not None else "")
        raise InputError(f"external data of '{tensor.name}': {what} is past the end of '{location}' ({size} bytes)")


_parsed: Dict[tuple, Tuple[onnx.ModelProto, Optional[List[Optional[int]]]]] = {}


def _parse(path: Path, keep: bool = False, take: bool = False) -> onnx.ModelProto:
    """The model in the file, without external data. The command's file checks read the input
    before load() does: that parse is kept (keep=True, the only one kept) by file identity
    (device, inode, size, mtime), so a large model is parsed once; load() takes it (take=True:
    it edits the model). Parsing another file (the output it replaces, other models in its
    folder) leaves it kept."""
    return _parse_with_lengths(path, keep, take)[0]


def _parse_with_lengths(path: Path, keep: bool = False,
                        take: bool = False) -> Tuple[onnx.ModelProto, Optional[List[Optional[int]]]]:
    """_parse, and the raw_data lengths its parse read (see _scan_raw_lengths; None: not known)."""
    info = path.stat()
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    entry = _parsed.pop(key, None) if take else _parsed.get(key)
    if entry is None:
        model = _read_model(path)
        scanned = _scanned.pop(id(model), None)
        _scanned.clear()
        entry = (model, scanned[1] if scanned is not None and scanned[0] is model else None)
        if keep:
            _parsed.clear()
            _parsed[key] = entry
    return entry


def _read_model(path: Path) -> onnx.ModelProto:
    """onnx.load(path, load_external_data=False). A binary model file is parsed from a read-only
    map of the file: onnx.load reads it into a bytes object first, a copy of the whole file
    the parse does not need (protobuf copies what it keeps). Other formats (text protos, by
    extension) and files that cannot be mapped go through onnx.load."""
    from onnx import serialization
    fmt = serialization.registry.get_format_from_file_extension(path.suffix)
    if fmt not in (None, "protobuf"):
        return onnx.load(str(path), load_external_data=False)
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            with memoryview(view) as data:
                model = onnx.ModelProto()
                decoded = model.ParseFromString(data)
                size = len(data)
                if decoded is None or decoded == size:
                    lengths = _scan_raw_lengths(view)
    except (OSError, ValueError):   # not mappable (empty, a device): as onnx.load would read it
        return onnx.load(str(path), load_external_data=False)
    if decoded is not None and decoded != size:   # as onnx's protobuf deserializer checks
        raise DecodeError(f"Protobuf decoding consumed too few bytes: {decoded} out of {size}")
    _scanned.clear()   # one parse's at a time: _parse takes it at once
    _scanned[id(model)] = (model, lengths)
    return model


class _Unusual(Exception):
    """The wire format is not laid out plainly enough to read lengths from it."""


_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


def _scan_raw_lengths(buf) -> Optional[List[Optional[int]]]:
    """The length of each graph initializer's raw_data (None: it has none), in order, read from
    the serialized model's record headers (the data is skipped, not read); None unless the model
    has one graph record, each initializer is a length-delimited record, and every raw_data is
    length-delimited (a repeated one: the last, as protobuf keeps it)."""
    try:
        graphs = [(start, end) for number, wire, start, end in _records(buf, 0, len(buf)) if number == _GRAPH]
        if len(graphs) != 1 or graphs[0][0] is None:
            return None
        lengths: List[Optional[int]] = []
        for number, wire, start, end in _records(buf, *graphs[0]):
            if number != _INITIALIZER:
                continue
            if start is None:
                return None
            raw = None
            for field, _, data_start, data_end in _records(buf, start, end):
                if field == _RAW_DATA:
                    if data_start is None:
                        return None
                    raw = data_end - data_start
            lengths.append(raw)
        return lengths
    except _Unusual:
        return None


def _records(buf, pos: int, end: int):
    """(field number, wire type, start, end) of each record in buf[pos:end]; start and end of
    the value of a length-delimited one, None for the others. _Unusual on groups and overruns."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        start = stop = None
        if wire == 0:
            _, pos = _read_varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end)
            start, stop = pos, pos + length
            pos = stop
        else:
            raise _Unusual(f"wire type {wire}")
        if pos > end:
            raise _Unusual("a record runs past its message")
        yield number, wire, start, stop
    if pos != end:
        raise _Unusual("a record runs past its message")


def _read_varint(buf, pos: int, end: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Unusual("a varint runs past its message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def external_locations(path: PathLike, keep: bool = False) -> Optional[List[Path]]:
    """The data files a model file refers to (as written, relative to its folder), or None
    when the file cannot be read as a model (it might refer to anything). Only a regular
    file is read: a pipe or a FIFO is left for load() to judge, unread. keep=True: the parse
    is kept for load() (the input model)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        model = _parse(path, keep=keep)
    except Exception:  # not a model, unreadable, too large: nothing can be said
        return None
    return [path.parent / entry.value for t in _all_tensors(model.graph) for entry in t.external_data
            if entry.key == "location"]


# an external-data entry's key, as every writer serializes it: field 1 (key), 8 bytes, "location"
_LOCATION = b"\n\x08location"


def _replaced_locations(path: Path) -> List[Path]:
    """The data files of the model at `path` that an output written there replaces ([] when
    there is none or it is not a model). A file without an external-data entry's bytes
    anywhere is not parsed: it names no data file (a large inline output would cost a parse)."""
    if not path.is_file():
        return []
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return []
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                if view.find(_LOCATION) < 0:
                    return []
    except (OSError, ValueError):
        pass   # let the parse decide
    return external_locations(path) or []


# ---------------------------------------------------------------- the files of a run

def read_files(model: PathLike, extra: Files = ()) -> Files:
    """Every file a run reads: the input model first, then its external data and `extra`."""
    data = external_locations(model, keep=True) or []
    return [(INPUT_MODEL, Path(model))] + [("the input's external data", p) for p in data] + \
        [(what, Path(p)) for what, p in extra]


def written_files(output: PathLike, protect: Sequence[PathLike]) -> Files:
    """Every file writing `output` (with `protect` as save() gets it) may write or replace:
    the model, the data file save() would choose, the data files of the model it replaces."""
    path = Path(output)
    replaced = _replaced_locations(path)   # read once: a large output it replaces is scanned whole
    return [("the output model", path), ("the output's external data", _data_path(path, protect, replaced))] + \
        [("the external data of the output it replaces", p) for p in replaced]


def refuse_clash(what: str, path: PathLike, files: Files) -> None:
    """InputError when `path` is one of `files` (compared as the files they name)."""
    for role, other in files:
        if same_file(path, other):
            same = "" if os.path.normpath(path) == os.path.normpath(other) else f" '{other}'"
            raise InputError(f"{what} '{path}' is {role}{same}; choose another name")


# ---------------------------------------------------------------- saving

def save(model: onnx.ModelProto, path: PathLike, external: bool = False,
         protect: Iterable[PathLike] = (), replaces: Iterable[PathLike] = (),
         progress: Optional[Callable[[int, int], None]] = None,
         arrays: Optional[Mapping[str, Any]] = None) -> List[Tuple[Path, str]]:
    """Write atomically: temporary files in the destination folder, fsync, rename; data file first.

    With external=True (or when the model would exceed 2 GiB) tensors of 1 KiB and more go
    to a data file next to the output, named '<output>.data' (or '<output>.N.data' when
    that name is protected, belongs to an unrelated file, or is the replaced output's but
    still used by something else). The model is modified to point there. No file in
    `protect` is written. Files in `replaces` (the data files of the model being replaced,
    for --in-place) are removed once the new model is in place, unless the new model uses
    them or something else may (see still_used): those are kept and returned as
    (file, why it was kept).
    A replaced file keeps its mode (a new data file takes that of the first file in
    `replaces`); a new file gets 0666 & ~umask, as open() would give it.
    `progress(done, total)` is told the bytes written so far (model file, or data file then model file).
    `arrays` holds the data of the model's pending stubs (see add_pending): each is written
    as the tensor it stands for (the file is that of the model with materialize(model, arrays)).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder '{folder}' does not exist")
    if path.is_dir():
        raise InputError(f"output path '{path}' is a directory")
    protect, replaces = list(protect), list(replaces)
    if any(same_file(path, p) for p in protect):
        raise InputError(f"writing '{path}' would overwrite the input model; choose another output name")
    arrays = arrays or {}
    parts = None if external else serialized_parts(model, arrays)
    external = external or parts_size(parts) >= TWO_GIB
    data_path = None
    count = _Count(progress)
    if external:
        parts = None   # the inline serialization is not used: let its pieces go
        data_path = _data_path(path, protect)
        like = None if data_path.exists() else next(iter(replaces), None)
        count.total = sum(map(_raw_size, _externalized(model, arrays)))
        write_atomic(data_path, lambda f: _externalize(model, f, data_path.name, count, arrays), like=like)
        parts = serialized_parts(model, arrays)
    count.total += parts_size(parts)
    write_atomic(path, lambda f: write_parts(model, parts, f, count, arrays))
    kept = []
    for old in map(Path, replaces):
        if data_path is not None and same_file(old, data_path):
            continue
        why = still_used(old, path)
        if why:
            kept.append((old, why))
            continue
        try:
            os.unlink(old)
        except OSError:
            pass
    return kept


def _data_path(path: Path, protect, own: Optional[List[Path]] = None) -> Path:
    """'<output>.data', or the first '<output>.N.data' that is neither protected nor an
    unrelated file; a data file of the output being replaced (`own`: _replaced_locations, when
    already read) is reused when nothing else uses it."""
    own = _replaced_locations(path) if own is None else own
    for n in range(0, 1000):
        candidate = path.with_name(path.name + (".data" if n == 0 else f".{n}.data"))
        if any(same_file(candidate, p) for p in protect):
            continue
        if not candidate.exists():
            return candidate
        if any(same_file(candidate, p) for p in own) and not still_used(candidate, path):
            return candidate
    raise InputError(f"no free name for the external data of '{path}'")


def still_used(data: Path, model: Path) -> Optional[str]:
    """Why the data file `data` of `model` may be used by something else (None: nothing else uses it).

    Only a data file that nothing else uses may be deleted or overwritten. onnx and
    onnxruntime refuse a location outside the model's own folder ('..', absolute paths), so
    another model reaches `data` only from the data file's folder or a folder above it. The
    *.onnx files from the data file's folder up to `model`'s folder are read (headers only);
    one that cannot be read counts as using it, and so does another hard link. Not looked
    at: models in folders above `model`'s that reach down into it ('sub/m.onnx.data').
    """
    try:
        if os.stat(data).st_nlink > 1:
            return "it has another hard link"
    except OSError:
        return None   # gone already: nothing to keep
    for folder in _folders_up(data.parent, model.parent):
        try:
            others = sorted(p for p in folder.iterdir() if p.name.lower().endswith(".onnx"))
        except OSError as exc:
            return f"'{folder}' cannot be listed ({exc.strerror or exc}) and may hold a model using it"
        for other in others:
            if same_file(other, model) or not other.is_file():
                continue
            refs = external_locations(other)
            if refs is None:
                return f"'{other}' cannot be read and may use it"
            if any(same_file(ref, data) for ref in refs):
                return f"'{other}' uses it"
    return None


def _folders_up(start: Path, top: Path) -> List[Path]:
    """`start`'s folder and those above it up to `top` (`start` and `top` when `top` is not above)."""
    folders, top = [start.resolve()], top.resolve()
    while folders[-1] != top and top in folders[-1].parents:
        folders.append(folders[-1].parent)
    return folders if top in folders else folders + [top]


def _externalized(model: onnx.ModelProto, arrays: Mapping[str, Any]) -> Iterable[onnx.TensorProto]:
    """The initializers _externalize moves to the data file (pending stubs as their tensors)."""
    return (t for t in model.graph.initializer
            if (t.HasField("raw_data") or pending(t, arrays) or lazy(t)) and _raw_size(t) >= EXTERNAL_THRESHOLD)


def _raw_size(tensor: onnx.TensorProto) -> int:
    """The length of raw_data, from the dims where the type says (reading raw_data copies it)."""
    length = _raw_length(tensor)
    return len(tensor.raw_data) if length is None else length


def _externalize(model: onnx.ModelProto, handle, location: str, count: "_Count", arrays: Mapping[str, Any]) -> None:
    offset = 0
    for tensor in _externalized(model, arrays):
        pad = (-offset) % 4096
        handle.write(b"\0" * pad)
        offset += pad
        data = _array_bytes(arrays[tensor.name]) if pending(tensor, arrays) else \
            lazy_bytes(tensor) if lazy(tensor) else tensor.raw_data
        handle.write(data)
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        offset += len(data)
        count(len(data))
        del data   # one tensor's bytes at a time


# ---------------------------------------------------------------- pending stubs
#
# A fused weight need not be copied into the model while the model is only going to be saved:
# the graph holds a stub (name, type, dims, an external location no file has) and the array
# stays apart, until save() writes its bytes where the tensor's would go or materialize()
# puts it into the model. The file is the same either way.

PENDING_LOCATION = "\0reparam-onnx-pending"   # no file has this name: a reader unaware of it fails


def add_pending(graph: onnx.GraphProto, name: str, array: Any, arrays: Dict[str, Any]) -> None:
    """A stub initializer standing for `array` (the tensor edit.add_initializer would add);
    the array goes into `arrays`, made read-only."""
    import numpy as np
    array = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
    array.flags.writeable = False
    tensor = graph.initializer.add()
    tensor.dims.extend(array.shape)
    tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.name = name
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", PENDING_LOCATION
    arrays[name] = array


def pending(tensor: onnx.TensorProto, arrays: Mapping[str, Any]) -> bool:
    """A stub of add_pending whose array is in `arrays`."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and len(tensor.external_data) == 1 and \
        tensor.external_data[0].value == PENDING_LOCATION and tensor.name in arrays


def materialize(model: onnx.ModelProto, arrays: Mapping[str, Any]) -> None:
    """Put the arrays of the model's pending stubs into it: each stub becomes the tensor it stands
    for. A dict of arrays gives each up once it is in the model (the last reference to it goes)."""
    for tensor in model.graph.initializer:
        if pending(tensor, arrays):
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
            data = bytes(_array_bytes(arrays[tensor.name]))
            if isinstance(arrays, dict):
                del arrays[tensor.name]
            tensor.raw_data = data
            del data


def _array_bytes(array: Any) -> memoryview:
    """The bytes of a pending array (C order, little-endian, as add_pending keeps it)."""
    return memoryview(array).cast("B")


# ---------------------------------------------------------------- streamed serialization
#
# model.SerializeToString() holds a second copy of the whole model (and upb builds it slowly).
# Protobuf writes a message's fields in field-number order, each a record of its own (a
# submessage as tag, length, its own serialization; each element of a repeated message field
# as one such record), then the fields it did not know. So the model is written as a list of
# parts: the bytes of its small fields, serialized a few fields at a time, and, for each large
# tensor, its raw_data record, read from the tensor only when its turn comes. The bytes are
# those of SerializeToString (tests compare them on many models).

STREAM_MIN = 64 << 10   # raw_data of at least this many bytes is streamed; smaller goes with its neighbours


class _RawData:
    """The raw_data record of a tensor: its header now, its bytes when written (read from the
    tensor, from `array` for a pending stub, from its data file for a lazy tensor)."""
    __slots__ = ("tensor", "length", "header", "array")

    def __init__(self, tensor: onnx.TensorProto, length: int, array: Any = None):
        self.tensor, self.length, self.array = tensor, length, array
        self.header = _key(_RAW_DATA) + _varint(length)

    def __len__(self) -> int:
        return len(self.header) + self.length

    def data(self) -> Union[bytes, memoryview]:
        if self.array is not None:
            return _array_bytes(self.array)
        return lazy_bytes(self.tensor) if lazy(self.tensor) else self.tensor.raw_data


class _Mismatch(Exception):
    """A tensor's raw_data is not as long as its dims say: the parts' lengths were wrong."""


Part = Union[bytes, _RawData]
_Handler = Callable[[Any, Any], Optional[List[Part]]]
_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def serialized_parts(model: onnx.ModelProto, arrays: Optional[Mapping[str, Any]] = None) -> List[Part]:
    """The parts whose concatenation is model.SerializeToString() (see write_parts); with
    `arrays`, that of the model materialize(model, arrays) would make."""
    arrays = arrays or {}
    return _parts(model, {"graph": _submessage(lambda graph: _graph_parts(graph, arrays))})


def parts_size(parts: Optional[List[Part]]) -> int:
    """The serialized size of the model (0 for None)."""
    return sum(map(len, parts or ()))


class _Count:
    """Bytes written, told to a progress callback (done, total)."""

    def __init__(self, progress: Optional[Callable[[int, int], None]]):
        self.progress, self.done, self.total = progress, 0, 0

    def __call__(self, written: int) -> None:
        self.done += written
        if self.progress is not None:
            self.progress(self.done, self.total)


def write_parts(model: onnx.ModelProto, parts: List[Part], handle, count: Optional[_Count] = None,
                arrays: Optional[Mapping[str, Any]] = None) -> None:
    """Write the parts, each large tensor's bytes read from the model (or its pending array)
    in turn (one at a time in memory); a tensor whose length was mispredicted sends the whole
    model through SerializeToString instead (the file is rewritten from its start; pending
    stubs are materialized for it)."""
    try:
        for part in parts:
            if isinstance(part, bytes):
                handle.write(part)
            else:
                data = part.data()
                if len(data) != part.length:
                    raise _Mismatch(part.tensor.name)
                handle.write(part.header)
                handle.write(data)
                del data
            if count is not None:
                count(len(part))
    except _Mismatch:
        handle.seek(0)
        handle.truncate()
        materialize(model, arrays or {})
        load_lazy(model)
        handle.write(model.SerializeToString())


def _parts(message, special: Dict[str, _Handler]) -> List[Part]:
    """`message` as parts: its fields in number order, those named in `special` through their
    handler, the others serialized together with their plain neighbours. A message with fields
    unknown to this protobuf (written last) is serialized whole."""
    if _has_unknown(message):
        return [message.SerializeToString()]
    parts: List[Part] = []
    plain = None
    for field in sorted(message.DESCRIPTOR.fields, key=lambda f: f.number):
        if not _present(message, field):
            continue
        handler = special.get(field.name)
        out = handler(message, field) if handler else None
        if out is None:   # a plain field (or one its handler leaves plain)
            if plain is None:
                plain = type(message)()
            _copy_field(message, plain, field)
            continue
        if plain is not None:
            parts.append(plain.SerializeToString())
            plain = None
        parts.extend(out)
    if plain is not None:
        parts.append(plain.SerializeToString())
    return parts


def _repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)   # protobuf 7 dropped `label`
    return field.label == field.LABEL_REPEATED if repeated is None else bool(repeated)


def _present(message, field) -> bool:
    if _repeated(field):
        return len(getattr(message, field.name)) > 0
    return message.HasField(field.name)


def _copy_field(source, target, field) -> None:
    value = getattr(source, field.name)
    if _repeated(field):
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _has_unknown(message) -> bool:
    from google.protobuf import unknown_fields
    return len(unknown_fields.UnknownFieldSet(message)) > 0


def _key(number: int) -> bytes:
    """The tag of a length-delimited field."""
    return _varint(number << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _record(number: int, parts: List[Part]) -> List[Part]:
    """A length-delimited record of field `number` holding `parts`."""
    return [_key(number) + _varint(parts_size(parts))] + parts


def _submessage(parts_of):
    """A handler writing a singular message field as a record of parts_of(the message)."""
    return lambda message, field: _record(field.number, parts_of(getattr(message, field.name)))


def _each(parts_of, wanted=lambda element: True):
    """A handler writing a repeated message field element by element, each a record of
    parts_of(element); plain (None) when no element is `wanted`."""
    def handler(message, field):
        elements = getattr(message, field.name)
        if not any(wanted(e) for e in elements):
            return None
        out: List[Part] = []
        for element in elements:
            out.extend(_record(field.number, parts_of(element) if wanted(element) else [element.SerializeToString()]))
        return out
    return handler


def _graph_parts(graph: onnx.GraphProto, arrays: Mapping[str, Any]) -> List[Part]:
    def initializer_parts(tensor: onnx.TensorProto) -> List[Part]:
        if pending(tensor, arrays):
            return _pending_parts(tensor, arrays[tensor.name])
        return _lazy_parts(tensor) if lazy(tensor) else _tensor_parts(tensor)
    return _parts(graph, {"initializer": _each(initializer_parts,
                                               lambda t: _large(t) or pending(t, arrays) or lazy(t)),
                          "node": _each(_node_parts, _has_large_attribute)})


def _pending_parts(stub: onnx.TensorProto, array: Any) -> List[Part]:
    """The parts of the tensor a pending stub stands for: its fields without the stub's external
    location, and the array's bytes as its raw_data, in field-number order."""
    tensor = onnx.TensorProto()
    tensor.CopyFrom(stub)
    tensor.ClearField("external_data")
    tensor.ClearField("data_location")
    before, after = onnx.TensorProto(), onnx.TensorProto()
    for field, _ in tensor.ListFields():
        _copy_field(tensor, before if field.number < _RAW_DATA else after, field)
    raw = _RawData(stub, array.nbytes, array)
    return [p for p in (before.SerializeToString(), raw, after.SerializeToString()) if len(p)]


def _lazy_parts(lazy_tensor: onnx.TensorProto) -> List[Part]:
    """The parts of the tensor load_lazy would make of a lazy one: its fields without the
    external entries, data_location DEFAULT, the file's bytes as its raw_data."""
    tensor = onnx.TensorProto()
    tensor.CopyFrom(lazy_tensor)
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.DEFAULT
    before, after = onnx.TensorProto(), onnx.TensorProto()
    for field, _ in tensor.ListFields():
        _copy_field(tensor, before if field.number < _RAW_DATA else after, field)
    raw = _RawData(lazy_tensor, _lazy_entry(lazy_tensor)[3])
    return [p for p in (before.SerializeToString(), raw, after.SerializeToString()) if len(p)]


def _node_parts(node: onnx.NodeProto) -> List[Part]:
    return _parts(node, {"attribute": _each(_attribute_parts, _has_large_tensor)})


def _attribute_parts(attribute: onnx.AttributeProto) -> List[Part]:
    return _parts(attribute, {"t": _submessage(_tensor_parts)})


def _has_large_attribute(node: onnx.NodeProto) -> bool:
    return any(_has_large_tensor(a) for a in node.attribute)


def _has_large_tensor(attribute: onnx.AttributeProto) -> bool:
    return attribute.HasField("t") and _large(attribute.t)


def _large(tensor: onnx.TensorProto) -> bool:
    if not tensor.HasField("raw_data"):
        return False
    length = _raw_length(tensor)
    return length is not None and length >= STREAM_MIN


def _raw_length(tensor: onnx.TensorProto) -> Optional[int]:
    """How long the tensor's raw_data is, from its dims (None: a type whose size is not known here)."""
    size = _ITEM_SIZE.get(tensor.data_type)
    return None if size is None else math.prod(tensor.dims) * size


def _tensor_parts(tensor: onnx.TensorProto) -> List[Part]:
    return _parts(tensor, {"raw_data": lambda t, field: [_RawData(t, _raw_length(t))]})


def write_atomic(path: Path, write, like: Optional[PathLike] = None) -> None:
    """Write `path` through a temporary file in its folder (fsync, rename): nothing half-written.

    The file gets the mode of `like`, else of the file it replaces, else 0666 & ~umask
    (mkstemp alone would make every output 0600).
    """
    mode = _mode_of(like) if like is not None and os.path.exists(like) else _mode_of(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except OSError as exc:
        raise InputError(f"cannot write '{path}': {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise InputError(f"cannot write '{path}': {exc.strerror or exc}") from None
        raise


def _mode_of(path: PathLike) -> int:
    """The permission bits of an existing regular file, else those a new file gets."""
    try:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode):
            return stat.S_IMODE(info.st_mode) & 0o777
    except (OSError, ValueError):
        pass
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask; read from /proc where it can be, since reading it with os.umask
    means setting it for a moment, for every thread."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file: the same inode when both exist, else the same
    resolved path (symlinked folders, './' and '..' resolved)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
