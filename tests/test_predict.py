"""predict: the ensemble of the folds, TTA, and the predictions rebuilt when they are damaged or stale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SAMPLE, TINY, run_cli, the_run

from pipeline.config import Paths
from pipeline.engine.runtime import predict_log_proba
from pipeline.errors import PipelineError
from pipeline.stages.predict import average_probabilities
from pipeline.store.run import latest


@pytest.mark.slow
def test_tta_reports_its_own_out_of_fold_accuracy(run_copy: Path) -> None:
    from pipeline.engine import checkpoint
    from pipeline.store.data import load_prepared

    result = run_cli(run_copy, "predict", "--tta", "2", *TINY)
    run = the_run(run_copy)
    record = json.loads(run.record.read_text())
    assert f"with TTA=2 {record['oof_acc_tta']:.4f}" in result.stdout
    # The kept copy says it is a TTA submission and carries the TTA score.
    assert record["kept"].endswith(f"-cv{record['oof_acc']:.4f}-tta2.csv")
    # Recomputed here from the checkpoints: each fold's model, with the same passes, on its rows.
    paths = Paths(run_copy)
    data = load_prepared(paths)
    fold_of = pd.read_csv(paths.folds_csv).sort_values("row")["fold"].to_numpy()
    correct = 0
    for k in range(2):
        model, cfg = checkpoint.model_from(run.model(k))
        rows = np.flatnonzero(fold_of == k)
        guess = predict_log_proba(model, torch.from_numpy(data.train_x[rows]), cfg, tta=2, seed=42)
        correct += int((guess.argmax(1).numpy() == data.train_y[rows]).sum())
    assert record["oof_acc_tta"] == correct / len(fold_of)
    assert "with TTA=2)" in run_cli(run_copy, "runs").stdout
    again = run_cli(run_copy, "predict", "--tta", "2", *TINY)
    assert "skipped" in again.stdout and f"with TTA=2 {record['oof_acc_tta']:.4f}" in again.stdout
    plain = run_cli(run_copy, "predict", *TINY)  # without TTA there is no such figure
    assert "with TTA" not in plain.stdout
    assert json.loads(run.record.read_text())["oof_acc_tta"] is None


@pytest.mark.slow
def test_truncated_predictions_are_rebuilt_and_never_blended(run_copy: Path) -> None:
    run = the_run(run_copy)
    run.oof.write_text("".join(run.oof.read_text().splitlines(keepends=True)[:40]))
    refused = run_cli(run_copy, "blend", "--runs", run.id, *SAMPLE, *TINY, check=False)
    assert refused.returncode == 1 and f"make predict RUN={run.id} FORCE=1" in refused.stderr
    assert "Traceback" not in refused.stderr
    again = run_cli(run_copy, "predict", *SAMPLE, *TINY)
    assert f"predict: {run.id} reruns: damaged" in again.stdout
    assert len(run.oof.read_text().splitlines()) == 1498  # the header and every sample row
    run_cli(run_copy, "blend", *SAMPLE, *TINY)


@pytest.mark.slow
def test_a_run_json_missing_a_field_is_rebuilt_by_predict(run_copy: Path) -> None:
    run = the_run(run_copy)
    record = json.loads(run.record.read_text())
    del record["fold_min"]
    run.record.write_text(json.dumps(record))
    again = run_cli(run_copy, "submit", *SAMPLE, *TINY)
    damaged = f"damaged ({run.id}/run.json: missing or not valid: fold_min)"
    assert f"predict: {run.id} reruns: {damaged}" in again.stdout
    assert "fold_min" in json.loads(run.record.read_text())


@pytest.mark.slow
def test_new_data_is_never_predicted_with_the_old(two_run_project: Path, tmp_path: Path) -> None:
    """Issue case 1: new CSVs from another folder; the stages use them, not the old cache."""
    paths = Paths(two_run_project)
    folder = tmp_path / "new"
    folder.mkdir()
    train = paths.train_csv.read_text().splitlines()
    test = paths.test_csv.read_text().splitlines()
    (folder / "train.csv").write_text("\n".join(train[:301]) + "\n")
    (folder / "test.csv").write_text("\n".join(test[:101]) + "\n")
    run_cli(two_run_project, "download", "--source", "dir", "--dir", str(folder), "--force")
    result = run_cli(two_run_project, "predict", *TINY, "--force")
    assert "prepare: reruns: train.csv changed" in result.stdout or \
        "prepare: reruns: test.csv, train.csv changed" in result.stdout
    submission = pd.read_csv(paths.submission_csv)
    assert len(submission) == 100
    record = json.loads((paths.runs / str(latest(paths)) / "run.json").read_text())
    assert record["source"] == "dir"


def test_ensemble_averages_fold_probabilities() -> None:
    a = np.array([[0.6, 0.4], [0.1, 0.9]])
    b = np.array([[0.2, 0.8], [0.3, 0.7]])
    np.testing.assert_allclose(average_probabilities([a, b]), [[0.4, 0.6], [0.2, 0.8]])
    with pytest.raises(PipelineError):
        average_probabilities([])
