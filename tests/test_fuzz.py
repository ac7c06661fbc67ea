"""Fuzzing the command line: random mutations of valid model bytes never produce a traceback.

Each mutant is written to a file and given to `reparam-onnx MUTANT -o OUT`. Whatever the
bytes, the tool must end with exit code 0, 1, 2 or 3 (never 4 = internal error, never a
signal, never a hang), print no Python traceback, print at most one stderr line when it
fails, and write a loadable model when it succeeds.

Most mutants run in one child process per batch that calls `reparam_onnx.cli.main` in a loop
(a fresh interpreter per mutant would cost ~1 s of imports each); the child is limited in
address space, records each mutant before and after running it, and is watched: a mutant
that crashes the child or runs too long is reported, and the batch resumes after it. A few
mutants also run as `python -m reparam_onnx.cli` in their own process.
"""
from __future__ import annotations

import json
import random
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import FIXTURES, Builder, repvgg_block

MEMORY_LIMIT = 2 << 30          # bytes of address space for every child process
TIMEOUT = 20.0                  # seconds per mutant
ALLOWED = {0, 1, 2, 3}          # 4 = internal error


def _limit_memory():  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


# ---------------------------------------------------------------- seed models


def repvgg_bytes() -> bytes:
    b = Builder(seed=7)
    x = b.input([1, 4, 6, 6])
    y = b.node("Relu", [repvgg_block(b, x, 4, 4)])
    y = repvgg_block(b, y, 4, 8, stride=2)
    return b.model(y).SerializeToString()


def bn_moves_bytes() -> bytes:
    """BNs that move (sink.py): read directly by three 1×1 convs, flattened by their own Shape
    with a dynamic batch into three Linears, averaged into a Gemm head."""
    b = Builder(seed=8)
    c = 4
    x = b.input(["B", c, 3, 5])
    ints = lambda v: _int64(b, v)
    y = b.bn(x, c)
    outs = [b.conv(y, c, 3, (1, 1)) for _ in range(3)]
    y = b.bn(x, c)
    shape = b.node("Slice", [b.node("Shape", [y]), ints([0]), ints([2]), ints([0])])
    tokens = b.node("Transpose", [b.node("Reshape", [y, b.node("Concat", [shape, ints([-1])], axis=0)])], perm=[0, 2, 1])
    for _ in range(3):   # q, k, v
        outs.append(b.node("Add", [b.node("MatMul", [tokens, b.const(b.rng.normal(size=(c, 3)))]),
                                   b.const(b.rng.normal(size=3))]))
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [b.bn(x, c)])])
    outs.append(b.node("Gemm", [pooled, b.const(b.rng.normal(size=(3, c))), b.const(b.rng.normal(size=3))], transB=1))
    return b.model(*outs).SerializeToString()


