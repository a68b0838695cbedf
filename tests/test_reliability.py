"""Interruption, numerical faults, reproducibility and the fold-parallel path."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SAMPLE, TINY, copy_project, run_cli, start_cli, the_run

from pipeline.config import Paths, resolve
from pipeline.engine import checkpoint
from pipeline.errors import PipelineError
from pipeline.stages import download
from pipeline.store.artifacts import RunDir, load_prepared, run_id
from pipeline.store.io import replace_together, staged_files

TRAINED = ("runs", "submissions")


def fresh_outputs(root: Path) -> Path:
    """Keep the prepared data and folds of a run, drop everything trained."""
    for name in TRAINED:
        shutil.rmtree(root / name, ignore_errors=True)
    return root


def same_models(a: Path, b: Path, folds: int = 2) -> None:
    for k in range(folds):
        ca = torch.load(the_run(a).model(k), map_location="cpu", weights_only=True)
        cb = torch.load(the_run(b).model(k), map_location="cpu", weights_only=True)
        assert ca["epoch"] == cb["epoch"] and ca["valid_acc"] == cb["valid_acc"]
        assert ca["state_dict"].keys() == cb["state_dict"].keys()
        for name, tensor in ca["state_dict"].items():
            assert torch.equal(tensor, cb["state_dict"][name]), (k, name)


def same_logs(a: Path, b: Path, folds: int = 2) -> None:
    for k in range(folds):
        la = pd.read_csv(the_run(a).log(k)).drop(columns=["seconds", "samples_per_s"])
        lb = pd.read_csv(the_run(b).log(k)).drop(columns=["seconds", "samples_per_s"])
        pd.testing.assert_frame_equal(la, lb)


@pytest.mark.slow
def test_same_seed_gives_the_same_run(sample_run: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    run_cli(again, "submit", *SAMPLE, *TINY)
    pd.testing.assert_frame_equal(pd.read_csv(Paths(again).folds_csv),
                                  pd.read_csv(Paths(sample_run).folds_csv))
    same_models(sample_run, again)
    assert Paths(again).submission_csv.read_bytes() == Paths(sample_run).submission_csv.read_bytes()


LONG = ("--folds", "2", "--epochs", "12", "--hidden", "32")  # long enough to be killed part way


@pytest.fixture(scope="module")
def long_run(sample_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's prepared data and folds with one uninterrupted, finished run of LONG."""
    root = fresh_outputs(copy_project(sample_run, tmp_path_factory.mktemp("long") / "p"))
    run_cli(root, "submit", *LONG)
    return root


def kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool], poll: float) -> None:
    """SIGKILL proc as soon as ready() holds (it must still be running then)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(poll)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_result(run_copy: Path, long_run: Path) -> None:
    reference = long_run
    killed = fresh_outputs(run_copy)
    run = planned_run(killed, LONG)
    log = run.log(0)
    proc = start_cli(killed, "train", *LONG)
    # header + 3 epochs
    kill_when(proc, lambda: log.is_file() and len(log.read_text().splitlines()) >= 4, 0.01)
    assert run.state(0).is_file() and not run.model(0).exists()
    assert not Paths(killed).submission_csv.exists()
    assert not list(run.path.glob(".*"))  # no temporary file left behind

    result = run_cli(killed, "submit", *LONG)
    assert "fold 0: resuming after epoch" in result.stdout
    same_models(killed, reference)
    same_logs(killed, reference)
    assert Paths(killed).submission_csv.read_bytes() == Paths(reference).submission_csv.read_bytes()
    assert not run.state(0).exists()


def planned_run(root: Path, args: tuple[str, ...]) -> RunDir:
    """The folder a command with these settings trains into (the project holds prepared data)."""
    names = args[0::2]
    overrides = {n.lstrip("-"): v for n, v in zip(names, args[1::2], strict=True)}
    return RunDir(Paths(root).runs / run_id(resolve(overrides=overrides),
                                            load_prepared(Paths(root)).data_key))


@pytest.mark.slow
def test_killed_forced_retrain_keeps_the_finished_model_and_resumes(long_run: Path,
                                                                    tmp_path: Path) -> None:
    """FORCE=1 replaces a finished model only by a finished one, and its rerun resumes too."""
    root = copy_project(long_run, tmp_path / "p")
    run = planned_run(root, LONG)
    finished, submission = run.model(0).read_bytes(), Paths(root).submission_csv.read_bytes()
    proc = start_cli(root, "train", "--fold", "0", "--force", *LONG)
    kill_when(proc, lambda: run.state(0).is_file(), 0.005)
    assert run.model(0).read_bytes() == finished  # the finished model is still there, unchanged
    predicted = run_cli(root, "predict", *LONG)
    assert "train: fold 0 skipped" in predicted.stdout
    assert Paths(root).submission_csv.read_bytes() == submission
    again = run_cli(root, "train", "--fold", "0", "--force", *LONG)
    assert "fold 0: resuming after epoch" in again.stdout
    after = torch.load(run.model(0), weights_only=True)["state_dict"]
    before = torch.load(io.BytesIO(finished), weights_only=True)["state_dict"]
    assert all(torch.equal(after[name], before[name]) for name in after)  # the same model again


@pytest.mark.slow
def test_interrupt_says_how_to_resume(run_copy: Path) -> None:
    args = ("--folds", "2", "--epochs", "50", "--hidden", "32")
    log = planned_run(fresh_outputs(run_copy), args).log(0)
    proc = start_cli(run_copy, "train", *args, output=True, sigint=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not log.is_file():
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "rerun the same command to resume" in err and "Traceback" not in err


@pytest.mark.slow
def test_nan_loss_stops_the_fold_without_broken_outputs(run_copy: Path) -> None:
    paths = Paths(run_copy)
    submission = paths.submission_csv.read_bytes()
    model = the_run(run_copy).model(0).read_bytes()
    args = ("--folds", "2", "--epochs", "1", "--hidden", "32", "--lr", "1e30", "--clip", "0")
    result = run_cli(run_copy, "train", *args, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fold 0, epoch 1" in result.stderr and "lower learning rate" in result.stderr
    assert the_run(run_copy, "rnn-h32-e2").model(0).read_bytes() == model
    failed = planned_run(run_copy, args)
    assert not failed.model(0).exists() and not failed.config.exists()
    assert paths.submission_csv.read_bytes() == submission


@pytest.mark.slow
def test_parallel_folds_equal_sequential_folds(sample_run: Path, run_copy: Path) -> None:
    """The session's run trained its folds one after the other on one thread; two jobs split two
    threads: one each, as in the sequential run. They say so (jobs on a CPU: threads per worker)."""
    result = run_cli(fresh_outputs(run_copy), "train", *TINY, "--jobs", "2",
                     env={"OMP_NUM_THREADS": "2"})
    assert "2 folds at a time" in result.stdout
    assert "2 folds at a time on cpu (1 threads) each" in result.stdout
    same_models(run_copy, sample_run)
    same_logs(run_copy, sample_run)


@pytest.mark.slow
def test_corrupt_training_state_restarts_the_fold(run_copy: Path) -> None:
    run = planned_run(fresh_outputs(run_copy), TINY)
    run.path.mkdir(parents=True)
    run.state(0).write_bytes(os.urandom(64))
    result = run_cli(run_copy, "train", *TINY)
    assert "unreadable training state" in result.stdout
    assert not run.state(0).exists() and run.model(0).is_file()


def test_training_state_from_another_device_type_is_not_resumed(tmp_path: Path) -> None:
    _load_state = checkpoint.load_state
    path = tmp_path / "fold_0.last.pt"
    torch.save({"key": "k", "device_type": "cuda", "history": []}, path)
    assert _load_state(path, "k", torch.device("cpu")) is None
    torch.save({"key": "k", "device_type": "cpu", "history": []}, path)
    assert _load_state(path, "k", torch.device("cpu")) is not None
    assert _load_state(path, "other", torch.device("cpu")) is None


# -- train.csv and test.csv are replaced as a pair --------------------------------------------------


def failing_second_rename(monkeypatch: pytest.MonkeyPatch, name: str,
                          error: BaseException | None = None) -> None:
    """os.replace fails (disk full, or error) when a staged file called name is renamed into place."""
    real = os.replace

    def replace(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        if Path(src).name == name and ".staging-" in str(src):
            raise error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_failed_rename_puts_both_files_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "train.csv").write_text("old train")
    (folder / "test.csv").write_text("old test")
    failing_second_rename(monkeypatch, "test.csv")
    with staged_files(folder, ["train.csv", "test.csv"]) as staged:
        staged[0].write_text("new train")
        staged[1].write_text("new test")
        with pytest.raises(PipelineError, match=r"test.csv: cannot write \(No space left.*as they were"):
            replace_together([(staged[0], folder / "train.csv"), (staged[1], folder / "test.csv")])
    assert (folder / "train.csv").read_text() == "old train"
    assert (folder / "test.csv").read_text() == "old test"
    assert sorted(p.name for p in folder.iterdir()) == ["test.csv", "train.csv"]  # nothing left over


def test_interrupt_between_the_renames_puts_both_files_back(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "train.csv").write_text("old train")
    (folder / "test.csv").write_text("old test")
    failing_second_rename(monkeypatch, "test.csv", KeyboardInterrupt())
    with staged_files(folder, ["train.csv", "test.csv"]) as staged:
        staged[0].write_text("new train")
        staged[1].write_text("new test")
        with pytest.raises(KeyboardInterrupt):  # passed on as it is, after the files are put back
            replace_together([(staged[0], folder / "train.csv"), (staged[1], folder / "test.csv")])
    assert (folder / "train.csv").read_text() == "old train"
    assert (folder / "test.csv").read_text() == "old test"
    assert sorted(p.name for p in folder.iterdir()) == ["test.csv", "train.csv"]


def test_failed_rename_into_an_empty_folder_leaves_neither(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "input"
    failing_second_rename(monkeypatch, "test.csv")
    with staged_files(folder, ["train.csv", "test.csv"]) as staged:
        for path in staged:
            path.write_text("new")
        with pytest.raises(PipelineError):
            replace_together([(staged[0], folder / "train.csv"), (staged[1], folder / "test.csv")])
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_dir_download_that_fails_midway_keeps_the_old_pair(run_copy: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths(run_copy)
    before = paths.train_csv.read_bytes(), paths.test_csv.read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.csv").write_bytes(before[0].replace(b"\n0,", b"\n1,", 1))  # a different file
    (other / "test.csv").write_bytes(before[1])
    real = shutil.copyfile

    def copyfile(src: Path, dst: Path) -> None:  # the disk fills up while test.csv is copied
        if Path(src).name == "test.csv":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    with pytest.raises(PipelineError, match=r"other/test.csv: cannot copy it into .*input \(No space "
                       r"left.*as it was"):
        download.run(paths, source="dir", src_dir=other, force=True)
    assert (paths.train_csv.read_bytes(), paths.test_csv.read_bytes()) == before
    assert not [p for p in paths.input.iterdir() if p.name.startswith(".")]
