"""Where the time and the memory of one command run go.

Runs `reparam-onnx MODEL -o OUT [options]` in this process under cProfile, with a thread
sampling the RSS every few milliseconds; prints the functions that took the most time (own
time, and cumulative time of the stages) and, per stage (parse, checks on load, each pass's
decisions and rewrite, verification, save), its time and the RSS on entry, on exit and at its
peak (a sample every 2 ms: a shorter spike can be missed; ru_maxrss is printed too).

    python benchmarks/fuse_profile.py MODEL.onnx [--no-verify] [--top 25]
    python benchmarks/fuse_profile.py --build 336 [--no-verify]     # io_cost.py's RepVGG-style model
    python benchmarks/fuse_profile.py --build 2270 --external       # the same, weights in external data
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class Stages:
    """Wraps functions; prints each call's time and RSS (entry, exit, peak while inside)."""

    def __init__(self):
        self.open = []
        self.lines = []
        self.t0 = time.perf_counter()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            r = rss_mb()
            for frame in list(self.open):
                frame[0] = max(frame[0], r)
            time.sleep(0.002)

    def wrap(self, owner, name, label=None):
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapped(*args, **kwargs):
            frame = [rss_mb()]
            start, entry = time.perf_counter(), frame[0]
            self.open.append(frame)
            try:
                return real(*args, **kwargs)
            finally:
                self.open.remove(frame)
                self.lines.append(f"{start - self.t0:7.2f}s  {label or name:22} {time.perf_counter() - start:6.2f}s   "
                                  f"RSS in {entry:6.0f}  out {rss_mb():6.0f}  peak {frame[0]:6.0f} MB")
        setattr(owner, name, wrapped)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--build", type=float, metavar="MB", help="build io_cost.py's model of about MB megabytes")
    parser.add_argument("--external", action="store_true", help="with --build: weights in external data")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if bool(args.model) == bool(args.build):
        parser.error("give MODEL or --build MB")
    with tempfile.TemporaryDirectory() as tmp:
        if args.build:
            from io_cost import build_model
            args.model = str(Path(tmp) / "built.onnx")
            build_model(args.build, Path(args.model), external=args.external)
        stages = Stages()
        from reparam_onnx import analyse, api, cli, io, rewrite, validate
        stages.wrap(io, "_read_model", "parse")
        stages.wrap(validate, "check_model", "checks on load")
        stages.wrap(analyse.Analyser, "decisions", "pass: decisions")
        stages.wrap(rewrite, "apply", "pass: rewrite")
        stages.wrap(api, "_verify", "verify")
        stages.wrap(io, "save", "save")
        argv = [args.model, "-o", str(Path(tmp) / "out.onnx"), "-q"] + (["--no-verify"] if args.no_verify else [])
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        try:
            cli.main(argv)
        except SystemExit as exc:
            code = exc.code
        profile.disable()
        total = time.perf_counter() - start
    print("\n".join(stages.lines))
    print(f"total {total:.2f} s (under cProfile), exit {code}, ru_maxrss "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB\n")
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