def _int64(b: Builder, values) -> str:
    name = b.name("i")
    b.inits.append(onnx.numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


SEEDS = {
    "builder_repvgg": repvgg_bytes,
    "torch_repvgg": lambda: (FIXTURES / "torch" / "repvgg.ts_cf.onnx").read_bytes(),
    "tf_keras3_noopt": lambda: (FIXTURES / "tf" / "keras3_nhwc_op17_noopt.onnx").read_bytes(),
    # index grids from shapes (symbolic.py), DBB's border writes, AvgPool, Conv∘Conv
    "torch_dbb_b1": lambda: (FIXTURES / "families" / "dbb.ts_b1.onnx").read_bytes(),
    "builder_bn_moves": bn_moves_bytes,
}


# ---------------------------------------------------------------- the protobuf wire format


def _varint(data: bytes, pos: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return value, pos


def encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def parse(data: bytes, depth: int = 0) -> Optional[list]:
    """A serialized message as [field number, wire type, payload] entries: an int for a varint,
    bytes for fixed-size fields and for length-delimited fields that are not messages, and a
    nested list for those that parse as messages. None when `data` is not a message."""
    entries, pos = [], 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            field, wire = key >> 3, key & 7
            if field == 0:
                return None
            if wire == 0:
                value, pos = _varint(data, pos)
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                value, pos = data[pos:pos + size], pos + size
            elif wire == 2:
                size, pos = _varint(data, pos)
                value, pos = data[pos:pos + size], pos + size
                sub = parse(value, depth + 1) if depth < 10 and value else None
                value = sub if sub is not None else value
            else:
                return None
            if pos > len(data):
                return None
            entries.append([field, wire, value])
    except ValueError:
        return None
    return entries


def serialize(entries: list) -> bytes:
    out = bytearray()
    for field, wire, value in entries:
        out += encode_varint(field << 3 | wire)
        if wire == 0:
            out += encode_varint(value)
        elif wire == 2:
            body = serialize(value) if isinstance(value, list) else value
            out += encode_varint(len(body)) + body
        else:
            out += value
    return bytes(out)


def varint_entries(entries: list) -> list:
    """Every varint entry of the tree (mutable lists: change entry[2] and serialize again)."""
    found = []
    for entry in entries:
        if entry[1] == 0:
            found.append(entry)
        elif isinstance(entry[2], list):
            found.extend(varint_entries(entry[2]))
    return found


# ---------------------------------------------------------------- mutations


HUGE = [2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1, 100000]


def mutate(data: bytes, kind: str, seed: int) -> bytes:
    """A deterministic mutant of `data`."""
    rng = random.Random(f"{kind}:{seed}")
    out = bytearray(data)
    if kind == "flip":
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            out[rng.randrange(len(out))] ^= rng.choice([0x01, 0x80, 0xFF, rng.randrange(1, 256)])
    elif kind == "truncate":
        out = out[:rng.randrange(len(out))]
    elif kind == "duplicate":
        a = rng.randrange(len(out))
        b = min(len(out), a + rng.choice([1, 2, 8, 64, 512, len(out)]))
        at = rng.randrange(len(out) + 1)
        out[at:at] = out[a:b]
    elif kind == "varint":
        # a varint value (dims, attribute ints, data types, indices, ...) set to an extreme;
        # the message is serialized again so that every enclosing length stays right
        tree = parse(data)
        spots = varint_entries(tree)
        for _ in range(rng.choice([1, 1, 2])):
            entry = rng.choice(spots)
            entry[2] = rng.choice(HUGE + [0, 1, 2, 3, 2**64 - 1, 2**64 - 2**31])   # the last two: -1, -2^31
        out = bytearray(serialize(tree))
    elif kind == "length":
        # a length prefix set to an extreme: the parser must refuse it
        keys = [m.start() + 1 for m in re.finditer(rb"[\x0a\x12\x1a\x22\x2a\x32\x3a\x42]", data[:-10])]
        offset = rng.choice(keys)
        _, after = _varint(data, offset)
        out[offset:after] = encode_varint(rng.choice(HUGE))
    else:
        raise ValueError(kind)
    return bytes(out)


KINDS = ("flip", "truncate", "duplicate", "varint", "length")


# ---------------------------------------------------------------- running the CLI

# The child of a batch: run cli.main on every job in turn; native output on fd 1/2 is
# captured too (onnxruntime logs there). A "start" line is flushed before each job, so a
# crash or a hang can be pinned on it.
BATCH_CHILD = r"""
import json, os, sys, tempfile
from reparam_onnx import cli
jobs, log_path, first = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
log = open(log_path, "a", buffering=1)
for n in range(first, len(jobs)):
    model, out = jobs[n]
    log.write(json.dumps({"start": n}) + "\n")
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as std:
        saved = os.dup(1), os.dup(2)
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(std.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            cli.main([model, "-o", out])
            code = 0
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:   # cli.main itself let something escape
            import traceback
            traceback.print_exc()
            code = "escaped " + type(exc).__name__
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
            os.close(saved[0]); os.close(saved[1])
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    log.write(json.dumps({"done": n, "code": code, "stderr": stderr}) + "\n")
"""


@dataclass
class Outcome:
    name: str
    code: object          # int exit code, or "signal N", "timeout", "escaped X"
    stderr: str
    output: Path


def run_batch(jobs: List[Tuple[str, Path, Path]], folder: Path, child: str = BATCH_CHILD,
              timeout: float = TIMEOUT) -> List[Outcome]:
    """Run (name, model, out) jobs through cli.main in watched child processes."""
    manifest = folder / "jobs.json"
    manifest.write_text(json.dumps([[str(m), str(o)] for _, m, o in jobs]))
    log = folder / "results.jsonl"
    log.write_text("")
    script = folder / "batch_child.py"
    script.write_text(child)
    results: Dict[int, Tuple[object, str]] = {}
    first = 0
    while first < len(jobs):
        with open(folder / "child_stderr.txt", "w+b") as child_err:
            proc = subprocess.Popen([sys.executable, str(script), str(manifest), str(log), str(first)],
                                    stdout=subprocess.DEVNULL, stderr=child_err, preexec_fn=_limit_memory)
            current, since, seen = None, time.monotonic(), 0
            while True:
                done = proc.poll() is not None
                text = log.read_text()
                lines = text[:text.rfind("\n") + 1].splitlines()      # complete lines only
                for line in lines[seen:]:
                    entry = json.loads(line)
                    if "start" in entry:
                        current, since = entry["start"], time.monotonic()
                    else:
                        results[entry["done"]] = (entry["code"], entry["stderr"])
                        current = None
                seen = len(lines)
                if done:
                    break
                if current is not None and time.monotonic() - since > timeout:
                    proc.kill()
                    proc.wait()
                    results[current] = ("timeout", "")
                    break
                time.sleep(0.02)
            child_err.seek(0)
            err = child_err.read().decode("utf-8", "replace")
        if current is None:           # the child went through every job
            assert proc.returncode == 0, f"the batch child failed outside a job: {err}"
            break
        if current not in results:    # the child died inside a job
            results[current] = (f"signal {-proc.returncode}" if proc.returncode < 0 else
                                f"child exit {proc.returncode}", err)
        first = current + 1
    return [Outcome(name, *results.get(n, ("not run", "")), output=out) for n, (name, _, out) in enumerate(jobs)]


def run_subprocess(model: Path, out: Path, name: str) -> Outcome:
    try:
        proc = subprocess.run([sys.executable, "-m", "reparam_onnx.cli", str(model), "-o", str(out)],
                              capture_output=True, text=True, timeout=TIMEOUT + 10, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        return Outcome(name, "timeout", "", out)
    code = proc.returncode if proc.returncode >= 0 else f"signal {-proc.returncode}"
    return Outcome(name, code, proc.stderr, out)


def problems(outcome: Outcome) -> List[str]:
    """What is wrong with one run (empty when it behaved)."""
    found = []
    if outcome.code not in ALLOWED:
        found.append(f"exit {outcome.code}")
    if "Traceback" in outcome.stderr:
        found.append("a traceback on stderr")
    lines = outcome.stderr.strip().splitlines()
    if outcome.code != 0 and len(lines) > 1:
        found.append(f"{len(lines)} stderr lines")
    if outcome.code == 3 and "verification failed" in outcome.stderr:
        found.append("the fused model differs from the input (a wrong fusion)")
    if outcome.code == 0:
        try:
            onnx.load(str(outcome.output))
        except Exception as exc:
            found.append(f"exit 0 but the output does not load ({type(exc).__name__})")
    elif outcome.output.exists():
        found.append("a failed run left an output file")
    return found


def describe(outcome: Outcome) -> str:
    last = outcome.stderr.strip().splitlines()[-1:] or [""]
    return f"{outcome.name}: {', '.join(problems(outcome))}: {last[0][:300]}"


# ---------------------------------------------------------------- the mutant corpus

PER_KIND = 100      # mutants per seed model and mutation kind: 5 × 5 × 100 = 2500


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> List[Tuple[str, Path, Path]]:
    folder = tmp_path_factory.mktemp("mutants")
    jobs = []
    for name, make in SEEDS.items():
        data = make()
        for kind in KINDS:
            for seed in range(PER_KIND):
                tag = f"{name}.{kind}.{seed}"
                model = folder / f"{tag}.onnx"
                model.write_bytes(mutate(data, kind, seed))
                jobs.append((tag, model, folder / "out" / f"{tag}.onnx"))
    (folder / "out").mkdir()
    return jobs


def test_mutations_are_deterministic():
    data = SEEDS["builder_repvgg"]()
    assert data == SEEDS["builder_repvgg"]()
    for kind in KINDS:
        assert mutate(data, kind, 3) == mutate(data, kind, 3) != data


def test_wire_format_round_trip():
    for make in SEEDS.values():
        data = make()
        tree = parse(data)
        assert serialize(tree) == data
        assert len(varint_entries(tree)) > 100
    # a varint mutation keeps the message parseable and lands in the model
    model = onnx.load_from_string(SEEDS["builder_repvgg"]())
    tree = parse(model.SerializeToString())
    graph = next(e[2] for e in tree if e[0] == 7)                      # ModelProto.graph
    initializer = next(e[2] for e in graph if e[0] == 5)               # GraphProto.initializer
    next(e for e in initializer if e[0] == 1)[2] = 2**40               # TensorProto.dims[0]
    mutant = onnx.load_from_string(serialize(tree))
    assert mutant.graph.initializer[0].dims[0] == 2**40
    assert _varint(encode_varint(2**63 - 1), 0)[0] == 2**63 - 1
    assert _varint(encode_varint(-1), 0)[0] == 2**64 - 1


# A stand-in child for the harness's own test: job 1 crashes, job 3 hangs.
_MISBEHAVING_CHILD = BATCH_CHILD.replace("            cli.main([model, \"-o\", out])\n", """\
            if n == 1:
                os.kill(os.getpid(), 11)
            if n == 3:
                import time; time.sleep(60)
            cli.main([model, "-o", out])
""")


def test_harness_reports_crashes_and_hangs(tmp_path):
    assert _MISBEHAVING_CHILD != BATCH_CHILD
    model = tmp_path / "model.onnx"
    model.write_bytes(SEEDS["builder_repvgg"]())
    jobs = [(f"job{n}", model, tmp_path / f"out{n}.onnx") for n in range(5)]
    outcomes = run_batch(jobs, tmp_path, child=_MISBEHAVING_CHILD, timeout=2.0)
    assert [o.code for o in outcomes] == [0, "signal 11", 0, "timeout", 0]
    assert [bool(problems(o)) for o in outcomes] == [False, True, False, True, False]


def test_mutants_fail_cleanly(corpus, tmp_path):
    """2500 mutants through cli.main in watched, memory-limited children."""
    outcomes = run_batch(corpus, tmp_path)
    codes = [o.code for o in outcomes]
    assert "not run" not in codes
    assert codes.count(0) >= 10, "too few mutants survive parsing to exercise the engine"
    failures = [describe(o) for o in outcomes if problems(o)]
    assert not failures, "\n".join(failures)


# A few mutants in a process of their own, as users run the tool: one per mutation kind
# (the flip and the varint mutant parse and reach the engine; the others are refused at load).
OWN_PROCESS = ["builder_repvgg.flip.0", "tf_keras3_noopt.varint.2", "torch_repvgg.duplicate.5",
               "torch_repvgg.truncate.7", "builder_repvgg.length.1"]


@pytest.mark.parametrize("tag", OWN_PROCESS)
def test_mutant_in_own_process(tag, tmp_path):
    name, kind, seed = tag.split(".")
    model = tmp_path / "mutant.onnx"
    model.write_bytes(mutate(SEEDS[name](), kind, int(seed)))
    outcome = run_subprocess(model, tmp_path / "out.onnx", tag)
    assert not problems(outcome), describe(outcome)


# ---------------------------------------------------------------- regressions
#
# Minimal reproductions of what this fuzzing once found (each was an internal error, exit 4,
# or several stderr lines): now each is refused at load with one line (validate.py) or
# handled by the engine.


def _repvgg_model(**block) -> onnx.ModelProto:
    b = Builder(seed=7)
    x = b.input([1, 4, 6, 6])
    return b.model(b.node("Relu", [repvgg_block(b, x, 4, 4, **block)]))


def _node(model, op, n=0):
    return [node for node in model.graph.node if node.op_type == op][n]


def _set_attr(node, name, value):
    attrs = [a for a in node.attribute if a.name == name]
    new = helper.make_attribute(name, value)
    if attrs:
        attrs[0].CopyFrom(new)
    else:
        node.attribute.append(new)


def _initializer(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def _edited(edit):
    def make() -> bytes:
        model = _repvgg_model()
        result = edit(model)
        return result if isinstance(result, bytes) else model.SerializeToString()
    return make


def _short_raw_data(m):
    w = _initializer(m, _node(m, "Conv").input[1])
    w.raw_data = w.raw_data[:-4]


def _overflowing_dims(m):
    w = _initializer(m, _node(m, "Conv").input[1])
    del w.dims[:]
    w.dims.extend([2**32, 2**32, 3, 3])        # the int64 product wraps to 0
    w.ClearField("raw_data")


def _bad_utf8_graph_name(m):
    m.graph.name = "GRAPHNAME"
    return m.SerializeToString().replace(b"GRAPHNAME", b"GRAPHNAM\xff")


def _transposed_block(perm) -> bytes:
    """tf2onnx without optimizers: NHWC input, Transpose → Conv → Transpose per branch."""
    b = Builder(seed=3)
    x = b.input([1, 6, 6, 4])

    def branch(k, p, first):
        t = b.node("Transpose", [x], perm=first)
        y = b.node("Transpose", [b.conv(t, 4, 4, (k, k), pads=(p,) * 4)], perm=[0, 2, 3, 1])
        return b.node("Mul", [y, b.const(b.rng.uniform(0.5, 1.5, 4), "s")])

    return b.model(b.add(branch(3, 1, [0, 3, 1, 2]), branch(1, 0, perm))).SerializeToString()


def _ort_runtime_error() -> bytes:
    """A fusable block, then a Conv whose kernel_shape contradicts its weight: the original
    model fails inside onnxruntime.run during verification."""
    b = Builder(seed=7)
    x = b.input([1, 4, 6, 6])
    y = b.conv(repvgg_block(b, x, 4, 4), 4, 4, (3, 3), pads=(1,) * 4)
    _set_attr(b.nodes[-1], "kernel_shape", [2, 1])
    return b.model(y).SerializeToString()


def _constant_of_an_unknown_type(m):
    """A Constant holding a tensor of element type 100000 (a varint mutant of a TorchScript DBB):
    shape inference passed the number on, and reading it as a numpy dtype raised KeyError."""
    t = TensorProto(name="c", data_type=100000, raw_data=b"\0" * 4)
    m.graph.node.insert(0, helper.make_node("Constant", [], ["c_out"], name="odd_constant", value=t))
    m.graph.output.add().name = "c_out"


def _malformed_constant(m):
    """A Constant whose float scalar holds 8 bytes, multiplying the model's output: checked on
    load as an initializer is (folding it raised numpy's reshape error as an internal error)."""
    t = TensorProto(name="c", data_type=TensorProto.FLOAT, raw_data=b"\0" * 8)   # dims [], 8 bytes
    out = m.graph.output[0].name
    producer = next(n for n in m.graph.node if out in n.output)
    producer.output[list(producer.output).index(out)] = "before_scale"
    m.graph.node.insert(0, helper.make_node("Constant", [], ["c_out"], name="bad_constant", value=t))
    m.graph.node.append(helper.make_node("Mul", ["before_scale", "c_out"], [out], name="scale"))


REPRODUCTIONS = {
    # name: (what it once broke, model bytes)
    "constant_of_an_unknown_type": ("dtype", _edited(_constant_of_an_unknown_type)),
    "malformed_constant": ("payload", _edited(_malformed_constant)),
    "short_raw_data": ("payload", _edited(_short_raw_data)),
    "overflowing_dims": ("payload", _edited(_overflowing_dims)),
    "bad_utf8_op_type": ("utf8", _edited(lambda m: m.SerializeToString().replace(b"Relu", b"Rel\xff"))),
    "bad_utf8_graph_name": ("utf8", _edited(_bad_utf8_graph_name)),
    "bn_with_4_inputs": ("bn_inputs", _edited(lambda m: _node(m, "BatchNormalization").input.pop())),
    "conv_pads_int": ("attr_type", _edited(lambda m: _set_attr(_node(m, "Conv"), "pads", 1))),
    "conv_group_string": ("attr_type", _edited(lambda m: _set_attr(_node(m, "Conv"), "group", b""))),
    "bn_epsilon_string": ("attr_type", _edited(lambda m: _set_attr(_node(m, "BatchNormalization"), "epsilon", b"x"))),
    "transpose_perm_int": ("attr_type", lambda: _transposed_block(3)),
    "initializer_dtype_undefined": ("dtype", _edited(
        lambda m: setattr(_initializer(m, _node(m, "Conv").input[1]), "data_type", 0))),
    "input_elem_type_negative": ("dtype", _edited(
        lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", -1))),
    "conv_dilations_0": ("dilation0", _edited(lambda m: _set_attr(_node(m, "Conv"), "dilations", [0, 0]))),
    "transpose_perm_repeats_an_axis": ("perm", lambda: _transposed_block([0, 3, 3, 2])),
    "transpose_perm_out_of_range": ("perm", lambda: _transposed_block([0, 3, 1, 9])),
    "input_channels_negative": ("input_dims", _edited(
        lambda m: setattr(m.graph.input[0].type.tensor_type.shape.dim[1], "dim_value", -4))),
    "ort_error_during_verification": ("ort_log", _ort_runtime_error),
}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> Dict[str, Outcome]:
    """Every reproduction through cli.main in one watched child."""
    folder = tmp_path_factory.mktemp("repro")
    (folder / "out").mkdir()
    jobs = []
    for name, (_, make) in REPRODUCTIONS.items():
        model = folder / f"{name}.onnx"
        model.write_bytes(make())
        jobs.append((name, model, folder / "out" / f"{name}.onnx"))
    return {o.name: o for o in run_batch(jobs, folder)}


@pytest.mark.parametrize("name", sorted(REPRODUCTIONS))
def test_regression(name, reproduced):
    outcome = reproduced[name]
    assert not problems(outcome), describe(outcome)
    assert outcome.code in (0, 2, 3), describe(outcome)


# ---------------------------------------------------------------- tensors that claim huge sizes


def _huge_unused_initializer(m):
    t = m.graph.initializer.add()
    t.name, t.data_type = "huge", TensorProto.FLOAT
    t.dims.extend([100000, 100000, 100])            # 10^12 floats, and no data


def _huge_weight(m):
    w = _initializer(m, _node(m, "Conv").input[1])
    del w.dims[:]
    w.dims.extend([100000, 100000, 100])
    w.ClearField("raw_data")


def _huge_input_channels():
    b = Builder(seed=7)
    x = b.input([1, 2**31 - 1, 6, 6])
    return b.model(b.node("Relu", [repvgg_block(b, x, 4, 4)])).SerializeToString()


def _huge_range_indices():
    """ScatterND indices Range(0, 2^40) over a padded conv output, then a 3x3 conv: shape
    inference's data propagation, the constant folder and the index-grid reader each once
    tried to build the 2^40 values."""
    from onnx import numpy_helper
    b = Builder(seed=8)
    x = b.input([1, 4, 7, 9])
    y = b.node("Pad", [b.conv(x, 4, 4, (1, 1)), "pads"], mode="constant")
    b.inits += [numpy_helper.from_array(np.array(v, np.int64), n) for v, n in
                (([0, 0, 1, 1, 0, 0, 1, 1], "pads"), (0, "start"), (2 ** 40, "limit"), (1, "delta"), ([-1], "axes"))]
    indices = b.node("Unsqueeze", [b.node("Range", ["start", "limit", "delta"]), "axes"])
    updates = b.node("Expand", [b.const(np.ones((4, 1, 1))), b.node("Shape", [y])])
    written = b.node("ScatterND", [y, indices, updates])
    return b.model(b.conv(written, 4, 4, (3, 3))).SerializeToString()


HUGE_CASES = {
    "range_indices": (_huge_range_indices,
                      "ScatterND indices Range(0, 2^40): onnx's shape inference propagated its values "
                      "until the process was killed"),
    "unused_initializer": (_edited(_huge_unused_initializer),
                           "an initializer claiming [100000, 100000, 100] with no data is not checked at load "
                           "(io.check): nothing reads it, the model is written back, exit 0"),
    "conv_weight": (_edited(_huge_weight),
                    "a Conv weight claiming [100000, 100000, 100] with no data is not rejected at load: the "
                    "rest of the model is fused and onnxruntime's refusal of the original is reported as "
                    "exit 3 'verification could not run' instead of an input error (exit 2)"),
    "overflowing_dims": (_edited(_overflowing_dims),
                         "dims [2^32, 2^32, 3, 3]: graph._check_size's int64 np.prod wraps to 0, so the cap "
                         "MAX_FOLD_ELEMENTS is bypassed; numpy_helper.to_array then raises: exit 4"),
    "input_channels": (_huge_input_channels,
                       "a graph input claiming 2^31 - 1 channels: linear.evaluate allocates np.ones(channels) "
                       "(16 GiB) without a cap; only the address-space limit turns it into 'out of memory'"),
    "conv_pads": (_edited(lambda m: _set_attr(_node(m, "Conv"), "pads", [2**31 - 1, 1, 1, 1])),
                  "a Conv with pads 2^31 - 1 (output ~10^9 rows): neither checked alone nor verified"),
}


UNTOUCHED_OK = {"input_channels", "conv_pads", "range_indices"}


@pytest.mark.parametrize("case", sorted(HUGE_CASES))
def test_huge_claimed_sizes_fail_cleanly(case, tmp_path):
    """Exit 2 with one line, fast, without trying to allocate the claimed size (a subprocess
    with a 2 GiB address-space limit: trying would end in 'out of memory' or a crash)."""
    model = tmp_path / f"{case}.onnx"
    model.write_bytes(HUGE_CASES[case][0]())
    started = time.monotonic()
    outcome = run_subprocess(model, tmp_path / "out.onnx", case)
    assert time.monotonic() - started < TIMEOUT
    assert not problems(outcome), describe(outcome)
    assert "out of memory" not in outcome.stderr
    if case in UNTOUCHED_OK:
        # a model the runtime would reject only when run: its blocks are left (no block can be
        # checked) and it comes back unchanged, or it is refused, or it cannot be verified (exit 3)
        assert outcome.code in (0, 2, 3), describe(outcome)
        if outcome.code == 0:
            assert onnx.load(str(tmp_path / "out.onnx")).SerializeToString() == \
                onnx.load(str(model)).SerializeToString()
    else:
        assert outcome.code == 2, describe(outcome)


@pytest.mark.parametrize("op,values,attrs,size", [
    ("Range", [np.array(0), np.array(2 ** 40), np.array(1)], {}, 2 ** 40),
    ("Range", [np.array(5.0), np.array(0.0), np.array(-2.0)], {}, 3),
    ("ConstantOfShape", [np.array([2 ** 20, 2 ** 20])], {}, 2 ** 40),
    ("Expand", [np.ones((3, 1)), np.array([1, 2 ** 30])], {}, 3 * 2 ** 30),
    ("Tile", [np.ones((2, 3)), np.array([4, 5])], {}, 120),
    ("Pad", [np.ones((2, 3)), np.array([1, 0, 1, 2])], {}, 20),
    ("MatMul", [np.ones((7, 4, 1)), np.ones((1, 9))], {}, 7 * 4 * 9),
    ("Gemm", [np.ones((4, 6)), np.ones((5, 4))], {"transA": 1, "transB": 1}, 30),
    ("Einsum", [np.ones(1000), np.ones(3000)], {"equation": "i,j->ij"}, 3_000_000),
])
def test_output_size_is_counted_before_evaluating(op, values, attrs, size):
    """The element count an op would make from its inputs' values, before the folder allocates it."""
    from reparam_onnx.graph import output_size
    node = helper.make_node(op, [f"i{k}" for k in range(len(values))], ["y"], **attrs)
    assert output_size(node, values) == size
