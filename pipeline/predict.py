"""The predict stage: fold models -> test probabilities -> averaged ensemble -> validated submission.

Also gathers the out-of-fold predictions into logs/cv.csv, the honest estimate of the ensemble's
accuracy (with TTA, also the held-out accuracy with the same augmented passes), and keeps a copy of
every submission named by time, model and CV score.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import folds, prepare, runs
from pipeline.config import MODEL_FIELDS, Paths, TrainConfig, fingerprint
from pipeline.download import SAMPLE_BANNER, data_source
from pipeline.errors import PipelineError
from pipeline.io import read_json, write_csv, write_json
from pipeline.runtime import (
    config_of,
    describe,
    load_checkpoint,
    model_from_checkpoint,
    predict_log_proba,
    resolve_device,
)
from pipeline.submission import validate_frame
from pipeline.train import fold_key, write_probabilities


def average_probabilities(per_fold: list[np.ndarray]) -> np.ndarray:
    """The ensemble: the mean of the folds' class probabilities."""
    if not per_fold:
        raise PipelineError("predict: no fold predictions to average")
    return np.mean(np.stack(per_fold), axis=0)


def finished_checkpoints(paths: Paths, n_folds: int, folds_key: str) -> list[dict[str, Any]]:
    """Every fold's finished checkpoint, trained on the current folds with one config."""
    found = []
    for k in range(n_folds):
        path = paths.fold_model(k)
        if not path.is_file():
            raise PipelineError(f"{path}: fold {k} has no model; run `make train FOLD={k}`")
        ckpt = load_checkpoint(path)
        if not ckpt.get("complete"):
            raise PipelineError(f"{path}: fold {k} has not finished training; rerun `make train` "
                                "(it resumes)")
        if ckpt.get("folds_key") != folds_key:
            raise PipelineError(f"{path}: fold {k} was trained on other folds than "
                                f"{paths.folds_csv}; run `make train`")
        if ckpt.get("key") != fold_key(config_of(path, ckpt), folds_key, k):
            raise PipelineError(f"{path}: its record does not match its settings; "
                                f"retrain it with `make train FOLD={k}`")
        found.append(ckpt)
    settings = {config_of(paths.fold_model(k), c).key(*MODEL_FIELDS) for k, c in enumerate(found)}
    if len(settings) > 1:
        raise PipelineError("predict: the fold models were trained with different settings; "
                            "run `make train` with the settings you want for every fold")
    return found


