"""Shared fixtures and helpers: a project folder with one tiny finished run on the built-in sample,
the one way to run a command line (`run_cli`, `start_cli`, `run_make`), and the helpers several test
files use (the_run, snapshot, files, free_port, fake_run, copy_project, fresh_clone)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

# One torch thread in the test process and in every command it starts (they inherit it), so an
# in-process run and a subprocess run of the same settings give the same bytes. Set before anything
# imports torch; a test that is about threads passes its own OMP_NUM_THREADS to a subprocess.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pipeline.config import Paths
from pipeline.engine.models import CELLS
from pipeline.stages import prepare
from pipeline.store.data import PIXELS
from pipeline.store.run import RunDir, all_runs

REPO = Path(__file__).resolve().parent.parent
TINY = ("--folds", "2", "--epochs", "2", "--hidden", "32")
# Where the size of the run does not matter: the smallest run that still has two folds.
SMALL = ("--folds", "2", "--epochs", "1", "--hidden", "8")
# Fresh folders use the sample, never the real competition data, even where Kaggle credentials exist.
SAMPLE = ("--source", "sample")


def _command(root: Path | None, args: tuple[str, ...]) -> list[str]:
    return [*(["--root", str(root)] if root is not None else []), *args]


def _environment(env: dict[str, str] | None, full_env: bool) -> dict[str, str]:
    """os.environ updated by env, or env alone (full_env); unbuffered unless env says otherwise."""
    return {"PYTHONUNBUFFERED": "1", **({} if full_env else os.environ), **(env or {})}


def run_cli(root: Path | None, *args: str, check: bool = True, env: dict[str, str] | None = None,
            process: bool = False, cwd: Path = REPO, timeout: float = 300,
            full_env: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline --root ROOT ARGS...` as a user would run it (root None: no --root), as a
    CompletedProcess: in this process, its output captured (an exception that escapes main is a
    traceback and exit status 1, as in a process), or, when the behaviour is about the process
    (process=True, or env given), in a real one with _environment(env, full_env)."""
    argv = _command(root, args)
    if process or env is not None:
        result = subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=cwd, capture_output=True,
                                text=True, env=_environment(env, full_env), timeout=timeout)
    else:
        from pipeline.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: --help, or an option it refuses
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
        result = subprocess.CompletedProcess(["pipeline", *argv], code, out.getvalue(), err.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def start_cli(root: Path | None, *args: str, env: dict[str, str] | None = None, output: bool = False,
              sigint: bool = False, full_env: bool = False) -> subprocess.Popen[str]:
    """`python -m pipeline --root ROOT ARGS...` in a process of its own, for the tests that kill or
    interrupt it; output=True pipes its stdout and stderr (text), else they are dropped. sigint=True
    lets it see Ctrl-C as a terminal user's program does (a test runner started in the background
    inherits SIGINT ignored)."""
    pipe = subprocess.PIPE if output else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "pipeline", *_command(root, args)], cwd=REPO,
                            stdout=pipe, stderr=pipe, text=True, env=_environment(env, full_env),
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
                            if sigint else None)


