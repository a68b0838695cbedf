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
import pandas as pd
import torch

from pipeline.config import Paths, Settings
from pipeline.engine import checkpoint
from pipeline.engine.runtime import describe, predict_log_proba, resolve_device
from pipeline.errors import PipelineError
from pipeline.store.artifacts import (
    PROB_COLUMNS,
    SAMPLE_BANNER,
    Prepared,
    RunDir,
    check_cv,
    check_probabilities,
    data_source,
    mark_current,
    read_probabilities,
    stale,
    write_probabilities,
)
from pipeline.store.io import read_json, write_csv
from pipeline.store.ledger import publish as make_current
from pipeline.store.submission import validate_file, validate_frame

RECORD_NUMBERS = ("oof_acc", "oof_loss", "fold_min", "fold_max", "seconds", "finished")


def average_probabilities(per_fold: list[np.ndarray]) -> np.ndarray:
    """The ensemble: the mean of the folds' class probabilities."""
    if not per_fold:
        raise PipelineError("predict: no fold predictions to average")
    return np.mean(np.stack(per_fold), axis=0)


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import log_loss as sk_log_loss

    clipped = np.clip(probs, 1e-12, 1)
    return float(sk_log_loss(labels, clipped / clipped.sum(1, keepdims=True), labels=list(range(10))))


def run(cfg: Settings, paths: Paths, run: RunDir, data: Prepared, fold_of: np.ndarray,
        folds: list[dict[str, Any]], force: bool = False, publish: bool = True) -> dict[str, Any]:
    """Predict with the run's finished folds unless current; publish its submission (unless not
    asked to: a tuning trial); returns the run's record. folds: the fold records train returned."""
    inputs = {"folds": [f["trained_at"] for f in folds], "tta": cfg.tta, "amp": cfg.amp,
              "data": data.data_key, "tta_seed": cfg.seed if cfg.tta else None}
    outputs = [run.oof, run.test, run.cv, run.submission]
    def check() -> None:
        made = read_json(run.record)
        missing = [k for k in RECORD_NUMBERS if not isinstance(made.get(k), int | float)]
        if missing:
            raise PipelineError(f"{run.record.name} lacks {', '.join(missing)}")
        validate_file(run.submission, len(data.test_x))
        check_probabilities(run, len(data.train_y), len(data.test_x))
        check_cv(run.cv, cfg.folds)

    why = "FORCE=1" if force else stale(run.record, inputs, outputs, check=check)
    if why:
        print(f"predict: {run.id} reruns: {why}")
        record = mark_current(run.record, inputs, **_predict(cfg, paths, run, data, fold_of, folds))
    else:
        record = read_json(run.record)
        print(f"predict: {run.id} skipped: its folds and TTA={cfg.tta} are unchanged")
    if not publish:
        return record
    kept = make_current(paths, run, record, len(data.test_x), new=bool(why))
    tta = f", with TTA={cfg.tta} {record['oof_acc_tta']:.4f}" if record.get("oof_acc_tta") else ""
    print(f"predict: {run.id}: OOF accuracy {record['oof_acc']:.4f}{tta}; wrote {paths.submission_csv} "
          f"(kept as {kept.relative_to(paths.root)})")
    if record.get("source") == "sample":
        print(SAMPLE_BANNER)
    return record


def _predict(cfg: Settings, paths: Paths, run: RunDir, data: Prepared, fold_of: np.ndarray,
             folds: list[dict[str, Any]]) -> dict[str, Any]:
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
    ensemble = average_probabilities(per_fold)
    frame = pd.DataFrame({"ImageId": np.arange(1, len(ensemble) + 1),
                          "Label": ensemble.argmax(1).astype(np.int64)})
    validate_frame(frame, expected_rows=len(data.test_x), where="predict")
    oof = gather_oof(run, len(folds), data.train_y)
    labels = data.train_y.astype(np.int64)
    oof_acc = float((oof.argmax(1) == labels).mean())
    cv = cv_table(folds, oof, labels, fold_of)

    ids = {"ImageId": frame["ImageId"].to_numpy()}
    for k, probs in enumerate(per_fold):
        write_probabilities(run.test_fold(k), probs, ids)
    write_probabilities(run.oof, oof, {"row": np.arange(len(labels)), "label": labels})
    write_probabilities(run.test, ensemble, ids)
    write_csv(run.cv, cv)
    write_csv(run.submission, frame)
    seconds = time.perf_counter() - started
    print(summary_table(cv, folds))
    print(f"predict: {len(folds)} folds on {describe(device)}, {len(ensemble)} test images in "
          f"{seconds:.1f}s")
    valid = [f["valid_acc"] for f in folds]
    return {"complete": True, "kind": "run", "model": trained.model, "config": {**cfg.learned(),
            "tta": cfg.tta}, "oof_acc": oof_acc, "oof_loss": log_loss(oof, labels),
            "oof_acc_tta": tta_correct / len(labels) if cfg.tta else None, "tta": cfg.tta,
            "fold_min": min(valid), "fold_max": max(valid), "data": data.data_key,
            "folds": cfg.folds, "fold_seed": cfg.fold_seed, "seed": cfg.seed, "device": folds[0]["device"],
            "train_seconds": sum(f["seconds"] for f in folds), "seconds": sum(
                f["seconds"] for f in folds) + seconds, "source": data_source(paths),
            "finished": time.time()}


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


def cv_table(folds: list[dict[str, Any]], oof: np.ndarray, labels: np.ndarray,
             fold_of: np.ndarray) -> pd.DataFrame:
    """Per-fold best epoch, loss, accuracy and time, and the overall out-of-fold row."""
    rows = [{"fold": str(f["fold"]), "best_epoch": f["best_epoch"], "valid_loss": f["valid_loss"],
             "valid_acc": f["valid_acc"], "seconds": round(f["seconds"], 2),
             "rows": int((fold_of == f["fold"]).sum())} for f in folds]
    rows.append({"fold": "all", "best_epoch": "", "valid_loss": log_loss(oof, labels),
                 "valid_acc": float((oof.argmax(1) == labels).mean()),
                 "seconds": round(sum(f["seconds"] for f in folds), 2), "rows": len(labels)})
    return pd.DataFrame(rows)


def summary_table(cv: pd.DataFrame, folds: list[dict[str, Any]]) -> str:
    """The run at a glance: per fold and overall accuracy, loss, time and device."""
    devices = [f["device"] for f in folds]
    table = cv.assign(device=[*devices, ", ".join(sorted(set(devices)))])
    table["valid_loss"] = table["valid_loss"].map("{:.4f}".format)
    table["valid_acc"] = table["valid_acc"].map("{:.4f}".format)
    return table.to_string(index=False)


