"""Shared fixtures: a project folder with one tiny finished run on the built-in sample."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

from pipeline.config import Paths
from pipeline.store.artifacts import RunDir, all_runs

REPO = Path(__file__).resolve().parent.parent
TINY = ("--folds", "2", "--epochs", "2", "--hidden", "32")
# Fresh folders use the sample, never the real competition data, even where Kaggle credentials exist.
SAMPLE = ("--source", "sample")


def run_cli(root: Path, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline --root ROOT ARGS...` in a subprocess, as a user would run it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "pipeline", "--root", str(root), *args],
                            cwd=REPO, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def pytest_configure(config: pytest.Config) -> None:
    """Tests are never inside a Kaggle notebook unless one is simulated: run in a real notebook,
    they must not take its attached data nor write to its /kaggle/working."""
    os.environ.pop("KAGGLE_KERNEL_RUN_TYPE", None)
    os.environ["KAGGLE_ROOT"] = str(Path(tempfile.gettempdir()) / "digits-tests-no-kaggle-here")


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `submit` on the sample: 2 folds, 2 epochs, a small hidden size."""
    root = tmp_path_factory.mktemp("run")
    run_cli(root, "submit", *SAMPLE, *TINY)
    return root


@pytest.fixture
def run_copy(sample_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run that a test may change."""
    root = tmp_path / "run"
    shutil.copytree(sample_run, root)
    return root


def the_run(root: Path, prefix: str = "") -> RunDir:
    """The one run folder of a project whose id starts with prefix (blends left out)."""
    found = [r for r in all_runs(Paths(root)) if r.id.startswith(prefix) and not r.id.startswith("blend")]
    assert len(found) == 1, [r.id for r in found]
    return found[0]


def files(root: Path) -> dict[str, int]:
    """Every file of a project with its modification time (the lock file left out)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".lock")}


# What a working copy holds besides the project's own files: none of it reaches a fresh clone.
LOCAL = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "reports",
         "bench-results", "input", "runs", "submissions"}


def fresh_clone(target: Path) -> Path:
    """A copy of the project as a fresh clone has it: no .venv, no data, no runs."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in LOCAL or n.endswith((".pyc", ".egg-info"))}

    shutil.copytree(REPO, target, ignore=ignore)
    return target


# Property-based searches: bounded for `make test`; HYPOTHESIS_PROFILE=deep searches longer.
settings.register_profile("default", max_examples=50, derandomize=True)
settings.register_profile("deep", max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
