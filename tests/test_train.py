"""train: the recipe (optimizer, schedule, clipping, batches, progress), checkpoints and their damage,
interruption and resumption, numerical faults, reproducibility and the fold-parallel path."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import (
    FAMILY,
    OUTPUTS,
    SAMPLE,
    SMALL,
    TINY,
    assert_one_clear_error,
    copy_project,
    fake_run,
    run_cli,
    snapshot,
    start_cli,
    the_run,
    write_inputs,
    write_project,
)

from pipeline.cli import main
from pipeline.config import Paths, Settings, resolve
from pipeline.engine import checkpoint
from pipeline.engine.models import build_model
from pipeline.engine.runtime import predict_log_proba
from pipeline.errors import PipelineError
from pipeline.stages import train
from pipeline.store.data import load_prepared, read_folds
from pipeline.store.run import Plan, RunDir, all_runs, run_id

TINY_CPU = ["--folds", "2", "--epochs", "1", "--hidden", "8", "--batch", "8", "--device", "cpu",
        "--no-augment", "--eval-batch", "64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished run (2 folds, 1 epoch, no predict yet) to copy per test."""
    root = tmp_path_factory.mktemp("trained")
    write_inputs(root)
    for stage in (["prepare"], ["folds", *TINY_CPU], ["train", *TINY_CPU]):
        assert main(["--root", str(root), *stage]) == 0, stage
    return root


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Paths:
    return Paths(copy_project(trained, tmp_path / "run"))


def weights_of_another_model(path: Path, **other: object) -> None:
    """Weights that do not fit the settings the checkpoint says (hidden 8, rnn)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["state_dict"] = build_model(replace(resolve(overrides=payload["config"]), **other)).state_dict()
    torch.save(payload, path)


CHECKPOINT_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "garbage": (lambda p: p.write_bytes(b"garbage, not a checkpoint\x00" * 10), "corrupt"),
    "empty": (lambda p: p.write_bytes(b""), "corrupt"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:300]), "corrupt"),
    "hidden-16": (lambda p: weights_of_another_model(p, hidden=16), "weights do not fit"),
    "gru": (lambda p: weights_of_another_model(p, model="gru"), "weights do not fit"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_named_and_only_its_fold_retrains(run_dir: Paths, damage: str) -> None:
    run = the_run(run_dir.root)
    change, said = CHECKPOINT_DAMAGE[damage]
    change(run.model(0))
    kept = run.model(1).read_bytes()
    out = run_cli(run_dir.root, "predict", *TINY_CPU).stdout
    assert f"train: fold 0 reruns: damaged ({run.model(0)}: {said}" in out
    assert "train: fold 1 skipped" in out and run.model(1).read_bytes() == kept
    assert run_dir.submission_csv.is_file()


def test_make_train_reaches_the_backward_pass_in_seven_calls(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The training loop reads top to bottom (docs/engine.md): from the command line's entry to
    loss.backward() on a CPU, main -> the train command -> train.run -> train_fold -> train_epoch ->
    the step -> its forward-backward -> backward: seven calls."""
    chains: list[list[str]] = []
    real = torch.Tensor.backward

    def backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        stack = traceback.extract_stack()[:-1]
        entry = max(i for i, f in enumerate(stack) if f.name == "main" and f.filename.endswith("cli.py"))
        chains.append([f.name for f in stack[entry:]])
        real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    write_inputs(tmp_path)
    assert main(["--root", str(tmp_path), "train", *TINY_CPU]) == 0
    assert chains and all(chain == ["main", "_train", "run", "train_fold", "train_epoch", "__call__",
                                    "_forward_backward"] for chain in chains)


@pytest.mark.parametrize("fold", ["7", "2", "-1"])
def test_fold_out_of_range(run_dir: Paths, fold: str) -> None:
    before = snapshot(run_dir.root, **OUTPUTS)
    result = run_cli(run_dir.root, "train", "--fold", fold, *TINY_CPU, check=False)
    assert result.returncode == 1
    assert_one_clear_error(result.stderr, f"fold {fold}", "0 to 1")
    assert snapshot(run_dir.root, **OUTPUTS) == before


