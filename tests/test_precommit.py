"""The pre-commit hook (.pre-commit-hooks.yaml): a valid manifest, its entry fails on a
committed model that still has fusable blocks and passes on a fused one, and pre-commit
itself runs it with the README's configuration."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURES, ROOT
from shell import sh, user_env

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra (pip install '.[test]')")

MANIFEST = ROOT / ".pre-commit-hooks.yaml"
TRAIN = FIXTURES / "torch" / "repvgg.ts_cf.onnx"       # 3 RepVGG blocks
DEPLOY = FIXTURES / "torch" / "repvgg.deploy.onnx"     # the same, fused by its framework


def hook() -> dict:
    (only,) = yaml.safe_load(MANIFEST.read_text())
    return only


def test_manifest_declares_the_check_hook():
    h = hook()
    assert h["id"] == "reparam-onnx-check"
    assert shlex.split(h["entry"])[:2] == ["reparam-onnx", "--check"]
    assert h["language"] == "python" and h["require_serial"] is True
    files = re.compile(h["files"])
    for name in ("m.onnx", "models/a.ONNX", "deep/x.y.onnx"):
        assert files.search(name), name
    for name in ("m.onnx.data", "m.onnx.io.npz", "notes.txt", "onnx"):
        assert not files.search(name), name


def test_manifest_is_valid_for_pre_commit():
    pytest.importorskip("pre_commit", reason="pre-commit is in the test extra")
    proc = subprocess.run([sys.executable, "-m", "pre_commit", "validate-manifest", str(MANIFEST)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def repo(tmp_path):
    """A repository's worth of files: a training-form and a deploy model, as pre-commit passes them."""
    folder = tmp_path / "repo"
    (folder / "models").mkdir(parents=True)
    shutil.copy(TRAIN, folder / "models" / "train.onnx")
    shutil.copy(DEPLOY, folder / "models" / "deploy.onnx")
    return folder


@pytest.fixture
def env(tmp_path):
    return user_env(tmp_path / "bin")


@pytest.mark.parametrize("files, code", [(["models/deploy.onnx"], 0), (["models/train.onnx"], 1),
                                         (["models/deploy.onnx", "models/train.onnx"], 1)],
                         ids=["fused", "training-form", "both"])
def test_hook_entry_on_fixtures(files, code, repo, env):
    """The entry as pre-commit runs it: `ENTRY FILE...` from the repository's root."""
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    proc = sh(f"{hook()['entry']} {' '.join(files)}", repo, env)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr == ""
    if code:   # the model is named, alone or with others
        assert re.search(r"3 fusable block\(s\) remain in models/train.onnx|models/train.onnx: 3 fusable block", proc.stdout)
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before       # --check writes nothing


def test_hook_entry_on_a_broken_model_fails_with_one_line(repo, env):
    (repo / "models" / "broken.onnx").write_bytes(b"not a model")
    proc = sh(f"{hook()['entry']} models/broken.onnx models/deploy.onnx", repo, env)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("reparam-onnx: error: models/broken.onnx: ")


def readme_local_config() -> str:
    """The README's local-hook configuration (the yaml block that says `repo: local`)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    (local,) = [b for b in blocks if "repo: local" in b]
    return local


def test_readme_local_hook_is_the_manifests_hook():
    (local,) = yaml.safe_load(readme_local_config())["repos"]
    (h,) = local["hooks"]
    manifest = hook()
    for key in ("id", "entry", "files", "require_serial"):
        assert h[key] == manifest[key], key


def test_pre_commit_runs_the_readme_config(repo, env, tmp_path):
    """pre-commit itself, in a git repository, with the README's local hook: fails while a
    training-form model is committed, passes once it is fused."""
    pytest.importorskip("pre_commit", reason="pre-commit is in the test extra")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    env = dict(env, PRE_COMMIT_HOME=str(tmp_path / "pre-commit-home"), GIT_CONFIG_GLOBAL=str(tmp_path / "gitconfig"),
               GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    (repo / ".pre-commit-config.yaml").write_text(readme_local_config())
    for line in ("git init -q .", "git add -A"):
        assert sh(line, repo, env).returncode == 0
    run = f'"{sys.executable}" -m pre_commit run --all-files'
    proc = sh(run, repo, env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "models/train.onnx: 3 fusable block(s) remain (3 repvgg)" in proc.stdout
    assert "Failed" in proc.stdout
    assert sh("reparam-onnx models/train.onnx --in-place -q && git add -A", repo, env).returncode == 0
    proc = sh(run, repo, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Passed" in proc.stdout
