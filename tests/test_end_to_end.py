"""A whole `submit` on the built-in sample: every artifact it writes, and what a second one redoes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, files, run_cli, the_run

from pipeline.config import Paths
from pipeline.store.run import LOG_COLUMNS, PROB_COLUMNS, latest
from pipeline.store.submission import validate_file


@pytest.mark.slow
def test_submit_writes_every_artifact(sample_run: Path) -> None:
    paths = Paths(sample_run)
    prepared = {n: np.load(paths.prepared / f"{n}.npy") for n in ("train_x", "train_y", "test_x")}
    assert prepared["train_x"].dtype == np.uint8 and prepared["train_x"].shape[1:] == (28, 28)
    n_train, n_test = len(prepared["train_y"]), len(prepared["test_x"])
    assert json.loads(paths.source_json.read_text())["source"] == "sample"
    folds = pd.read_csv(paths.folds_csv)
    assert list(folds.columns) == ["row", "label", "fold"] and set(folds["fold"]) == {0, 1}

    run = the_run(sample_run)
    assert run.id.startswith("rnn-h32-e2-") and latest(paths) == run.id
    assert json.loads(run.config.read_text())["hidden"] == 32
    for k in range(2):
        ckpt = torch.load(run.model(k), map_location="cpu", weights_only=True)
        assert ckpt["config"]["hidden"] == 32 and 1 <= ckpt["epoch"] <= 2
        assert not run.state(k).exists()
        log = pd.read_csv(run.log(k))
        assert list(log.columns) == LOG_COLUMNS and list(log["epoch"]) == [1, 2]
        oof = pd.read_csv(run.oof_fold(k))
        assert list(oof.columns) == ["row", "label", *PROB_COLUMNS]
        assert set(oof["row"]) == set(folds.loc[folds["fold"] == k, "row"])
        assert list(pd.read_csv(run.test_fold(k))["ImageId"]) == list(range(1, n_test + 1))
    oof = pd.read_csv(run.oof)
    assert list(oof["row"]) == list(range(n_train))
    np.testing.assert_allclose(oof[PROB_COLUMNS].sum(axis=1), 1, atol=1e-4)
    cv = pd.read_csv(run.cv)
    assert list(cv["fold"].astype(str)) == ["0", "1", "all"] and 0 < cv["valid_acc"].iloc[-1] <= 1
    record = json.loads(run.record.read_text())
    assert record["complete"] and record["oof_acc"] == pytest.approx(cv["valid_acc"].iloc[-1])
    submission = validate_file(paths.submission_csv, expected_rows=n_test)
    assert run.submission.read_bytes() == paths.submission_csv.read_bytes()
    kept = list(paths.submissions.glob("*-rnn-cv*.csv"))
    assert [k.name for k in kept] == [record["kept"]]
    assert kept[0].read_bytes() == paths.submission_csv.read_bytes()
    assert submission["Label"].between(0, 9).all()


@pytest.mark.slow
def test_second_submit_redoes_nothing(run_copy: Path) -> None:
    before = files(run_copy)
    result = run_cli(run_copy, "submit", *TINY)
    for line in ("prepare: skipped: train.csv and test.csv unchanged", "folds: skipped",
                 "train: fold 0 skipped", "train: fold 1 skipped", "skipped: its folds and TTA=0"):
        assert line in result.stdout
    assert files(run_copy) == before


@pytest.mark.slow
def test_two_runs_are_kept_and_going_back_retrains_nothing(run_copy: Path) -> None:
    paths = Paths(run_copy)
    first = the_run(run_copy)
    first_files = {p.name: p.read_bytes() for p in first.path.iterdir()}
    first_submission = paths.submission_csv.read_bytes()
    run_cli(run_copy, "submit", *TINY, "--model", "gru")
    second = the_run(run_copy, "gru")
    assert second.id.startswith("gru-h32-e2-") and latest(paths) == second.id
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == first_files  # untouched
    assert paths.submission_csv.read_bytes() == second.submission.read_bytes()
    again = run_cli(run_copy, "submit", *TINY)  # the first settings again: nothing retrains
    assert "train: fold 0 skipped" in again.stdout and "fold 0 epoch" not in again.stdout
    assert paths.submission_csv.read_bytes() == first_submission
    assert latest(paths) == first.id
    assert len(list(paths.submissions.glob("*-cv*.csv"))) == 2  # no new kept copy for the old run