def run_make(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, check: bool = False,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`make --no-print-directory ARGS...` in cwd (the repository by default)."""
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=check)


# Dummy credentials of the tests that run the real kaggle client against the fake server.
DUMMY_USER = "fake-user"
DUMMY_KEY = "dummy-key-0123456789abcdef"
DUMMY_TOKEN = "KGAT_dummy0123456789abcdef"
DUMMY_BASIC = base64.b64encode(f"{DUMMY_USER}:{DUMMY_KEY}".encode()).decode()


def client_env(home: Path, url: str) -> dict[str, str]:
    """An environment for the real kaggle client: a HOME of its own holding dummy credentials
    (kaggle.json), every request sent to the fake server at url (KAGGLE_API_ENVIRONMENT=LOCALHOST
    through a proxy), and none of the user's KAGGLE_* variables, proxies or VERBOSE switches: nothing
    can reach the network beyond 127.0.0.1, and no real key can be sent anywhere."""
    config = home / ".kaggle"
    config.mkdir(parents=True)
    (config / "kaggle.json").write_text(json.dumps({"username": DUMMY_USER, "key": DUMMY_KEY}))
    (config / "kaggle.json").chmod(0o600)
    keep = {k: v for k, v in os.environ.items()
            if (not k.startswith("KAGGLE_") or k == "KAGGLE_ROOT")  # no /kaggle here (see below)
            and not k.lower().endswith("_proxy")
            and k not in ("VERBOSE", "VERBOSE_OUTPUT", "XDG_CONFIG_HOME")}
    return {**keep, "HOME": str(home), "KAGGLE_CONFIG_DIR": str(config),
            "KAGGLE_API_ENVIRONMENT": "LOCALHOST", "PYTHONPATH": str(REPO),
            "HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url}


def pytest_configure(config: pytest.Config) -> None:
    """Tests are never inside a Kaggle notebook unless one is simulated: run in a real notebook,
    they must not take its attached data nor write to its /kaggle/working."""
    os.environ.pop("KAGGLE_KERNEL_RUN_TYPE", None)
    os.environ["KAGGLE_ROOT"] = str(Path(tempfile.gettempdir()) / "digits-tests-no-kaggle-here")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The end-to-end tests first: test processes sharing the cores then end together, not one alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def copy_project(source: Path, target: Path, ignore: Any = None) -> Path:
    """A private copy of a project folder that a test may change."""
    shutil.copytree(source, target, ignore=ignore)
    return target


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `submit` on the sample: 2 folds, 2 epochs, a small hidden size."""
    root = tmp_path_factory.mktemp("run")
    run_cli(root, "submit", *SAMPLE, *TINY)
    return root


@pytest.fixture
def run_copy(sample_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run that a test may change."""
    return copy_project(sample_run, tmp_path / "run")


def the_run(root: Path, prefix: str = "") -> RunDir:
    """The one run folder of a project whose id starts with prefix (blends left out)."""
    found = [r for r in all_runs(Paths(root)) if r.id.startswith(prefix) and not r.id.startswith("blend")]
    assert len(found) == 1, [r.id for r in found]
    return found[0]


def files(root: Path) -> dict[str, int]:
    """Every file of a project with its modification time (the lock file left out)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".lock")}


def snapshot(folder: Path, *, skip: tuple[str, ...] = (), folders: bool = True,
             modes: bool = False) -> dict[str, Any]:
    """Every entry under folder, hidden ones included, by its relative path: a file's bytes and a
    folder's None (folders=False leaves folders out); modes=True pairs each with its mode. Entries
    named in skip are left out."""
    found: dict[str, Any] = {}
    for p in sorted(folder.rglob("*")):
        if p.name in skip or (not folders and not p.is_file()):
            continue
        data = p.read_bytes() if p.is_file() else None
        found[str(p.relative_to(folder))] = (p.stat().st_mode, data) if modes else data
    return found


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (just now), for a server a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_HELD: list[socket.socket] = []


def closed_port() -> int:
    """A port on 127.0.0.1 that refuses every connection for the rest of the session: bound here and
    never listening, so no other test process (the suite runs several) can take it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return sock.getsockname()[1]


def fake_run(root: Path, name: str, acc: float = 0.9, **record: Any) -> Path:
    """A complete run folder as predict leaves it, with made-up numbers."""
    folder = root / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    made = {"complete": True, "kind": "run", "model": "rnn", "config": {"hidden": 32},
            "oof_acc": acc, "oof_loss": 0.3, "fold_min": acc - 0.01, "fold_max": acc + 0.01,
            "seconds": 3.0, "device": "cpu", "source": "sample", "finished": 1.7e9, "folds": 2,
            "seed": 42, "data": "d", "key": "k", **record}
    (folder / "run.json").write_text(json.dumps(made))
    (folder / "config.json").write_text(json.dumps({"hidden": 32}))
    for name_ in ("oof.csv", "test.csv", "submission.csv"):
        (folder / name_).write_text("x\n")
    return folder


# What a working copy holds besides the project's own files: none of it reaches a fresh clone.
LOCAL = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".hypothesis",
         "reports", "bench-results", "input", "runs", "submissions"}


def fresh_clone(target: Path) -> Path:
    """A copy of the project as a fresh clone has it: no .venv, no data, no runs."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in LOCAL or n.endswith((".pyc", ".egg-info"))}

    return copy_project(REPO, target, ignore=ignore)


# Property-based searches: bounded for `make test`; HYPOTHESIS_PROFILE=deep searches longer.
# Speed is measured by the benchmarks, never here: a busy 2-core machine must not fail a search
# because drawing or running an example was slow.
QUIET = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("default", max_examples=50, derandomize=True, **QUIET)
settings.register_profile("deep", max_examples=400, **QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# -- helpers and fixtures that several test files share --------------------------------------------

N_TRAIN, N_TEST = 20, 10
TRAIN_NAMES = ["label", *prepare.PIXELS]
TEST_NAMES = list(prepare.PIXELS)
Table = tuple[list[str], list[list[str]]]  # header names, rows of cells (as text)


def _rows(n: int, labelled: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 784)) * (rng.random((n, 784)) < 0.25)
    pixels[:, 0], pixels[:, 783] = 255, 7  # the first and last columns hold something
    if not labelled:
        return pixels
    return np.column_stack([np.arange(n) % 10, pixels])


