"""Inside a Kaggle notebook, simulated: a fake /kaggle tree in a temporary folder (KAGGLE_ROOT), its
competition input read-only, no virtual environment and no network."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    closed_port,
    fresh_clone,
    run_make,
    snapshot,
)

from pipeline.config import Paths
from pipeline.kaggle import notebook
from pipeline.stages import download
from pipeline.store import sample


def make_read_only(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        path.chmod(0o444 if path.is_file() else 0o555)


def make_writable(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.fixture
def kaggle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fake /kaggle: input/digit-recognizer/{train,test}.csv (the sample, read-only) and working/."""
    root = tmp_path / "kaggle"
    competition = root / "input" / "digit-recognizer"
    competition.mkdir(parents=True)
    (root / "working").mkdir()
    sample.write(competition / "train.csv", competition / "test.csv")
    make_read_only(root / "input")
    monkeypatch.setenv("KAGGLE_ROOT", str(root))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    yield root
    make_writable(root / "input")


def test_a_notebook_is_known_by_its_variable_or_its_input_folder(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path))
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert not notebook.in_notebook() and notebook.working() is None
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert notebook.in_notebook()
    assert notebook.working() is None and notebook.competition_input() is None  # nothing there
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
    (tmp_path / "input" / "competitions" / "digit-recognizer").mkdir(parents=True)
    (tmp_path / "working").mkdir()
    assert notebook.in_notebook() and notebook.working() == tmp_path / "working"
    assert notebook.competition_input() is None  # the folder alone is not the competition's files
    for name in ("train.csv", "test.csv"):
        (tmp_path / "input" / "competitions" / "digit-recognizer" / name).write_text("x\n")
    assert notebook.competition_input() == tmp_path / "input" / "competitions" / "digit-recognizer"


def test_auto_copies_the_attached_competition_files_and_never_writes_there(kaggle: Path,
                                                                           tmp_path: Path) -> None:
    before = snapshot(kaggle / "input", modes=True)
    paths = Paths(tmp_path / "project")
    assert download.run(paths) == "dir"
    attached = kaggle / "input" / "digit-recognizer"
    assert paths.train_csv.read_bytes() == (attached / "train.csv").read_bytes()
    assert paths.test_csv.read_bytes() == (attached / "test.csv").read_bytes()
    assert paths.train_csv.stat().st_mode & stat.S_IWUSR  # a copy of its own, not the read-only file
    assert snapshot(kaggle / "input", modes=True) == before
    # The built-in sample made before the data was attached is replaced; other files are kept.
    sample.write(paths.train_csv, paths.test_csv)
    paths.source_json.write_text('{"source": "sample"}\n')
    download.run(paths)
    assert '"dir"' in paths.source_json.read_text()
    paths.train_csv.write_text("mine\n")
    paths.source_json.write_text('{"source": "kaggle"}\n')
    download.run(paths)
    assert paths.train_csv.read_text() == "mine\n"


def refuse_install(names: list[str]) -> int:
    raise AssertionError(f"set-up installed {names} with the internet off")


def test_setup_uses_this_python_when_everything_is_there(capsys: pytest.CaptureFixture[str]) -> None:
    def no_network() -> bool:
        raise AssertionError("set-up looked for the internet with nothing to install")

    assert notebook.check(is_online=no_network, install=refuse_install) == 0
    err = capsys.readouterr().err
    assert "no virtual environment" in err and sys.executable in err


@pytest.mark.parametrize("online", [False, True])
def test_setup_installs_only_what_is_missing_and_only_online(online: bool, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(notebook.REQUIRED, "no_such_module_digits", "no-such-package")
    monkeypatch.setitem(notebook.OPTIONAL, "no_such_optional_digits", ("optional-package", "make tune"))
    asked: list[list[str]] = []
    assert notebook.check(is_online=lambda: online, install=lambda names: asked.append(names) or 0) == 1
    assert asked == ([["no-such-package", "optional-package"]] if online else [])
    err = capsys.readouterr().err  # still missing after the install: said so, exit 1
    assert ("internet is off" in err and "nothing is installed" in err) is not online
    assert "missing from Python" in err and "no-such-package" in err
    assert "optional-package is not installed (make tune need it)" in err


def test_setup_never_installs_pytorch(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    real = notebook.missing
    monkeypatch.setattr(notebook, "missing", lambda names: ["torch", *real(names)] if "torch" in names
                        else real(names))
    assert notebook.check(is_online=lambda: True, install=refuse_install) == 1
    assert "PyTorch is missing" in capsys.readouterr().err


def test_setup_notes_a_kaggle_client_too_old_for_upload(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(notebook.importlib.metadata, "version", lambda name: "1.6.17")
    assert notebook.kaggle_client_too_old() == "1.6.17"
    assert notebook.check(is_online=lambda: False, install=refuse_install) == 0  # submit still runs
    assert "kaggle client is 1.6.17" in capsys.readouterr().err
    monkeypatch.setattr(notebook.importlib.metadata, "version", lambda name: "2.2.5")
    assert notebook.kaggle_client_too_old() is None


def make_dry_run(env: dict[str, str], *args: str) -> str:
    result = run_make("-n", *args, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_makefile_uses_the_notebooks_python_inside_a_notebook(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KAGGLE_KERNEL_RUN_TYPE", "MAKEFLAGS")}
    env["KAGGLE_ROOT"] = str(tmp_path)  # an empty tree: not a notebook
    outside = make_dry_run(env, "submit")
    assert '.venv/bin/python -m pipeline --make "" submit' in outside
    inside = make_dry_run({**env, "KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, "submit")
    assert "python3 -m pipeline.kaggle.notebook" in inside
    assert 'python3 -m pipeline --make "" submit' in inside
    assert ".venv" not in inside and "pip install" not in inside
    (tmp_path / "input").mkdir()  # /kaggle/input alone is enough
    assert ".venv" not in make_dry_run(env, "submit")


@pytest.mark.slow
def test_make_submit_in_a_kaggle_notebook(kaggle: Path, tmp_path: Path) -> None:
    project = fresh_clone(kaggle / "working" / "digits")
    bin_dir = tmp_path / "bin"  # the notebook's python3: this interpreter, which has the packages
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    no_network = f"http://127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAGGLE_", "MAKE", "MFLAGS", "VIRTUAL_ENV"))
           and not k.lower().endswith("_proxy")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HOME=str(tmp_path / "home"),
               KAGGLE_KERNEL_RUN_TYPE="Interactive", KAGGLE_ROOT=str(kaggle), PYTHONUNBUFFERED="1",
               HTTP_PROXY=no_network, HTTPS_PROXY=no_network, http_proxy=no_network,
               https_proxy=no_network)
    before = snapshot(kaggle / "input", modes=True)
    result = run_make("submit", "FOLDS=2", "EPOCHS=1", "HIDDEN=16", cwd=project, env=env, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Kaggle notebook: using Python" in out and "no virtual environment" in out
    assert "attached to this Kaggle notebook" in out
    assert not (project / ".venv").exists()
    assert snapshot(kaggle / "input", modes=True) == before  # nothing written under input/
    written = kaggle / "working" / "submission.csv"
    assert written.read_bytes() == (project / "submissions" / "submission.csv").read_bytes()
    assert written.read_text().splitlines()[0] == "ImageId,Label"
    assert len(written.read_text().splitlines()) == 1 + 300  # the attached test.csv's rows
    assert [p.name for p in (project / "runs").iterdir() if p.name.startswith("rnn-h16-e1-")]
    assert sorted(p.name for p in (kaggle / "working").iterdir()) == ["digits", "submission.csv"]
