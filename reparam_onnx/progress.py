"""A one-line progress indicator on stderr: the stage of the run (load, analyse and fuse,
verify, save), its count where it has one, and the time so far.

On a terminal it appears only once the run has taken DELAY seconds (a small model's run
prints nothing more than before), is redrawn in place a few times a second by a thread that
sleeps in between, and is erased before anything else is printed. It is never drawn on a
pipe or a file unless asked for (--progress); then each stage is one plain line.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import IO, Optional

DELAY = 1.0       # seconds before anything is drawn
INTERVAL = 0.25   # seconds between redraws
PREFIX = "reparam-onnx: "


class Progress:
    """stage(name, total, unit) starts a stage; advance(n) counts within it; close() erases the line.

    `enabled`: True (asked for), False (turned off), None (automatic: on when `stream` is a terminal).
    """

    def __init__(self, enabled: Optional[bool] = None, stream: Optional[IO[str]] = None):
        self.stream = stream if stream is not None else sys.stderr
        tty = _isatty(self.stream)
        self.enabled = tty if enabled is None else enabled
        self.redraw = self.enabled and tty          # in place on a terminal; plain lines elsewhere
        self.start = time.monotonic()
        self.name, self.done, self.total, self.unit, self.scale = "", 0, None, "", 1
        self.drawn = False
        self._stop = threading.Event()
        self._lock = threading.Lock()       # the stage's fields
        self._drawing = threading.Lock()    # one writer of the line at a time
        self._thread: Optional[threading.Thread] = None
        if self.redraw:
            self._thread = threading.Thread(target=self._run, name="reparam-onnx progress", daemon=True)
            self._thread.start()

    def stage(self, name: str, total: Optional[int] = None, unit: str = "", scale: int = 1) -> None:
        """A new stage; `total` items of `unit` (counted in steps of `scale`: bytes shown as MB, say)."""
        if not self.enabled:
            return
        with self._lock:
            self.name, self.done, self.total, self.unit, self.scale = name, 0, total, unit, scale
        if not self.redraw:
            self._write(f"{PREFIX}{name}\n")
        elif time.monotonic() - self.start >= DELAY and not self._stop.is_set():
            self._draw()   # a new stage shows at once, not at the next redraw

    def advance(self, amount: int = 1) -> None:
        self.done += amount   # read by the drawing thread; a torn read only shows an older count

    def close(self) -> None:
        """Stop drawing and erase the line (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._drawing:
            if self.drawn:
                self._write("\r\033[K")
                self.drawn = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self) -> str:
        with self._lock:
            name, done, total, unit, scale = self.name, self.done, self.total, self.unit, self.scale
        count = ""
        if total:
            count = f" {done // scale}/{total // scale}{unit}"
        return f"{PREFIX}{name}{count} · {time.monotonic() - self.start:.1f} s"

    def _run(self) -> None:
        if self._stop.wait(max(0.0, DELAY - (time.monotonic() - self.start))):
            return
        while True:
            self._draw()
            if self._stop.wait(INTERVAL):
                return

    def _draw(self) -> None:
        with self._drawing:
            if self.name and not self._stop.is_set():
                self._write(f"\r{self.line()}\033[K")
                self.drawn = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):   # a closed or broken stderr: progress is not worth an error
            pass


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
