"""The library entry points: fuse() and fuse_with_report()."""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import onnx

from . import io
from .errors import InputError, VerificationError
from .report import BlockReport, Report, Verification
from .analyse import FuseOptions
from .edit import op_counts
from .rewrite import fuse_graph
from .rulebook import RuleError, load_rules
from . import validate
from .shapes import SPATIAL, covering_sizes, static_shapes
from .verify import compare, has_dynamic_spatial, random_inputs, too_large
from .verify import Model, reference as verify_reference

ModelLike = Union[str, "os.PathLike[str]", onnx.ModelProto]

_UNSUPPORTED_OPS = {"If": "If", "Loop": "Loop", "Scan": "Scan",
                    "QuantizeLinear": "quantized (Q/DQ)", "DequantizeLinear": "quantized (Q/DQ)",
                    "QLinearConv": "quantized (QLinearConv)"}


@dataclass
class FuseResult:
    model: onnx.ModelProto          # the fused model (the input itself when nothing was fused)
    report: Report
    data_files: List[str] = field(default_factory=list)   # the input's external data files
    # within to_save(): the arrays of the model's pending stubs (io.save writes them; io.materialize
    # puts them into the model); empty otherwise
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def external_data(self) -> bool:
        """The input kept its weights in external data files (so does the output)."""
        return bool(self.data_files)


def fuse_with_report(model: ModelLike, *, verify: bool = True, rules: Iterable[str] = (),
                     builtin_rules: bool = True, seed: int = 0, rtol: Optional[float] = None,
                     atol: float = 0.0, inputs: Optional[Dict[str, np.ndarray]] = None,
                     initializers_as_constants: bool = False, write: bool = True,
                     check_blocks: bool = True, allow_larger: bool = False,
                     disable_rules: Iterable[str] = (),
                     progress: Optional[Callable[[str], None]] = None) -> FuseResult:
    """Fuse every exact, wanted block and say what happened.

    `model` is a path or an onnx.ModelProto; a ModelProto is never modified. `rules`
    names extra folders of rule files. With verify=True onnxruntime compares the two
    models (see verify.py) and VerificationError is raised, carrying the report, when
    they differ beyond rtol/atol or cannot be run. With write=False the model is only
    analysed: the report lists the blocks, and the returned model is the input.
    With check_blocks=True (independent of `verify`) every block is first run alone against
    its fused conv, and left unfused when they differ. A block whose merged conv would have
    more weights (multiply-adds) than its branches stays unless allow_larger=True.
    `disable_rules` names rules not to use (e.g. "generic": only the named families fuse).
    `progress`, when given, is called with the name of each stage as it starts ("load",
    "analyse and fuse", "verify").
    Within `with to_save():` (the command) the large fused weights are not copied into the
    returned model, which holds stubs for them (io.add_pending); their arrays are the result's
    `arrays`, and io.save(model, ..., arrays=result.arrays) writes the file the complete model
    would make. The large weights of an input's external data are read from their files when
    needed (io.load(lazy=True)); outside to_save() the returned model holds them all, within it
    the untouched ones stay in their files and io.save copies them from there.
    """
    stage = progress or (lambda name: None)
    try:
        rulebook = load_rules(rules, builtin=builtin_rules, disabled=disable_rules)
    except RuleError as exc:
        raise InputError(str(exc)) from None
    stage("load")
    original, folder, data_files = io.load(model, lazy=True)   # large external weights stay in their files
    validate.check_model(original, f"'{model}'" if not isinstance(model, onnx.ModelProto) else "the model",
                         io.raw_lengths(original))
    report = Report(ops_before=op_counts(original.graph))
    if initializers_as_constants:
        report.notes.append("initializers listed as graph inputs were treated as constants (--initializers-as-constants)")
    _note_unsupported(original, report)
    reference: Model = original
    if write and isinstance(model, onnx.ModelProto):
        work = onnx.ModelProto()   # the caller's proto stays intact
        work.CopyFrom(original)
    else:
        work = original            # not edited (analysis), or loaded here: edited in place
        if write and verify:       # what verification compares with, without a copy of the weights
            reference = verify_reference(original)
    options = FuseOptions(rulebook, initializers_as_constants, str(folder) if folder else None,
                          check_blocks=check_blocks, seed=seed, rtol=rtol, atol=atol, allow_larger=allow_larger)
    stage("analyse and fuse")
    arrays: Dict[str, np.ndarray] = {}
    report.blocks, notes = fuse_graph(work, options, write=write, arrays=arrays)
    if not _TO_SAVE.get():
        io.materialize(work, arrays)
        arrays = {}
    for block in report.unfused:
        block.risk = None   # figures of weights that were never written
    report.notes.extend(notes)
    fused_blocks = [b for b in report.blocks if b.fused]
    result_model = work if write and fused_blocks else original
    report.ops_after = op_counts(result_model.graph)
    if not verify:
        report.verification = Verification(ran=False, passed=True, message="--no-verify")
    elif not fused_blocks:
        report.verification = Verification(ran=False, passed=True, message="nothing was fused")
    elif not write:
        report.verification = Verification(ran=False, passed=True, message="analysis only")
    else:
        stage("verify")
        report.verification = _verify(reference, work, fused_blocks, seed, rtol, atol, inputs, arrays)
        if report.verification.ran and report.verification.message:
            report.notes.append(report.verification.message)
        if not report.verification.passed:
            raise VerificationError(_failure(report.verification), report)
    report.written = bool(write and fused_blocks)
    if not _TO_SAVE.get():
        io.load_lazy(result_model)   # a complete model, as onnx.load would give it
    return FuseResult(result_model, report, [str(f) for f in data_files], arrays if result_model is work else {})


