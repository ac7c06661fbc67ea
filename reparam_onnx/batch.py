"""Many models in one call: `reparam-onnx a.onnx b.onnx models/ --out-dir DIR` (or --check,
or --in-place).

Each model runs the one-model command (cli.run_one) in a process of its own (a fresh
interpreter, not a fork), up to --jobs at a time (default: the cores this process may
use). A model that fails is that model's failure and the others go on; a worker that dies
(a crash in native code, a kill) is exit 4 for its model, and the temporary files it left
are removed, so a failed model leaves nothing half-written. Interrupted (Ctrl-C), the batch
starts no further model and interrupts the running ones (exit 130, as one model).

Refused before any work (exit 2): -o (several outputs need --out-dir), an --out-dir whose
parent folder is missing (--out-dir itself is created, and removed again when every model
failed), a folder without *.onnx files, a model given twice, two models that would be
written to one file, an output that is a file some model of the batch reads, a --report
that is any file of the batch.

Printed in input order: one line per model (a failed model's is its error line on
stderr), then a tally. The exit code is the worst (highest) of the models'. The JSON
report lists every model's report under "models".
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from . import __version__, cli, io, risk
from .errors import InputError
from .verify import THREADS_ENV

OUTCOMES = {0: "ok", 1: "with fusable blocks", 2: "bad input", 3: "not verified", 4: "internal error"}


@dataclass
class Job:
    model: Path
    output: Optional[Path]        # None with --check; the model itself with --in-place


@dataclass
class Outcome:
    job: Job
    code: int
    error: Optional[str]
    report: Dict[str, Any]        # the model's JSON report; {} when its worker left none
    text: str = ""                # what its run printed (with -v)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------- planning: everything refused before any work

def expand(models: Sequence[str]) -> List[Path]:
    """Each MODEL; a folder stands for its *.onnx files (not hidden ones, not in subfolders), by name."""
    paths: List[Path] = []
    for model in models:
        path = Path(model)
        paths.extend(_models_in(path) if path.is_dir() else [path])
    return paths


def _models_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.name.lower().endswith(".onnx") and not p.name.startswith(".") and p.is_file())


def plan(paths: Sequence[Path], out_dir: Optional[str], options: Dict[str, Any]) -> List[Job]:
    """Where each model goes: nowhere (--check), over itself (--in-place), or DIR/<its name>."""
    if options["check"]:
        return [Job(p, None) for p in paths]
    if options["in_place"]:
        return [Job(p, p) for p in paths]
    return [Job(p, Path(out_dir) / p.name if out_dir else None) for p in paths]


def refuse(models: Sequence[str], work: Sequence[Job], output: Optional[str], out_dir: Optional[str],
           options: Dict[str, Any], reads: io.Files) -> None:
    """InputError for a batch that must not start (see the module docstring)."""
    for model in models:
        if Path(model).is_dir() and not _models_in(Path(model)):
            raise InputError(f"'{model}' is a directory with no *.onnx models in it")
    if output:
        raise InputError("several models (or a folder) are written to --out-dir DIR, not -o/--output")
    if options["in_place"] and options["check"]:
        raise InputError("--check writes nothing; it does not go with --in-place")
    if options["in_place"] and out_dir:
        raise InputError("--in-place writes every model over itself; it does not go with --out-dir")
    _refuse_repeats([job.model for job in work])
    if options["check"] or options["in_place"]:
        return
    folder = Path(out_dir) if out_dir else None
    if folder is None:
        raise InputError("several models (or a folder): missing --out-dir DIR (or use --check, or --in-place)")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out-dir '{out_dir}' is not a directory")
    if not folder.exists() and not folder.absolute().parent.is_dir():
        raise InputError(f"the folder of --out-dir '{out_dir}' does not exist (only --out-dir itself is created)")
    _refuse_shared_outputs(work)
    for job in work:
        assert job.output is not None
        if io.same_file(job.model, job.output):
            raise InputError(f"the output of '{job.model}' would replace it: --out-dir '{out_dir}' is its folder; "
                             f"choose another --out-dir, or use --in-place")
        io.refuse_clash(f"the output of '{job.model}'", job.output, reads)


def _refuse_repeats(paths: Sequence[Path]) -> None:
    """No model twice (however spelled: './a.onnx', a folder and a file in it, a hard link)."""
    seen: Dict[Tuple[Any, ...], Path] = {}
    for path in paths:
        key = _identity(path)
        if key in seen:
            raise InputError(f"'{path}' is given twice (also as '{seen[key]}')")
        seen[key] = path


def _identity(path: Path) -> Tuple[Any, ...]:
    try:
        info = path.stat()
        return ("inode", info.st_dev, info.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def _refuse_shared_outputs(jobs: Sequence[Job]) -> None:
    """No two models written to one file (names compared case-blind: some file systems are)."""
    seen: Dict[str, Job] = {}
    for job in jobs:
        assert job.output is not None
        key = job.output.name.casefold()
        if key in seen:
            raise InputError(f"'{seen[key].model}' and '{job.model}' would both be written to '{job.output}'; "
                             f"rename one, or run them separately")
        seen[key] = job


# ---------------------------------------------------------------- running

def run(models: Sequence[str], *, output: Optional[str], out_dir: Optional[str], jobs: Optional[int], quiet: bool,
        verbose: bool, summary: bool, report_path: Optional[str], options: Dict[str, Any]) -> int:
    """The batch; the worst exit code of its models (2 when it is refused before any work)."""
    asked, report_path = report_path, None   # no report until its path is known to be safe
    created = None
    try:
        work = plan(expand(models), out_dir, options)
        reads, writes = _files_of_batch(work, options)
        if out_dir and not (output or options["check"] or options["in_place"]):
            created = _make_folder(out_dir)   # first: the report may go there too
        if asked:
            cli.check_report_path(asked, reads + writes)
            report_path = asked
        refuse(models, work, output, out_dir, options, reads)
    except InputError as exc:
        problem = cli.write_json(report_path, _batch_data([], str(exc), cli.EXIT_INPUT))
        _remove_if_empty(created)
        cli.fail(str(exc), cli.EXIT_INPUT)
        if problem:
            cli.fail(problem, cli.EXIT_INPUT)
        return cli.EXIT_INPUT
    outcomes = []
    for outcome in run_jobs(work, options, verbose, min(jobs or available_cores(), len(work))):
        _print(outcome, options["check"], quiet, verbose, summary, asked)
        outcomes.append(outcome)
    _remove_if_empty(created)   # every model failed: leave no trace
    code = max(o.code for o in outcomes)
    if not quiet:
        counts = {c: sum(o.code == c for o in outcomes) for c in sorted(OUTCOMES)}
        cli.say(f"{len(outcomes)} model(s): " + ", ".join(f"{n} {OUTCOMES[c]}" for c, n in counts.items() if n)
                + f"; exit code {code}", asked)
    problem = cli.write_json(report_path, _batch_data(outcomes, None, code))
    if problem:
        code = max(code, cli.EXIT_INPUT)
        cli.fail(problem, code)
    return code


def _make_folder(out_dir: str) -> Optional[Path]:
    """Create --out-dir when it is missing and its parent is a folder (else refuse() says what
    is wrong); the folder when created here."""
    folder = Path(out_dir)
    if folder.exists() or not folder.absolute().parent.is_dir():
        return None
    try:
        folder.mkdir()
    except FileExistsError:
        return None
    except OSError as exc:
        raise InputError(f"cannot create --out-dir '{out_dir}': {exc.strerror or exc}") from None
    return folder


def _remove_if_empty(folder: Optional[Path]) -> None:
    if folder is not None and not any(folder.iterdir()):
        folder.rmdir()


def _files_of_batch(work: Sequence[Job], options: Dict[str, Any]) -> Tuple[io.Files, io.Files]:
    """(every file some model of the batch reads, every file the batch may write)."""
    reads: io.Files = []
    writes: io.Files = []
    for job in work:
        r, w = cli.files_of_run(str(job.model), job.output, options["in_place"], options["check"],
                                options["inputs_path"], options["rule_dirs"])
        reads += r
        writes += w
    return reads, writes


def run_jobs(work: Sequence[Job], options: Dict[str, Any], verbose: bool, workers: int):
    """Each job's Outcome, in the order of `work`, as soon as it and those before it are done.
    Interrupted (Ctrl-C), no further job starts and the running ones are interrupted too."""
    workers_ = Workers()
    with tempfile.TemporaryDirectory(prefix="reparam-onnx-") as scratch, ThreadPoolExecutor(workers) as pool:
        threads = max(1, available_cores() // workers)   # onnxruntime threads per worker: no oversubscription
        futures = [pool.submit(run_job, job, options, verbose, Path(scratch) / str(i), workers_, threads)
                   for i, job in enumerate(work)]
        try:
            for future in futures:
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            workers_.interrupt()
            raise


@dataclass
class Workers:
    """The worker processes running now; once interrupted, each one (also one starting late) gets SIGINT."""
    running: Set[subprocess.Popen] = field(default_factory=set)
    stopped: threading.Event = field(default_factory=threading.Event)

    def add(self, process: subprocess.Popen) -> None:
        self.running.add(process)
        if self.stopped.is_set():
            process.send_signal(signal.SIGINT)

    def interrupt(self) -> None:
        self.stopped.set()
        for process in list(self.running):
            process.send_signal(signal.SIGINT)


def work(options: Dict[str, Any]) -> None:
    """In a worker process: cli.run_one on one model."""
    sys.exit(cli.run_one(**options))


WORKER: Callable[[Dict[str, Any]], None] = work   # what a worker process runs (tests replace it)

# A worker: a fresh interpreter with this process's sys.path (so it runs this very copy of
# reparam_onnx, as multiprocessing's spawn would) whose stdout and stderr are files from the
# start: nothing it prints, a traceback of an interrupted import included, reaches the terminal.
BOOT = ("import json, sys; job = json.load(open(sys.argv[1], encoding='utf-8')); sys.path[:] = job['sys_path']; "
        "from reparam_onnx.batch import child; child(job)")


def child(job: Dict[str, Any]) -> None:
    """The worker process's entry: run the worker function the job names."""
    module, name = job["worker"].split(":")
    getattr(importlib.import_module(module), name)(job["options"])


