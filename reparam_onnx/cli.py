"""Command line: argument handling and printing only; the work is in api.py (one model)
and batch.py (many models, a worker process each).

Exit codes: 0 success, 1 --check found fusable blocks, 2 usage or input error,
3 verification failed or could not run, 4 internal error (a bug). Many models: the worst
(highest) of theirs.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from . import __version__, batch, io, risk
from .progress import Progress
from .api import fuse_with_report, to_save
from .errors import InputError, ReparamError, VerificationError

EXIT_OK, EXIT_CHECK, EXIT_INPUT, EXIT_VERIFY, EXIT_BUG = 0, 1, 2, 3, 4
STDOUT = "-"    # --report -: the JSON on stdout, the human lines on stderr


def fail(message: str, code: int) -> int:
    """The one error line on stderr; returns `code`."""
    click.echo(f"reparam-onnx: error: {' '.join(message.split())}", err=True)
    return code


def say(text: str, report_path: Optional[str]) -> None:
    """A human line: on stdout, or on stderr when the JSON report goes to stdout."""
    click.echo(text, err=report_path == STDOUT)


def write_json(path: Optional[str], data: Dict[str, Any]) -> Optional[str]:
    """Write the JSON report (atomically, or to stdout for '-'); why it could not be written, if so."""
    if not path:
        return None
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    if path == STDOUT:
        click.echo(text, nl=False)
        return None
    try:
        io.write_atomic(Path(path), lambda f: f.write(text.encode("utf-8")))
    except (InputError, OSError) as exc:
        return f"the report was not written: {exc}"
    return None


def _report_data(report, error: Optional[str], code: int, model: str, output: Optional[str],
                 kept: List[Tuple[Path, str]]) -> Dict[str, Any]:
    data = report.to_dict() if report is not None else {}
    data.update({"exit_code": code, "error": error, "version": __version__, "model": model, "output": output,
                 "kept": [{"file": str(path), "why": why} for path, why in kept]})
    return data


def files_of_run(model, output, in_place, check, inputs_path, rule_dirs) -> Tuple[io.Files, io.Files]:
    """(every file the run reads, every file it may write), as the options say."""
    reads = io.read_files(model, rule_files(inputs_path, rule_dirs))
    target = model if in_place else None if check else output
    writes = io.written_files(target, _protected(reads, in_place)) if target else []
    return reads, writes


def rule_files(inputs_path: Optional[str], rule_dirs: Sequence[str]) -> io.Files:
    """The files a run reads besides the model and its data: --inputs and the rule files."""
    extra = [("the --inputs file", Path(inputs_path))] if inputs_path else []
    for folder in rule_dirs:
        extra += [("a rule file", p) for p in sorted(Path(folder).glob("*.toml"))]
    return extra


def _protected(reads: io.Files, in_place: bool) -> list:
    """What the output's data file may not be: every file the run reads (in place, the
    input model is the output)."""
    return [path for what, path in reads if not (in_place and what == io.INPUT_MODEL)]


def check_report_path(path: str, files: io.Files) -> None:
    """The report can be written and is none of the run's files (a JSON file in place of a
    model or its data would break it); '-' is stdout."""
    if path == STDOUT:
        return
    target = Path(path)
    if target.is_dir():
        raise InputError(f"the report path '{path}' is a directory")
    if str(target.parent) and not target.parent.is_dir():
        raise InputError(f"the report's folder '{target.parent}' does not exist")
    io.refuse_clash("the report", path, files)


def _load_inputs(path: Optional[str]):
    if not path:
        return None
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:   # EOFError: an empty file
        raise InputError(f"cannot read inputs '{path}': {str(exc).splitlines()[0] if str(exc) else exc}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", metavar="MODEL...", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", type=click.Path(path_type=str), help="Where to write the fused model (one MODEL).")
@click.option("--out-dir", type=click.Path(path_type=str),
              help="Many models (or a folder): write each fused model here, under its own file name.")
@click.option("--in-place", is_flag=True, help="Replace MODEL (and its external data) with the fused model.")
@click.option("--check", is_flag=True, help="Analyse only; exit 1 if fusable blocks remain, 0 if none.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime comparison of input and output.")
@click.option("--no-block-checks", is_flag=True,
              help="Skip running each fused block alone against its conv before rewriting it.")
@click.option("--allow-larger", is_flag=True,
              help="Merge a block even when the merged Conv has more weights than its branches.")
@click.option("--report", "report_path", type=click.Path(path_type=str),
              help="Write a JSON report here ('-': to stdout, the other lines to stderr).")
@click.option("--summary", is_flag=True,
              help="Print the whole-model numeric risk figures (float16 range, int8 channel spread).")
@click.option("--rules", "rule_dirs", multiple=True, type=click.Path(path_type=str),
              help="A folder of extra rule files (*.toml); repeatable.")
@click.option("--disable-rule", "disabled_rules", multiple=True, metavar="NAME",
              help="Do not use this rule (e.g. 'generic': only named families fuse); repeatable.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random verification inputs.")
@click.option("--rtol", type=click.FloatRange(min=0.0), default=None, help="Relative tolerance (default 1e-5 float32, 1e-3 float16).")
@click.option("--atol", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="Absolute tolerance added to rtol·max|ref|.")
@click.option("--inputs", "inputs_path", type=click.Path(path_type=str), help="Verification inputs (.npz by input name).")
@click.option("--initializers-as-constants", is_flag=True,
              help="Treat initializers listed as graph inputs as constants (old exports, IR < 4).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Many models: how many run at once  [default: the number of cores]")
@click.option("--progress/--no-progress", default=None,
              help="A one-line progress indicator on stderr  [default: on a terminal, for runs over a second]")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
@click.option("-v", "--verbose", is_flag=True, help="List every block.")
@click.version_option(__version__, prog_name="reparam-onnx")
def command(**options):
    """Fuse re-parameterizable blocks of MODEL (ONNX) into single Convs and write them to OUTPUT.

    MODEL may be given several times, or be a folder (its *.onnx files): each model is
    fused in a process of its own and written to --out-dir under its own name (or checked
    with --check, or replaced with --in-place).
    """
    sys.exit(run(**options))


def run(*, models, output, out_dir, jobs, quiet, verbose, summary, report_path, **options) -> int:
    """One model (a file, no --out-dir) in this process; otherwise a batch."""
    if len(models) == 1 and out_dir is None and not Path(models[0]).is_dir():
        return run_one(model=models[0], output=output, quiet=quiet, verbose=verbose, summary=summary,
                       report_path=report_path, **options)
    options["progress"] = False   # a batch prints a line per model; its workers' stderr is a file
    return batch.run(models, output=output, out_dir=out_dir, jobs=jobs, quiet=quiet, verbose=verbose,
                     summary=summary, report_path=report_path, options=options)


def run_one(*, model, output, in_place, check, no_verify, no_block_checks, allow_larger, report_path, rule_dirs,
            disabled_rules, seed, rtol, atol, inputs_path, initializers_as_constants, quiet, verbose, summary,
            progress=None) -> int:
    """One model, in this process."""
    report, error, code, kept = None, None, EXIT_OK, []
    asked, report_path = report_path, None   # no report until its path is known to be safe
    # automatic on a terminal unless -q; erased before anything else is printed
    bar = Progress(False if progress is None and quiet else progress)
    try:
        bar.stage("read")
        reads, writes = files_of_run(model, output, in_place, check, inputs_path, rule_dirs)
        if asked:
            check_report_path(asked, reads + writes)
            report_path = asked
        if in_place:
            if output and not io.same_file(model, output):
                raise InputError("--in-place writes to the input; do not give another -o/--output")
            if check:
                raise InputError("--check writes nothing; it does not go with --in-place")
            output = model
        if not check and not output:
            raise InputError("missing -o/--output (or use --check, or --in-place)")
        if output and io.same_file(model, output) and not in_place:
            raise InputError("the output path is the input path; choose another output or give --in-place")
        if output and not check and not in_place:
            io.refuse_clash("the output", output, [f for f in reads if f[0] != io.INPUT_MODEL])
        if rtol is not None and not math.isfinite(rtol) or not math.isfinite(atol):
            raise InputError("--rtol and --atol must be finite numbers")
        if output and Path(output).is_dir():
            raise InputError(f"output path '{output}' is a directory")
        if output and not Path(output).parent.is_dir() and str(Path(output).parent):
            raise InputError(f"output folder '{Path(output).parent}' does not exist")
        with to_save():   # the model is only saved: large fused weights stay apart (result.arrays)
            result = fuse_with_report(model, verify=not no_verify, rules=rule_dirs, seed=seed, rtol=rtol, atol=atol,
                                      inputs=_load_inputs(inputs_path),
                                      initializers_as_constants=initializers_as_constants,
                                      check_blocks=not no_block_checks, allow_larger=allow_larger,
                                      disable_rules=disabled_rules, progress=bar.stage)
        report = result.report
        if check:
            remaining = [b for b in report.blocks if b.fusable]
            code = EXIT_CHECK if remaining else EXIT_OK
        # in place with nothing fused, the model and its data files stay as they are, not even rewritten
        untouched = in_place and not report.written
        if not check and not untouched:
            bar.stage("save", unit=" MB", scale=1 << 20)
            kept = io.save(result.model, output, external=result.external_data,
                           protect=_protected(reads, in_place),
                           replaces=result.data_files if in_place else (), progress=_counter(bar),
                           arrays=result.arrays)
        bar.close()
        if not quiet:
            say(report.to_text(verbose=verbose, dry_run=check), asked)
            if summary:
                say("\n".join(risk.summary_lines(report.to_dict()["summary"]["risk"])), asked)
            if check:
                say(f"check: {len([b for b in report.blocks if b.fusable])} fusable block(s) remain in {model}", asked)
            elif untouched:
                say(f"nothing fused: left {output} as it was", asked)
            else:
                say(f"wrote {output}", asked)
                for path, why in kept:
                    say(f"kept {path}: {why}", asked)
    except VerificationError as exc:
        bar.close()
        report, error, code = exc.report, str(exc), EXIT_VERIFY
        if not quiet and report is not None:
            say(report.to_text(verbose=verbose), asked)
    except ReparamError as exc:
        error, code = str(exc), exc.exit_code
    except MemoryError:
        error, code = "out of memory", EXIT_INPUT
    except Exception as exc:  # a bug: still one line, never a traceback
        error, code = f"internal error ({type(exc).__name__}: {exc}); please report it", EXIT_BUG
    finally:
        bar.close()
    written = output if code in (EXIT_OK, EXIT_CHECK) and not check else None
    problem = write_json(report_path, _report_data(report, error, code, model, written, kept))
    if error:
        fail(error, code)
    if problem:   # a pipeline reading the report must not take exit 0 or 1 for success
        code = max(code, EXIT_INPUT)
        fail(problem, code)
    return code


def _counter(bar: Progress):
    """io.save's progress(done, total) as the bar's count."""
    def progress(done: int, total: int) -> None:
        bar.total, bar.done = total, done
    return progress


def main(argv=None) -> None:
    try:
        command.main(args=argv, prog_name="reparam-onnx", standalone_mode=False)
    except click.exceptions.UsageError as exc:
        sys.exit(fail(f"{exc.format_message()} (see --help)", EXIT_INPUT))
    except click.exceptions.Abort:
        sys.exit(fail("aborted", 130))
    except SystemExit:
        raise
    except Exception as exc:  # pragma: no cover - click internals
        sys.exit(fail(f"internal error ({type(exc).__name__}: {exc})", EXIT_BUG))
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
