"""The public API is typed: the package ships py.typed, `mypy --strict` passes on the modules of
the public API (fuse, fuse_with_report, the result and report types), and a strictly typed
caller gets real types from it (a misuse is an error, not Any)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

pytest.importorskip("mypy", reason="mypy is in the test extra (pip install '.[test]')")

PUBLIC = ["reparam_onnx/__init__.py", "reparam_onnx/api.py", "reparam_onnx/report.py", "reparam_onnx/risk.py",
          "reparam_onnx/errors.py"]

CALLER = """
from __future__ import annotations

from typing import Any, Dict, List, Optional

import onnx

from reparam_onnx import (BlockReport, FuseResult, ReparamError, Report, Verification, VerificationError, fuse,
                          fuse_with_report)
from reparam_onnx.risk import NumericRisk


def deploy(path: str) -> onnx.ModelProto:
    return fuse(path, rtol=1e-6, rules=["my_rules"], verify=True)


def spreads(model: onnx.ModelProto) -> List[float]:
    result: FuseResult = fuse_with_report(model, verify=False, write=False)
    report: Report = result.report
    found: List[float] = []
    for block in report.blocks:
        b: BlockReport = block
        if b.risk is not None:
            risk: NumericRisk = b.risk
            found.append(risk.channel_spread)
    verification: Optional[Verification] = report.verification
    data: Dict[str, Any] = report.to_dict()
    return found if verification is None or data else []


def blocks_of_failure(exc: ReparamError) -> int:
    if isinstance(exc, VerificationError) and exc.report is not None:
        return len(exc.report.blocks)
    return exc.exit_code
"""

MISUSES = {
    "unknown option": "fuse('m.onnx', rtoll=1e-6)",
    "wrong option type": "fuse('m.onnx', seed='0')",
    "wrong result type": "x: int = fuse_with_report('m.onnx').report",
    "optional used as is": "y: float = fuse_with_report('m.onnx').report.blocks[0].risk.channel_spread",
}


def mypy(tmp_path, *files) -> subprocess.CompletedProcess:
    """mypy --strict over `files` from the checkout (MYPYPATH: this checkout, not an installed copy);
    modules outside the list are followed silently."""
    env = dict(os.environ, MYPYPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                           "--cache-dir", str(tmp_path.parent / "mypy-cache"), "--no-error-summary", *map(str, files)],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)


def test_py_typed_marker():
    assert (ROOT / "reparam_onnx" / "py.typed").is_file()


def test_public_api_passes_mypy_strict(tmp_path):
    caller = tmp_path / "caller.py"
    caller.write_text(CALLER)
    proc = mypy(tmp_path, *PUBLIC, caller)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_misuse_is_a_type_error(tmp_path):
    files = []
    for i, line in enumerate(MISUSES.values()):
        path = tmp_path / f"misuse_{i}.py"
        path.write_text(textwrap.dedent(f"""
            from reparam_onnx import fuse, fuse_with_report
            {line}
        """))
        files.append(path)
    proc = mypy(tmp_path, *files)
    assert proc.returncode == 1
    for (what, _), path in zip(MISUSES.items(), files):
        assert f"{path.name}:3: error" in proc.stdout, f"{what}: {proc.stdout}"


def test_fuse_takes_the_keywords_of_fuse_with_report():
    """fuse() spells its keywords out for type checkers; they stay those of fuse_with_report."""
    import inspect
    from reparam_onnx import fuse, fuse_with_report
    ours, theirs = inspect.signature(fuse), inspect.signature(fuse_with_report)
    assert list(ours.parameters.values()) == list(theirs.parameters.values())
    assert ours.return_annotation != theirs.return_annotation
