"""The built-in rules ship inside the wheel and are found both from an installed wheel and
from the checkout (editable install)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = sorted(p.name for p in (ROOT / "rules").glob("*.toml"))

PROBE = """
import json, reparam_onnx
from reparam_onnx.rulebook import builtin_rules_dir, load_rules
print(json.dumps({"package": reparam_onnx.__file__, "rules_dir": str(builtin_rules_dir()),
                  "rules": sorted(r.name for r in load_rules()),
                  "files": sorted(p.name for p in builtin_rules_dir().glob("*.toml"))}))
"""


def _rule_names() -> list:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return sorted(tomllib.loads((ROOT / "rules" / f).read_text(encoding="utf-8"))["name"] for f in RULE_FILES)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PIP_NO_INPUT="1")
    env.update(extra)
    return env


def _probe(cwd: Path, pythonpath: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=str(cwd), env=_env(PYTHONPATH=str(pythonpath)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def test_repo_has_rules():
    assert RULE_FILES, "rules/ is empty"
    assert len(set(_rule_names())) == len(RULE_FILES)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    try:
        import hatchling  # noqa: F401  (the build backend, used without build isolation)
    except ImportError:
        pytest.skip("hatchling is not installed (pip install hatchling; .ci/run does)")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], cwd=str(out), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("reparam_onnx-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_rules(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for f in RULE_FILES:
        assert f"reparam_onnx/rules/{f}" in names, f"{f} missing from the wheel"
    assert sorted(n.split("/")[-1] for n in names if n.startswith("reparam_onnx/rules/")) == RULE_FILES
    assert "reparam_onnx/__init__.py" in names and "reparam_onnx/cli.py" in names
    assert "reparam_onnx/py.typed" in names and "reparam_onnx/__main__.py" in names
    assert not any(n.startswith(("tests/", "fixtures/", "benchmarks/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as z:
        assert "reparam-onnx = reparam_onnx.cli:main" in z.read(entry_points).decode()


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], cwd=str(target), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def test_installed_wheel_finds_its_rules(installed, tmp_path):
    info = _probe(cwd=tmp_path, pythonpath=installed)
    assert _inside(info["package"], installed), info["package"]
    assert _inside(info["rules_dir"], installed), info["rules_dir"]
    assert info["files"] == RULE_FILES
    assert info["rules"] == _rule_names()


def test_installed_wheel_cli_runs(installed, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "reparam_onnx.cli", "--version"], cwd=str(tmp_path),
                          env=_env(PYTHONPATH=str(installed)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "reparam-onnx" in proc.stdout


def test_checkout_rules_dir_in_process():
    import reparam_onnx
    from reparam_onnx.rulebook import builtin_rules_dir, load_rules
    if not _inside(reparam_onnx.__file__, ROOT):
        pytest.skip("reparam_onnx is imported from an installed copy, not from this checkout")
    assert builtin_rules_dir().resolve() == (ROOT / "rules").resolve()
    assert sorted(r.name for r in load_rules()) == _rule_names()


def test_checkout_rules_dir_subprocess(tmp_path):
    info = _probe(cwd=tmp_path, pythonpath=ROOT)
    assert _inside(info["package"], ROOT)
    assert Path(info["rules_dir"]).resolve() == (ROOT / "rules").resolve()
    assert info["rules"] == _rule_names()


def test_installed_wheel_python_dash_m_runs(installed, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "reparam_onnx", "--version"], cwd=str(tmp_path),
                          env=_env(PYTHONPATH=str(installed)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "reparam-onnx" in proc.stdout