_TO_SAVE: ContextVar[bool] = ContextVar("reparam_onnx_to_save", default=False)


@contextmanager
def to_save() -> Iterator[None]:
    """fuse_with_report within it keeps the large fused weights apart (see fuse_with_report):
    for a model that is only going to be saved with io.save."""
    token = _TO_SAVE.set(True)
    try:
        yield
    finally:
        _TO_SAVE.reset(token)


def _verify(reference: Model, fused: onnx.ModelProto, fused_blocks: Sequence[BlockReport], seed: int,
            rtol: Optional[float], atol: float, inputs: Optional[Dict[str, np.ndarray]],
            arrays: Optional[Dict[str, np.ndarray]] = None) -> Verification:
    """The whole-model comparison, on the graph outputs and every fused block's output.
    `reference`: the original model, or verify.reference() of it taken before it was edited;
    `arrays`: those of the fused model's pending stubs."""
    original = reference[0] if isinstance(reference, tuple) else reference   # its graph, all that is read here
    shapes = static_shapes(original)
    huge = too_large(shapes)
    if huge:
        return Verification(ran=False, passed=False, message=huge)
    types = {name: _elem_type(dtype) for name, (_, dtype) in shapes.items() if dtype is not None}
    produced = {o for n in fused.graph.node for o in n.output}
    # a block output the layout pass folded away is checked through what it feeds
    compared = [b.output for b in fused_blocks if b.output in produced]
    sizes: List[int] = [SPATIAL]
    short: List[str] = []   # fused convs whose input did not take every residue of its stride
    if inputs is not None:
        runs = [inputs]
    else:
        if has_dynamic_spatial(original):   # every residue a fused conv's output grid depends on
            sizes, short = covering_sizes(fused, _fused_convs(fused, fused_blocks))
        try:
            runs = [random_inputs(original, seed, size) for size in sizes]
        except ValueError as exc:
            return Verification(ran=False, passed=False, message=str(exc))
    result = compare(reference, (fused, arrays) if arrays else fused, compared, types, runs=runs, seed=seed,
                     rtol=rtol, atol=atol,
                     random=inputs is None)
    if short:
        result.message = "; ".join(filter(None, [result.message, (
            f"at {len(sizes)} input sizes, the input of {', '.join(short[:3])} did not take every residue "
            f"modulo its stride (each block alone was checked at all of them)")]))
    for b in fused_blocks:
        b.error = result.errors.get(b.output)
    return result


def _fused_convs(fused: onnx.ModelProto, fused_blocks: Sequence[BlockReport]) -> List[onnx.NodeProto]:
    """The Conv nodes that fused blocks became (they write the block's output, or feed its Transpose)."""
    outputs = {b.output for b in fused_blocks}
    producer = {o: n for n in fused.graph.node for o in n.output}
    convs = []
    for name in outputs:
        node = producer.get(name)
        if node is not None and node.op_type == "Transpose":
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Conv":
            convs.append(node)
    return sorted(convs, key=lambda n: n.name)


def fuse(model: ModelLike, *, verify: bool = True, rules: Iterable[str] = (), builtin_rules: bool = True,
         seed: int = 0, rtol: Optional[float] = None, atol: float = 0.0,
         inputs: Optional[Dict[str, np.ndarray]] = None, initializers_as_constants: bool = False,
         write: bool = True, check_blocks: bool = True, allow_larger: bool = False,
         disable_rules: Iterable[str] = (),
         progress: Optional[Callable[[str], None]] = None) -> onnx.ModelProto:
    """The fused model; see fuse_with_report for the options (the same, spelled out for type checkers)."""
    return fuse_with_report(model, verify=verify, rules=rules, builtin_rules=builtin_rules, seed=seed, rtol=rtol,
                            atol=atol, inputs=inputs, initializers_as_constants=initializers_as_constants,
                            write=write, check_blocks=check_blocks, allow_larger=allow_larger,
                            disable_rules=disable_rules, progress=progress).model


def _failure(v: Verification) -> str:
    if not v.ran:
        return f"verification could not run: {v.message}"
    name, err = max(v.errors.items(), key=lambda kv: kv[1])
    text = f"verification failed: '{name}' differs by {err:.3e} (max|Δ|/max|ref|, rtol {v.tolerance['rtol']:.0e})"
    return f"{text}; {v.message}" if v.message else text


def _elem_type(dtype: Any) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _note_unsupported(model: onnx.ModelProto, report: Report) -> None:
    seen = sorted({_UNSUPPORTED_OPS[n.op_type] for n in model.graph.node if n.op_type in _UNSUPPORTED_OPS})
    for what in seen:
        report.notes.append(f"{what} parts of the graph are left as they are (not supported)")
    if model.functions:
        report.notes.append("model-local functions are left as they are (not supported)")
