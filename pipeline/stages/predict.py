"""The predict stage: a run's fold models -> averaged test probabilities -> submission (a kept copy
named by time, model and CV score), with the out-of-fold predictions (oof.csv) and cv.csv.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from pipeline.engine import checkpoint
from pipeline.engine.runtime import describe, predict_log_proba, resolve_device
from pipeline.errors import PipelineError
from pipeline.store import ledger
from pipeline.store.data import SAMPLE_BANNER, data_source
from pipeline.store.run import (
    PROB_COLUMNS,
    FoldRecord,
    Plan,
    RunDir,
    RunRecord,
    read_probabilities,
    scores,
    write_probabilities,
)


def average_probabilities(per_fold: list[np.ndarray]) -> np.ndarray:
    if not per_fold:
        raise PipelineError("predict: no fold predictions to average")
    return np.mean(np.stack(per_fold), axis=0)


def run(plan: Plan, fold_records: list[FoldRecord], force: bool = False,
        publish: bool = True) -> RunRecord:
    """Predict with the run's finished folds unless current; publish (unless a tuning trial)."""
    cfg, paths, run, data = plan.cfg, plan.paths, plan.run, plan.data
    made = run.ensemble({"folds": [f.trained_at for f in fold_records], "tta": cfg.tta, "amp": cfg.amp,
                         "data": data.data_key, "tta_seed": cfg.seed if cfg.tta else None},
                        len(data.train_y), len(data.test_x))
    why = made.rerun(f"predict: {run.id}", f"its folds and TTA={cfg.tta} are unchanged", force)
    record = run.finish(made, _predict(plan, fold_records)) if why else run.read()
    if not publish:
        return record
    record = ledger.publish(paths, run, record, len(data.test_x), new=bool(why))
    tta = f", with TTA={cfg.tta} {record.oof_acc_tta:.4f}" if record.oof_acc_tta is not None else ""
    print(f"predict: {run.id}: OOF accuracy {record.oof_acc:.4f}{tta}; wrote {paths.submission_csv} "
          f"(kept as submissions/{record.kept})")
    if record.source == "sample":
        print(SAMPLE_BANNER)
    return record


def _predict(plan: Plan, fold_records: list[FoldRecord]) -> RunRecord:
    cfg, run, data = plan.cfg, plan.run, plan.data
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    test_images = torch.from_numpy(data.test_x).to(device)
    per_fold, tta_correct = [], 0
    for k in range(len(fold_records)):
        model, trained = checkpoint.model_from(run.model(k))
        run_cfg = replace(trained, eval_batch=cfg.eval_batch, amp=cfg.amp)
        model.to(device)
        per_fold.append(predict_log_proba(model, test_images, run_cfg, tta=cfg.tta,
                                          seed=cfg.seed).exp().cpu().numpy())
        if cfg.tta:
            # The same passes on the fold's held-out rows: what TTA is worth, measured honestly.
            rows = np.flatnonzero(plan.fold_of == k)
            held_out = torch.from_numpy(data.train_x[rows]).to(device)
            guess = predict_log_proba(model, held_out, run_cfg, tta=cfg.tta, seed=cfg.seed).argmax(1)
            tta_correct += int((guess.cpu().numpy() == data.train_y[rows]).sum())
    test = average_probabilities(per_fold)
    labels = data.train_y.astype(np.int64)
    oof = gather_oof(run, len(fold_records), labels)
    for k, probs in enumerate(per_fold):
        write_probabilities(run.test_fold(k), probs, {"ImageId": np.arange(1, len(probs) + 1)})
    cv = run.write(oof, test, labels, plan.fold_of, fold_records)
    seconds = time.perf_counter() - started
    print(summary_table(cv, fold_records))
    print(f"predict: {len(fold_records)} folds on {describe(device)}, {len(test)} test images in "
          f"{seconds:.1f}s")
    train_seconds = sum(f.seconds for f in fold_records)
    return RunRecord(
        kind="run", model=trained.model, **scores(cv), seconds=train_seconds + seconds,
        finished=time.time(), data=data.data_key, test_data=data.test_key, n_folds=cfg.folds,
        fold_seed=cfg.fold_seed, source=data_source(plan.paths), device=fold_records[0].device,
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


def summary_table(cv: pd.DataFrame, fold_records: list[FoldRecord]) -> str:
    """The run at a glance: per fold and overall accuracy, loss, time and device."""
    devices = [f.device for f in fold_records]
    table = cv.assign(device=[*devices, ", ".join(sorted(set(devices)))])
    four = "{:.4f}".format
    return table.to_string(index=False, formatters={"valid_loss": four, "valid_acc": four})
