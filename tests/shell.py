"""Run command lines as a user types them: `reparam-onnx` and `python` on PATH are this
interpreter importing this checkout (README examples, the pre-commit hook's entry)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def user_env(bin_dir: Path) -> dict:
    """An environment whose PATH starts with `bin_dir`, holding `python` and `reparam-onnx`
    (this interpreter, `-m reparam_onnx`) and whose PYTHONPATH starts with this checkout."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, args in (("python", ""), ("reparam-onnx", " -m reparam_onnx")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}"{args} "$@"\n')
        script.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def sh(line: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """One command line through bash (pipes fail when any part fails)."""
    return subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)