@pytest.mark.slow
def test_disk_full_during_training_loses_nothing_and_the_rerun_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    write_project(tmp_path, [i % 10 for i in range(60)], 5)
    options = ["--folds", "2", "--epochs", "4", "--hidden", "8", "--fold", "0"]
    real_save = checkpoint.torch.save
    calls = []

    def failing_save(obj: object, path: Path) -> None:
        calls.append(path)
        if len(calls) == 3:  # the third epoch's state: half written, then the disk is full
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    assert main(["--root", str(tmp_path), "train", *options]) == 1
    err = capsys.readouterr().err
    assert "fold_0.state.pt: cannot write (No space left on device)" in err
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    state = torch.load(run / "fold_0.state.pt", weights_only=True)
    assert len(state["history"]) == 2  # the last good state, intact
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main(["--root", str(tmp_path), "train", *options]) == 0
    assert "fold 0: resuming after epoch 2 of 4" in capsys.readouterr().out


@pytest.mark.slow
def test_forced_retraining_of_one_fold_repeats_it_exactly(run_copy: Path) -> None:
    run = the_run(run_copy)
    before = torch.load(run.model(0), weights_only=True)["state_dict"]
    fold1 = run.model(1).read_bytes()
    result = run_cli(run_copy, "train", "--fold", "0", "--force", *TINY)
    assert "train: fold 0 reruns: FORCE=1" in result.stdout and "fold 0 epoch   2/2" in result.stdout
    after = torch.load(run.model(0), weights_only=True)["state_dict"]
    assert all(torch.equal(after[name], before[name]) for name in after)
    assert run.model(1).read_bytes() == fold1


def fresh_outputs(root: Path) -> Path:
    """Keep the prepared data and folds of a run, drop everything trained."""
    for name in ("runs", "submissions"):
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
    listed = next(line for line in run_cli(killed, "runs").stdout.splitlines() if run.id in line)
    assert "(not complete)" in listed

    result = run_cli(killed, "predict", "--run", run.id)  # the id `make runs` lists resumes it
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


@pytest.mark.slow
def test_models_trained_on_other_folds_are_never_current(run_copy: Path) -> None:
    from pipeline.stages import folds

    paths, run = Paths(run_copy), the_run(run_copy)
    plan = Plan(resolve(file=run.config), paths, run, load_prepared(paths), read_folds(paths))
    assert train.fold_output(plan, 0).stale() == ""
    other = folds.assign(plan.data.train_y.astype("int64"), 2, 7)  # seed 7's folds, not the run's 42
    assert "trained on other folds" in train.fold_output(replace(plan, fold_of=other), 0).stale()
    with pytest.raises(PipelineError, match=r"FOLDS=3, but the folds given hold 2"):
        train.check_settings(replace(Settings(), folds=3), read_folds(paths))


def test_train_of_a_blend_says_it_is_a_blend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = fake_run(tmp_path, "blend-abc123", kind="blend", weights={"rnn-a": 1})
    (folder / "blend.json").write_text('{"weights": {"rnn-a": 1}}')
    (folder / "config.json").unlink()
    for stage in ("train", "predict"):
        assert main(["--root", str(tmp_path), stage, "--run", "blend-abc123"]) == 1
        err = capsys.readouterr().err
        assert "RUN=blend-abc123 is a blend of other runs" in err and "no such run" not in err
    assert not (tmp_path / "input").exists()


@pytest.mark.slow
def test_few_steps_onecycle_and_preset_in_runs(two_run_project: Path) -> None:
    """2 epochs x 2 steps: OneCycleLR would divide by zero; PRESET=tutorial shows as such."""
    small = run_cli(two_run_project, "train", "--folds", "2", "--epochs", "2", "--batch", "700",
                    "--hidden", "8")
    assert "fold 1: best epoch" in small.stdout
    run_cli(two_run_project, "submit", "--preset", "tutorial", "--folds", "2", "--epochs", "1",
            "--hidden", "16")
    assert "preset=tutorial hidden=16 folds=2 epochs=1" in run_cli(two_run_project, "runs").stdout