TRAIN_VALUES = _rows(N_TRAIN, True, 1)
TEST_VALUES = _rows(N_TEST, False, 2)


def table(labelled: bool) -> Table:
    values = TRAIN_VALUES if labelled else TEST_VALUES
    return (list(TRAIN_NAMES if labelled else TEST_NAMES),
            [[str(v) for v in row] for row in values.tolist()])


def render(names: list[str], rows: list[list[str]], eol: str = "\n", final: bool = True) -> bytes:
    lines = [",".join(names)] + [",".join(row) for row in rows]
    return (eol.join(lines) + (eol if final else "")).encode()


CLEAN_TRAIN = render(*table(True))
CLEAN_TEST = render(*table(False))


def write_inputs(root: Path, train: bytes = CLEAN_TRAIN, test: bytes = CLEAN_TEST) -> Paths:
    paths = Paths(root)
    paths.input.mkdir(parents=True, exist_ok=True)
    paths.train_csv.write_bytes(train)
    paths.test_csv.write_bytes(test)
    return paths


# What a bad CSV must leave as it was: every file but the two CSVs (and the project's lock file).
OUTPUTS = {"skip": ("train.csv", "test.csv", ".lock"), "folders": False}


def assert_one_clear_error(result: subprocess.CompletedProcess[str] | str, *words: str) -> None:
    """One message, `error: ...`, naming each of words: no traceback, no credential (a command's
    result: with a non-zero exit)."""
    err = result if isinstance(result, str) else result.stderr
    assert isinstance(result, str) or result.returncode != 0, result
    assert err.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    for secret in (DUMMY_KEY, DUMMY_BASIC, DUMMY_TOKEN):
        assert secret not in err + ("" if isinstance(result, str) else result.stdout)


HEADER_TEST = ",".join(PIXELS)


def write_project(root: Path, labels: list[int], n_test: int, seed: int = 0) -> Paths:
    rng = np.random.default_rng(seed)
    train, test = ((rng.random((n, 784)) < 0.2) * rng.integers(0, 256, (n, 784))
                   for n in (len(labels), n_test))
    return write_inputs(root, render(TRAIN_NAMES, np.column_stack([labels, train]).astype(str).tolist()),
                        render(TEST_NAMES, test.astype(str).tolist()))


SCALARS = st.one_of(st.integers(-10, 300), st.floats(allow_nan=True), st.booleans(),
                    st.sampled_from(["rnn", "gru", "8", "1e-3", "", "true"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(
    st.sampled_from(["a", "low"]), SCALARS, max_size=2))
RECORD_FIELDS = ["complete", "kind", "config", "oof_acc", "oof_loss", "fold_min", "fold_max",
                 "seconds", "finished", "oof_acc_tta", "weights", "oof_acc_honest"]
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(),
                              st.text(max_size=4)),
                    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
                        st.text(max_size=3), inner, max_size=2), max_leaves=4)


def tiny_data() -> tuple[Any, Any]:
    from pipeline.store.data import Prepared

    labels = np.arange(20, dtype=np.uint8) % 10
    return (Prepared(np.zeros((20, 28, 28), np.uint8), labels, np.zeros((4, 28, 28), np.uint8), "d"),
            np.arange(20) % 2)


@pytest.fixture(scope="session")
def two_runs(sample_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample with two finished runs on the same folds: rows (the session's run) and columns."""
    root = copy_project(sample_run, tmp_path_factory.mktemp("two") / "p")
    run_cli(root, "submit", *TINY, "--view", "cols")
    return root


@pytest.fixture
def two_run_project(two_runs: Path, tmp_path: Path) -> Path:
    return copy_project(two_runs, tmp_path / "p")


FAMILY = [dict(model=m) for m in CELLS] + [
    dict(model="rnn", layers=2, dropout=0.2), dict(model="gru", bidirectional=True),
    dict(model="lstm", layers=2, bidirectional=True),
    # How the network reads the digit: every view, framing and readout, and weight averaging.
    dict(view="both", rows_per_step=4), dict(view="cols", readout="last", rows_per_step=1),
    dict(model="gru", view="both", readout="pool", rows_per_step=7), dict(nonlinearity="relu", ema=0.9),
]
