"""The predict stage: a run's fold models -> test probabilities -> averaged ensemble -> submission.

Also gathers the run's out-of-fold predictions (oof.csv) and the per-fold table (cv.csv): the honest
estimate of the ensemble's accuracy (with TTA, also the held-out accuracy with the same augmented
passes). The run's submission becomes submissions/submission.csv, with a kept copy named by time,
model and CV score.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipeline.config import Paths, Settings
from pipeline.engine import checkpoint
from pipeline.engine.runtime import describe, predict_log_proba, resolve_device
from pipeline.errors import PipelineError
from pipeline.store import ensemble
from pipeline.store.artifacts import (
    PROB_COLUMNS,
    SAMPLE_BANNER,
    Prepared,
    RunDir,
    data_source,
    needs_rerun,
    read_probabilities,
    write_probabilities,
)
from pipeline.store.ensemble import RunRecord
from pipeline.store.ledger import publish as make_current


def average_probabilities(per_fold: list[np.ndarray]) -> np.ndarray:
    """The ensemble: the mean of the folds' class probabilities."""
    if not per_fold:
        raise PipelineError("predict: no fold predictions to average")
    return np.mean(np.stack(per_fold), axis=0)


def run(cfg: Settings, paths: Paths, run: RunDir, data: Prepared, fold_of: np.ndarray,
        folds: list[dict[str, Any]], force: bool = False, publish: bool = True) -> RunRecord:
    """Predict with the run's finished folds unless current; publish its submission (unless not
    asked to: a tuning trial); returns the run's record. folds: the fold records train returned."""
    inputs = {"folds": [f["trained_at"] for f in folds], "tta": cfg.tta, "amp": cfg.amp,
              "data": data.data_key, "tta_seed": cfg.seed if cfg.tta else None}

    why = needs_rerun(f"predict: {run.id}", run.record, inputs, [run.oof, run.test, run.cv,
                      run.submission], force=force,
                      check=lambda: ensemble.check(run, len(data.train_y), len(data.test_x)),
                      current=f"its folds and TTA={cfg.tta} are unchanged")
    record = ensemble.finish(run, inputs, _predict(cfg, paths, run, data, fold_of, folds)) if why \
        else ensemble.read(run)
    if not publish:
        return record
    record = make_current(paths, run, record, len(data.test_x), new=bool(why))
    tta = f", with TTA={cfg.tta} {record.oof_acc_tta:.4f}" if record.oof_acc_tta is not None else ""
    print(f"predict: {run.id}: OOF accuracy {record.oof_acc:.4f}{tta}; wrote {paths.submission_csv} "
          f"(kept as submissions/{record.kept})")
    if record.source == "sample":
        print(SAMPLE_BANNER)
    return record


def _predict(cfg: Settings, paths: Paths, run: RunDir, data: Prepared, fold_of: np.ndarray,
             folds: list[dict[str, Any]]) -> RunRecord:
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    test_images = torch.from_numpy(data.test_x).to(device)
    per_fold, tta_correct = [], 0
    for k in range(len(folds)):
        model, trained = checkpoint.model_from(run.model(k))
        run_cfg = replace(trained, eval_batch=cfg.eval_batch, amp=cfg.amp)
        model.to(device)
        per_fold.append(predict_log_proba(model, test_images, run_cfg, tta=cfg.tta,
                                          seed=cfg.seed).exp().cpu().numpy())
        if cfg.tta:
            # The same passes on the fold's held-out rows: what TTA is worth, measured honestly.
            rows = np.flatnonzero(fold_of == k)
            held_out = torch.from_numpy(data.train_x[rows]).to(device)
            guess = predict_log_proba(model, held_out, run_cfg, tta=cfg.tta, seed=cfg.seed).argmax(1)
            tta_correct += int((guess.cpu().numpy() == data.train_y[rows]).sum())
    test = average_probabilities(per_fold)
    labels = data.train_y.astype(np.int64)
    oof = gather_oof(run, len(folds), labels)
    for k, probs in enumerate(per_fold):
        write_probabilities(run.test_fold(k), probs, {"ImageId": np.arange(1, len(probs) + 1)})
    cv = ensemble.write(run, oof, test, labels, fold_of, fold_facts=folds)
    seconds = time.perf_counter() - started
    print(summary_table(cv, folds))
    print(f"predict: {len(folds)} folds on {describe(device)}, {len(test)} test images in "
          f"{seconds:.1f}s")
    train_seconds = sum(f["seconds"] for f in folds)
    return RunRecord(
        kind="run", model=trained.model, **ensemble.scores(cv), seconds=train_seconds + seconds,
        finished=time.time(), data=data.data_key, test_data=data.test_key, folds=cfg.folds,
        fold_seed=cfg.fold_seed, source=data_source(paths), device=folds[0]["device"],
        config={**cfg.learned(), "tta": cfg.tta}, seed=cfg.seed, tta=cfg.tta,
        oof_acc_tta=tta_correct / len(labels) if cfg.tta else None, train_seconds=train_seconds)


def gather_oof(run: RunDir, n_folds: int, train_y: np.ndarray) -> np.ndarray:
    """Every train row's probabilities from the one fold model that never saw it."""
    oof = np.full((len(train_y), len(PROB_COLUMNS)), np.nan)
    for k in range(n_folds):
        rows, probs = read_probabilities(run.oof_fold(k), "row")
        oof[rows.astype(np.int64)] = probs
    if np.isnan(oof).any():
        missing = int(np.isnan(oof[:, 0]).sum())
        raise PipelineError(f"{run.path}: out-of-fold predictions miss {missing} of {len(train_y)} "
                            f"train rows; `make train RUN={run.id} FORCE=1` remakes them")
    return oof


def summary_table(cv: Any, folds: list[dict[str, Any]]) -> str:
    """The run at a glance: per fold and overall accuracy, loss, time and device."""
    devices = [f["device"] for f in folds]
    table = cv.assign(device=[*devices, ", ".join(sorted(set(devices)))])
    table["valid_loss"] = table["valid_loss"].map("{:.4f}".format)
    table["valid_acc"] = table["valid_acc"].map("{:.4f}".format)
    return table.to_string(index=False)