@pytest.mark.parametrize("settings", FAMILY, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_every_family_member_trains_a_step_and_predicts(settings: dict) -> None:
    cfg = Settings(hidden=16, batch=16, epochs=1, **settings)
    state = train.new_state(cfg, 0, 40, torch.device("cpu"))
    model = state.step.model
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    before = [p.detach().clone() for p in model.parameters()]
    loss, acc = train.train_epoch(state, images, labels, torch.arange(40), cfg)
    assert math.isfinite(loss) and 0 <= acc <= 1
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    log_probs = predict_log_proba(model, images, cfg)
    assert log_probs.shape == (40, 10)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(40))


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "none"])
def test_schedule_runs_to_its_end(schedule: str) -> None:
    cfg = Settings(schedule=schedule, epochs=3, lr=0.01)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = train.make_scheduler(cfg, optimizer, steps_per_epoch=7)
    lrs = []
    for _ in range(3 * 7):  # OneCycleLR raises if stepped past its total
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    if schedule == "none":
        assert lrs == [0.01] * 21
    else:
        assert lrs[-1] < 1e-4 and max(lrs) <= 0.01 + 1e-12


def test_clipping_bounds_the_gradient_norm() -> None:
    cfg = Settings(hidden=16, batch=20, clip=0.05, augment=False, lr=1e-3)
    state = train.new_state(cfg, 0, 40, torch.device("cpu"))
    norms = []

    def record(opt: torch.optim.Optimizer, *_: object) -> None:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    state.step.optimizer.register_step_pre_hook(record)
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    train.train_epoch(state, images, labels, torch.arange(40), cfg)
    assert len(norms) == 2 and max(norms) <= 0.05 * (1 + 1e-4)


def test_short_last_batch_is_used_unless_dropped() -> None:
    cfg = Settings(batch=64)
    assert train.steps_per_epoch(cfg, 130) == 3
    assert train.steps_per_epoch(replace(cfg, drop_last=True), 130) == 2
    with pytest.raises(PipelineError, match="larger than"):
        train.steps_per_epoch(replace(cfg, drop_last=True), 50)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


ROW = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "valid_loss": 0.4, "valid_acc": 0.9123,
       "lr": 0.001, "seconds": 0.5, "samples_per_s": 1000.0}


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = train.Progress(fold=3, epochs=10, start=0)
    bar.update(ROW)
    bar.close()
    assert "fold 3" in terminal.getvalue() and "valid_acc=0.9123" in terminal.getvalue()
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    plain = train.Progress(fold=3, epochs=10, start=0)
    plain.update(ROW)
    plain.close()
    monkeypatch.setattr(sys, "stderr", terminal)  # folds trained at once write whole lines, no bars
    parallel = train.Progress(fold=1, epochs=3, start=0, position=1)
    parallel.update(ROW)
    out = capsys.readouterr().out
    assert "fold 3 epoch   1/10" in out and "valid_acc 0.9123" in out
    assert parallel.bar is None and out.endswith("samples/s\nfold 1 epoch   1/3  train_loss 0.5000  "
                                                 "train_acc 0.8000  valid_loss 0.4000  valid_acc 0.9123  "
                                                 "0.5s  1000 samples/s\n")


NEWER = ("rows_per_step", "readout", "nonlinearity", "ema")  # settings older pipelines never recorded


@pytest.mark.slow
def test_a_run_made_before_the_newer_settings_is_still_found(tmp_path: Path) -> None:
    """A run folder an older pipeline wrote (no newer setting in its config.json, checkpoints or
    record): the same settings retrain nothing, RUN=<its id> predicts with it, and `make runs`
    shows what it was trained with."""
    root = tmp_path / "older"
    legacy = ("--readout", "last", "--rows-per-step", "1")
    run_cli(root, "submit", *SAMPLE, *SMALL, *legacy)
    run = the_run(root)
    for path in [run.config, run.record]:
        record = json.loads(path.read_text())
        held = record.get("config", record) if path == run.record else record
        for name in NEWER:
            held.pop(name, None)
        path.write_text(json.dumps(record))
    for fold in range(2):
        payload = torch.load(run.model(fold), weights_only=True)
        payload["config"] = {k: v for k, v in payload["config"].items() if k not in NEWER}
        torch.save(payload, run.model(fold))
    again = run_cli(root, "submit", *SAMPLE, *SMALL, *legacy).stdout
    assert "fold 0 skipped" in again and "fold 1 skipped" in again and "reruns" not in again
    assert run_cli(root, "predict", "--run", run.id, "--force").returncode == 0
    listed = run_cli(root, "runs").stdout
    assert "readout=last" in listed and "rows_per_step=1" in listed
    assert [r.id for r in all_runs(Paths(root))] == [run.id]