def run(cfg: TrainConfig, paths: Paths, force: bool = False) -> Path:
    """Write per-fold test probabilities, logs/cv.csv and the submission; returns its path."""
    data = prepare.load(paths)
    fold_of, folds_key, n_folds = folds.load(paths, data.data_key)
    checkpoints = finished_checkpoints(paths, n_folds, folds_key)
    # The checkpoints' bytes, not only their settings: a retrained or replaced model is noticed.
    weights = [hashlib.sha1(paths.fold_model(k).read_bytes()).hexdigest() for k in range(n_folds)]
    key = fingerprint({"models": weights, "data": data.data_key, "amp": cfg.amp,
                       "tta": cfg.tta, "tta_seed": cfg.seed if cfg.tta else None})
    record = read_json(paths.preds / "ensemble.json") or {}
    if not force and record.get("key") == key and paths.submission_csv.is_file():
        tta_acc = record.get("oof_acc_tta")
        print(f"predict: up to date ({paths.submission_csv}, OOF accuracy "
              f"{record.get('oof_acc', float('nan')):.4f}"
              + (f", with TTA={cfg.tta} {tta_acc:.4f}" if tta_acc is not None else "") + ")")
        return paths.submission_csv

    device = resolve_device(cfg.device)
    started = time.perf_counter()
    # Everything is computed before anything is written: a bad fold leaves no partial output.
    models = [model_from_checkpoint(paths.fold_model(k), c) for k, c in enumerate(checkpoints)]
    cv, oof_acc = cv_table(paths, checkpoints, data.train_y)
    test_images = torch.from_numpy(data.test_x).to(device)
    per_fold, tta_correct = [], 0
    for k, (model, trained) in enumerate(models):
        run_cfg = replace(trained, eval_batch=cfg.eval_batch, amp=cfg.amp)
        log_probs = predict_log_proba(model.to(device), test_images, run_cfg, tta=cfg.tta, seed=cfg.seed)
        per_fold.append(log_probs.exp().cpu().numpy())
        if cfg.tta:
            # The same passes on the fold's held-out rows: what TTA is worth, measured honestly.
            rows = np.flatnonzero(fold_of == k)
            held_out = torch.from_numpy(data.train_x[rows]).to(device)
            guess = predict_log_proba(model, held_out, run_cfg, tta=cfg.tta, seed=cfg.seed).argmax(1)
            tta_correct += int((guess.cpu().numpy() == data.train_y[rows]).sum())
    oof_acc_tta = tta_correct / len(data.train_y) if cfg.tta else None
    ensemble = average_probabilities(per_fold)
    frame = pd.DataFrame({"ImageId": np.arange(1, len(ensemble) + 1),
                          "Label": ensemble.argmax(1).astype(np.int64)})
    validate_frame(frame, expected_rows=len(data.test_x), where="predict")

    for k, probs in enumerate(per_fold):
        write_probabilities(paths.test_preds(k), probs, {"ImageId": frame["ImageId"].to_numpy()})
    write_csv(paths.logs / "cv.csv", cv)
    write_csv(paths.submission_csv, frame)
    model_name = checkpoints[0]["config"]["model"]
    kept = _keep_copy(paths, frame, model_name, oof_acc)
    source = data_source(paths)
    trained = {**checkpoints[0]["config"], "tta": cfg.tta}  # what the ensemble really is
    write_json(paths.preds / "ensemble.json", {"key": key, "oof_acc": oof_acc, "kept": kept.name,
                                               "oof_acc_tta": oof_acc_tta, "source": source,
                                               "tta": cfg.tta, "config": trained})
    seconds = time.perf_counter() - started
    runs.record(paths, {
        "model": model_name,
        "config": trained,
        "oof_acc": oof_acc,
        "oof_acc_tta": oof_acc_tta,
        "seconds": sum(c["seconds"] for c in checkpoints) + seconds,  # training + prediction
        "device": describe(device),
        "submission": kept.name,
        "source": source,
    })
    print(summary_table(cv, checkpoints))
    print(f"predict: {n_folds} folds on {describe(device)}, {len(ensemble)} test images in "
          f"{seconds:.1f}s; OOF accuracy {oof_acc:.4f}"
          + (f", with TTA={cfg.tta} {oof_acc_tta:.4f}" if cfg.tta else ""))
    print(f"predict: wrote {paths.submission_csv} (kept as {kept.relative_to(paths.root)})")
    if source == "sample":
        print(SAMPLE_BANNER)
    return paths.submission_csv


def cv_table(paths: Paths, checkpoints: list[dict[str, Any]],
             train_y: np.ndarray) -> tuple[pd.DataFrame, float]:
    """Per-fold best epoch, loss, accuracy and time, and the overall out-of-fold accuracy."""
    rows, correct, total, nll = [], 0, 0, 0.0
    for k, ckpt in enumerate(checkpoints):
        oof = pd.read_csv(paths.oof_preds(k))
        probs = oof[[f"p{c}" for c in range(10)]].to_numpy()
        labels = train_y[oof["row"].to_numpy()].astype(np.int64)
        correct += int((probs.argmax(1) == labels).sum())
        nll -= float(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).sum())
        total += len(labels)
        rows.append({"fold": str(k), "best_epoch": ckpt["epoch"], "valid_loss": ckpt["valid_loss"],
                     "valid_acc": ckpt["valid_acc"], "seconds": round(ckpt["seconds"], 2),
                     "rows": len(labels)})
    if total != len(train_y):
        raise PipelineError(f"{paths.preds}: out-of-fold predictions cover {total} of "
                            f"{len(train_y)} train rows; rerun `make train`")
    oof_acc = correct / total
    rows.append({"fold": "all", "best_epoch": "", "valid_loss": nll / total, "valid_acc": oof_acc,
                 "seconds": round(sum(c["seconds"] for c in checkpoints), 2), "rows": total})
    return pd.DataFrame(rows), oof_acc


def summary_table(cv: pd.DataFrame, checkpoints: list[dict[str, Any]]) -> str:
    """The run at a glance: per fold and overall accuracy, loss, time and device."""
    devices = [c["device"] for c in checkpoints]
    table = cv.assign(device=[*devices, ", ".join(sorted(set(devices)))])
    table["valid_loss"] = table["valid_loss"].map("{:.4f}".format)
    table["valid_acc"] = table["valid_acc"].map("{:.4f}".format)
    return table.to_string(index=False)


def _keep_copy(paths: Paths, frame: pd.DataFrame, model: str, oof_acc: float) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{model}-cv{oof_acc:.4f}"
    target = paths.submissions / f"{base}.csv"
    n = 1
    while target.exists():
        n += 1
        target = paths.submissions / f"{base}-{n}.csv"
    write_csv(target, frame)
    return target