def run_job(job: Job, options: Dict[str, Any], verbose: bool, scratch: Path, workers: Workers,
            threads: Optional[int] = None) -> Outcome:
    """One model in a worker process: its exit code, error and JSON report; a dead worker is exit 4."""
    scratch.mkdir()
    report, stdout, stderr, spec = (scratch / name for name in ("report.json", "stdout", "stderr", "job.json"))
    one = dict(options, model=str(job.model), output=None if options["check"] or options["in_place"] else str(job.output),
               report_path=str(report), quiet=not verbose, verbose=verbose, summary=False)
    spec.write_text(json.dumps({"sys_path": sys.path, "worker": f"{WORKER.__module__}:{WORKER.__qualname__}",
                                "options": one}), encoding="utf-8")
    before = _temporaries(job)
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        env = dict(os.environ, **({THREADS_ENV: str(threads)} if threads else {}))
        process = subprocess.Popen([sys.executable, "-c", BOOT, str(spec)], stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=err, env=env)
        workers.add(process)
        try:
            code = process.wait()
        finally:
            workers.running.discard(process)
    data, text = _read_json(report), _read(stdout)
    if data is not None and code in OUTCOMES:
        return Outcome(job, code, data.get("error"), data, text)
    for path in _temporaries(job) - before:   # a write the worker did not finish
        path.unlink(missing_ok=True)
    said = [line for line in _read(stderr).splitlines() if line.startswith("reparam-onnx: error: ")]
    if said and code in OUTCOMES and code >= cli.EXIT_INPUT:
        return Outcome(job, code, said[-1].split(": error: ", 1)[1], {}, text)
    return Outcome(job, cli.EXIT_BUG, _death(code, _read(stderr)), {}, text)


