"""End to end through the CLI on the built-in sample: artifacts, skipping, reruns and make."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, TINY, run_cli

from pipeline.config import Paths
from pipeline.submission import validate_file

LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "seconds",
               "samples_per_s"]


def test_submit_writes_every_artifact(sample_run: Path) -> None:
    paths = Paths(sample_run)
    prepared = {n: np.load(paths.prepared / f"{n}.npy") for n in ("train_x", "train_y", "test_x")}
    assert prepared["train_x"].dtype == np.uint8 and prepared["train_x"].shape[1:] == (28, 28)
    assert prepared["test_x"].dtype == np.uint8 and prepared["test_x"].shape[1:] == (28, 28)
    n_train, n_test = len(prepared["train_y"]), len(prepared["test_x"])
    assert json.loads(paths.source_json.read_text())["source"] == "sample"

    folds = pd.read_csv(paths.folds_csv)
    assert list(folds.columns) == ["row", "label", "fold"]
    assert sorted(folds["row"]) == list(range(n_train)) and set(folds["fold"]) == {0, 1}

    seen_rows = []
    for k in range(2):
        ckpt = torch.load(paths.fold_model(k), map_location="cpu", weights_only=True)
        assert ckpt["complete"] and ckpt["config"]["hidden"] == 32 and 1 <= ckpt["epoch"] <= 2
        assert not paths.fold_state(k).exists()
        log = pd.read_csv(paths.fold_log(k))
        assert list(log.columns) == LOG_COLUMNS and list(log["epoch"]) == [1, 2]
        oof = pd.read_csv(paths.oof_preds(k))
        assert list(oof.columns) == ["row", "label"] + [f"p{c}" for c in range(10)]
        assert set(oof["row"]) == set(folds.loc[folds["fold"] == k, "row"])
        np.testing.assert_allclose(oof.filter(like="p").sum(axis=1), 1, atol=1e-4)
        seen_rows += list(oof["row"])
        test = pd.read_csv(paths.test_preds(k))
        assert list(test["ImageId"]) == list(range(1, n_test + 1))
    assert sorted(seen_rows) == list(range(n_train))

    cv = pd.read_csv(paths.logs / "cv.csv")
    assert list(cv["fold"].astype(str)) == ["0", "1", "all"]
    assert 0 < cv["valid_acc"].iloc[-1] <= 1
    config = json.loads((paths.logs / "config.json").read_text())
    assert config["epochs"] == 2 and config["folds"] == 2

    submission = validate_file(paths.submission_csv, expected_rows=n_test)
    kept = [p for p in paths.submissions.glob("*-rnn-cv*.csv")]
    assert len(kept) == 1 and kept[0].read_bytes() == paths.submission_csv.read_bytes()
    assert submission["Label"].between(0, 9).all()


def test_second_submit_redoes_nothing(run_copy: Path) -> None:
    paths = Paths(run_copy)
    before = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*") if p.is_file()}
    result = run_cli(run_copy, "submit", *TINY)
    for stage in ("prepare: up to date", "folds: up to date", "fold 0: up to date",
                  "fold 1: up to date", "predict: up to date"):
        assert stage in result.stdout
    after = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*") if p.is_file()}
    assert after == before
    assert len(list(paths.submissions.glob("*-cv*.csv"))) == 1


def test_changed_hyperparameter_reruns_only_what_depends_on_it(run_copy: Path) -> None:
    paths = Paths(run_copy)
    folds_mtime = paths.folds_csv.stat().st_mtime_ns
    result = run_cli(run_copy, "submit", "--folds", "2", "--epochs", "1", "--hidden", "32")
    assert "prepare: up to date" in result.stdout and "folds: up to date" in result.stdout
    assert "fold 0: up to date" not in result.stdout
    assert paths.folds_csv.stat().st_mtime_ns == folds_mtime
    assert list(pd.read_csv(paths.fold_log(0))["epoch"]) == [1]
    assert len(list(paths.submissions.glob("*-cv*.csv"))) == 2


def test_train_one_fold_and_predict_without_training(run_copy: Path) -> None:
    paths = Paths(run_copy)
    fold1 = paths.fold_model(1).read_bytes()
    result = run_cli(run_copy, "train", "--fold", "0", "--folds", "2", "--epochs", "1",
                     "--hidden", "32")
    assert "folds [0]" in result.stdout
    assert paths.fold_model(1).read_bytes() == fold1
    # Fold 0 now has other settings than fold 1: predict refuses to mix them.
    mixed = run_cli(run_copy, "predict", check=False)
    assert mixed.returncode == 1 and "different settings" in mixed.stderr
    run_cli(run_copy, "train", *TINY)
    result = run_cli(run_copy, "predict", "--force")
    assert "OOF accuracy" in result.stdout and "fold 0: up to date" not in result.stdout


def test_stage_before_its_input_says_what_to_run(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "train", check=False)
    assert result.returncode == 1
    assert "make download" in result.stderr or "make prepare" in result.stderr
    assert "Traceback" not in result.stderr


def test_options_exist_on_the_stage_clis() -> None:
    for stage in ("folds", "train", "predict", "submit"):
        text = run_cli(REPO, stage, "--help").stdout
        for option in ("--model", "--epochs", "--folds", "--hidden", "--batch", "--lr", "--seed",
                       "--device", "--preset", "--config"):
            assert option in text, (stage, option)


def test_make_help_lists_the_stages() -> None:
    result = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True,
                            text=True, check=True)
    for target in ("submit", "download", "prepare", "folds", "train", "predict", "test", "upload",
                   "report", "runs", "bench"):
        assert f"  {target} " in result.stdout, target
    plain = subprocess.run(["make", "--no-print-directory"], cwd=REPO, capture_output=True,
                           text=True, check=True)
    assert plain.stdout == result.stdout


def test_make_passes_options_through() -> None:
    result = subprocess.run(["make", "-n", "--no-print-directory", "train", "FOLD=2", "EPOCHS=5",
                             "MODEL=gru", "HIDDEN=64", "BIDIRECTIONAL=1", "CUDA_GRAPH=1", "AMP=0",
                             "ARGS=--clip 0.5"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    line = next(ln for ln in result.stdout.splitlines() if "-m pipeline train" in ln).replace('"', "")
    for part in ("--fold 2", "--epochs 5", "--model gru", "--hidden 64", "--bidirectional",
                 "--cuda-graph", "--no-amp", "--clip 0.5"):
        assert part in line


@pytest.mark.parametrize("bad", [["--folds", "1"], ["--model", "cnn"], ["--lr", "-1"],
                                 ["--fold", "7", "--folds", "2"]])
def test_bad_options_fail_cleanly(run_copy: Path, bad: list[str]) -> None:
    result = run_cli(run_copy, "train", *bad, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip()


def test_folds_made_for_other_data_or_seed_are_refused(run_copy: Path) -> None:
    paths = Paths(run_copy)
    wrong_seed = run_cli(run_copy, "train", *TINY, "--seed", "7", check=False)
    assert wrong_seed.returncode == 1 and "make folds" in wrong_seed.stderr
    lines = paths.train_csv.read_text().splitlines()
    paths.train_csv.write_text("\n".join(lines[:-20]) + "\n")  # the data changes under the folds
    run_cli(run_copy, "prepare")
    stale = run_cli(run_copy, "train", *TINY, check=False)
    assert stale.returncode == 1 and "other data" in stale.stderr and "make folds" in stale.stderr
    run_cli(run_copy, "folds", *TINY)
    assert len(pd.read_csv(paths.folds_csv)) == len(lines) - 21


def test_explicit_other_source_replaces_only_the_sample(run_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "downloads"
    elsewhere.mkdir()
    for name in ("train.csv", "test.csv"):
        (elsewhere / name).write_bytes((run_copy / "input" / name).read_bytes())
    (elsewhere / "train.csv").write_text(
        "\n".join((elsewhere / "train.csv").read_text().splitlines()[:-10]) + "\n")
    # The built-in sample gives way to an explicitly asked-for source...
    replaced = run_cli(run_copy, "download", "--source", "dir", "--dir", str(elsewhere))
    assert "replacing the built-in sample" in replaced.stdout
    assert json.loads(Paths(run_copy).source_json.read_text())["source"] == "dir"
    assert Paths(run_copy).train_csv.read_bytes() == (elsewhere / "train.csv").read_bytes()
    # ...but real files from one source are kept, with a warning, unless FORCE=1.
    kept = run_cli(run_copy, "download", "--source", "sample")
    assert "WARNING" in kept.stdout and "FORCE=1" in kept.stdout
    assert Paths(run_copy).train_csv.read_bytes() == (elsewhere / "train.csv").read_bytes()
    forced = run_cli(run_copy, "download", "--source", "sample", "--force")
    assert "wrote the sample" in forced.stdout


def test_settings_that_do_not_change_learning_do_not_retrain(run_copy: Path) -> None:
    result = run_cli(run_copy, "train", "--fold", "0", *TINY, "--eval-batch", "64", "--jobs", "1")
    assert "fold 0: up to date" in result.stdout
    run_cli(run_copy, "predict", "--eval-batch", "64")


def test_lost_out_of_fold_predictions_are_remade_without_retraining(run_copy: Path) -> None:
    paths = Paths(run_copy)
    oof, model = pd.read_csv(paths.oof_preds(1)), paths.fold_model(1).read_bytes()
    paths.oof_preds(1).unlink()
    result = run_cli(run_copy, "train", *TINY)
    assert "fold 1: up to date" in result.stdout
    assert paths.fold_model(1).read_bytes() == model  # not retrained
    # The same weights on the same rows; the first RNN call of a fresh process on a CPU may round
    # differently in the last bit (the BLAS's first-call path), so the sixth digit may differ.
    remade = pd.read_csv(paths.oof_preds(1))
    assert list(remade.columns) == list(oof.columns)
    assert remade[["row", "label"]].equals(oof[["row", "label"]])
    np.testing.assert_allclose(remade.to_numpy(), oof.to_numpy(), rtol=1e-5, atol=2e-6)


def test_forced_retraining_of_one_fold_repeats_it_exactly(run_copy: Path) -> None:
    paths = Paths(run_copy)
    before = {k: torch.load(paths.fold_model(k), weights_only=True)["state_dict"] for k in (0, 1)}
    fold1 = paths.fold_model(1).read_bytes()
    result = run_cli(run_copy, "train", "--fold", "0", "--force", *TINY)
    assert "fold 0 epoch   2/2" in result.stdout and "fold 1" not in result.stdout
    after = torch.load(paths.fold_model(0), weights_only=True)["state_dict"]
    assert all(torch.equal(after[name], before[0][name]) for name in after)
    assert paths.fold_model(1).read_bytes() == fold1


def test_tta_reports_its_own_out_of_fold_accuracy(run_copy: Path) -> None:
    result = run_cli(run_copy, "predict", "--tta", "2", *TINY)
    record = json.loads((run_copy / "preds" / "ensemble.json").read_text())
    assert f"with TTA=2 {record['oof_acc_tta']:.4f}" in result.stdout
    # Recomputed here from the checkpoints: each fold's model, with the same passes, on its rows.
    from pipeline import prepare
    from pipeline.runtime import load_checkpoint, model_from_checkpoint, predict_log_proba

    paths = Paths(run_copy)
    data = prepare.load(paths)
    fold_of = pd.read_csv(paths.folds_csv).sort_values("row")["fold"].to_numpy()
    correct = 0
    for k in range(2):
        model, cfg = model_from_checkpoint(paths.fold_model(k), load_checkpoint(paths.fold_model(k)))
        rows = np.flatnonzero(fold_of == k)
        guess = predict_log_proba(model, torch.from_numpy(data.train_x[rows]), cfg, tta=2, seed=42)
        correct += int((guess.argmax(1).numpy() == data.train_y[rows]).sum())
    assert record["oof_acc_tta"] == correct / len(fold_of)
    assert "with TTA)" in run_cli(run_copy, "runs").stdout
    again = run_cli(run_copy, "predict", "--tta", "2", *TINY)
    assert "up to date" in again.stdout and f"with TTA=2 {record['oof_acc_tta']:.4f}" in again.stdout
    # Without TTA there is no such figure.
    plain = run_cli(run_copy, "predict", *TINY)
    assert "with TTA" not in plain.stdout
    assert json.loads((run_copy / "preds" / "ensemble.json").read_text())["oof_acc_tta"] is None