def _temporaries(job: Job) -> Set[Path]:
    """The temporary files io.write_atomic makes for the job's output and its data file."""
    if job.output is None:
        return set()
    folder, prefix = job.output.parent, f".{job.output.name}."
    try:
        return {p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")}
    except OSError:
        return set()


def _death(code: Optional[int], stderr: str) -> str:
    """Why a worker left no report, as one line."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how = f"was killed by {name}"
    else:
        how = f"exited with code {code} without a report"
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    return f"internal error: the worker process {how}" + (f" ({last})" if last else "") + "; please report it"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- what is printed and reported

def _print(o: Outcome, check: bool, quiet: bool, verbose: bool, summary: bool, report_path: Optional[str]) -> None:
    if o.code in (cli.EXIT_OK, cli.EXIT_CHECK):
        if not quiet:
            cli.say(line(o, check), report_path)
    else:
        cli.fail(f"{o.job.model}: {o.error}", o.code)
    if quiet:
        return
    details = o.text.rstrip("\n").splitlines() if verbose else []
    details += [f"kept {k['file']}: {k['why']}" for k in o.report.get("kept", [])] if not verbose else []
    if summary and "summary" in o.report:
        details += risk.summary_lines(o.report["summary"]["risk"])
    if details:
        cli.say("\n".join("  " + d for d in details), report_path)


def line(o: Outcome, check: bool) -> str:
    """One model's line: what was fused (or remains), nodes, verification, risk, where it went."""
    r = o.report
    s = r.get("summary", {})
    remaining = sum(1 for b in r.get("blocks", []) if b.get("rule") is not None and b.get("reason") is None)
    rules = ", ".join(f"{n} {rule}" for rule, n in s.get("per_rule", {}).items())
    rules = f" ({rules})" if rules else ""
    if check:
        parts = [f"{remaining} fusable block(s) remain{rules}" if remaining else "no fusable blocks"]
    else:
        parts = [f"fused {s.get('fused', 0)} block(s){rules}"]
    if not check and s.get("not_fused"):
        parts.append(f"{s['not_fused']} left as they were (-v says why)")
    before, after = sum(r.get("ops_before", {}).values()), sum(r.get("ops_after", {}).values())
    parts.append(f"nodes {before}→{after}" if before != after else f"nodes {before}")
    parts.append(_verification(r.get("verification") or {}))
    flags = risk.flags(s.get("risk", {}))
    if flags:
        parts.append(f"risk: {flags} (--summary)")
    if check:
        where = ""
    elif o.job.output == o.job.model:
        where = " (in place)" if r.get("written") else " (left as it was)"
    else:
        where = f" → {o.job.output}"
    return f"{o.job.model}: {', '.join(p for p in parts if p)}{where}"


def _verification(v: Dict[str, Any]) -> str:
    if v.get("ran"):
        worst = max(v.get("errors", {}).values(), default=None)
        return "verified" + (f" (worst max|Δ|/max|ref| {worst:.1e})" if worst is not None else "")
    message = v.get("message", "")
    return "" if message in ("", "nothing was fused") else f"not verified ({message})"


def _batch_data(outcomes: Sequence[Outcome], error: Optional[str], code: int) -> Dict[str, Any]:
    models = []
    for o in outcomes:
        entry = {k: v for k, v in o.report.items() if k != "version"}
        entry.update({"model": str(o.job.model), "output": entry.get("output", None), "exit_code": o.code,
                      "error": o.error})
        models.append(entry)
    return {"version": __version__, "exit_code": code, "error": error, "models": models}
