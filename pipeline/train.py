"""The train stage: one model per fold, with a CSV log, a best checkpoint and out-of-fold predictions.

Per epoch, in order: shuffle, step through the batches (augmenting on the device), evaluate on the
fold's held-out rows, keep the best checkpoint, save the resumable state, rewrite the log. A killed
run loses at most the epoch in progress; the rerun resumes with the same optimizer, schedule and
random state, so it ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline import folds, prepare
from pipeline.augment import random_affine
from pipeline.config import MODEL_FIELDS, Paths, TrainConfig, fingerprint
from pipeline.errors import PipelineError
from pipeline.io import read_json, write_csv, write_json
from pipeline.models import build_model
from pipeline.runtime import (
    describe,
    load_checkpoint,
    predict_log_proba,
    resolve_device,
    save_checkpoint,
)
from pipeline.step import TrainStep, graph_wanted

LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "seconds",
               "samples_per_s"]


def fold_key(cfg: TrainConfig, folds_key: str, fold: int) -> str:
    """What a fold's model depends on: the learning settings, the folds and the seed."""
    return fingerprint({"model": cfg.key(*MODEL_FIELDS), "folds": folds_key, "fold": fold,
                        "seed": cfg.seed})


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # On CUDA the fused kernels update every parameter in one launch.
    fused = next(model.parameters()).device.type == "cuda" or None
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=0.25)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def steps_per_epoch(cfg: TrainConfig, n_rows: int) -> int:
    steps = n_rows // cfg.batch if cfg.drop_last else math.ceil(n_rows / cfg.batch)
    if steps == 0:
        raise PipelineError(f"train: batch {cfg.batch} is larger than the {n_rows} training rows "
                            "of a fold and drop_last is on; use a smaller batch")
    return steps


def epoch_batches(images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, cfg: TrainConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The epoch's shuffled (and augmented) training images as float, with their labels.

    Gathering and augmenting the whole epoch in a few large calls, instead of a dozen small ones
    per batch, takes the data work off the per-step path: a batch is then a slice (a view).
    """
    order = rows[torch.randperm(len(rows), generator=generator, device=rows.device)]
    x = images[order].float()
    if cfg.augment:
        # On a CPU, chunks small enough to stay in cache; on a GPU, one call for the whole epoch.
        chunk = 2048 if x.device.type == "cpu" else len(x)
        x = torch.cat([random_affine(x[i:i + chunk], generator, cfg.rotate, cfg.scale, cfg.shift)
                       for i in range(0, len(x), chunk)])
    return x, labels[order]


def train_epoch(step: TrainStep, images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
                cfg: TrainConfig, generator: torch.Generator) -> tuple[float, float]:
    """One pass over the fold's training rows; returns mean loss and accuracy."""
    step.model.train()
    step.reset()
    x_epoch, y_epoch = epoch_batches(images, labels, rows, cfg, generator)
    for start in range(0, steps_per_epoch(cfg, len(rows)) * cfg.batch, cfg.batch):
        step(x_epoch[start:start + cfg.batch], y_epoch[start:start + cfg.batch])
    return step.means()


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             cfg: TrainConfig) -> tuple[float, float, torch.Tensor]:
    """Log loss and accuracy on held-out rows, with their class log-probabilities."""
    log_probs = predict_log_proba(model, images, cfg)
    loss = F.nll_loss(log_probs, labels).item()
    acc = (log_probs.argmax(1) == labels).float().mean().item()
    return loss, acc, log_probs


class Progress:
    """A bar per fold on a terminal; one plain line per epoch otherwise (CI, files)."""

    def __init__(self, fold: int, epochs: int, start: int, position: int | None = None) -> None:
        self.fold, self.epochs = fold, epochs
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, initial=start, desc=f"fold {fold}", unit="epoch",
                            leave=True, dynamic_ncols=True, position=position)

    def update(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", valid_acc=f"{row['valid_acc']:.4f}")
            self.bar.update(1)
        else:
            print(f"fold {self.fold} epoch {row['epoch']:>3}/{self.epochs}  "
                  f"train_loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.4f}  "
                  f"valid_loss {row['valid_loss']:.4f}  valid_acc {row['valid_acc']:.4f}  "
                  f"{row['seconds']:.1f}s  {row['samples_per_s']:.0f} samples/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_fold(cfg: TrainConfig, paths: Paths, fold: int, data: prepare.Prepared,
               fold_of: np.ndarray, folds_key: str, device: torch.device,
               bar_position: int | None = None, force: bool = False) -> dict[str, Any]:
    """Train (or resume, or skip) one fold; returns its summary (bar_position: for parallel bars).

    force: train from scratch even when a finished or interrupted run of these settings exists.
    """
    key = fold_key(cfg, folds_key, fold)
    model_path, state_path = paths.fold_model(fold), paths.fold_state(fold)
    torch.manual_seed(cfg.seed * 1000 + fold)
    model = build_model(cfg).to(device)
    train_rows = torch.from_numpy(np.flatnonzero(fold_of != fold)).to(device)
    valid_rows = torch.from_numpy(np.flatnonzero(fold_of == fold)).to(device)
    # The whole data set lives on the device as uint8; batches are indexed there.
    images = torch.from_numpy(data.train_x).to(device)
    labels = torch.from_numpy(data.train_y.astype(np.int64)).to(device)
    valid_x, valid_y = images[valid_rows], labels[valid_rows]

    if model_path.is_file() and not force:
        done = load_checkpoint(model_path)
        if done.get("complete") and done.get("key") == key:
            if not paths.oof_preds(fold).is_file():  # lost predictions: remake them, don't retrain
                model.load_state_dict(done["state_dict"])
                _write_oof(paths, fold, model, cfg, valid_x, valid_y, valid_rows)
            print(f"fold {fold}: up to date (best epoch {done['epoch']}, "
                  f"valid_acc {done['valid_acc']:.4f})")
            return summary(done)

    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch(cfg, len(train_rows)))
    step = TrainStep(model, optimizer, scheduler, cfg, device,
                     log=lambda message: print(f"fold {fold}: {message}"))
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + fold)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    elapsed = 0.0

    state = None if force else _load_state(state_path, key, device)
    if state:
        history, best, elapsed = _resume(state, step, generator)
        print(f"fold {fold}: resuming after epoch {len(history)} of {cfg.epochs}")

    progress = Progress(fold, cfg.epochs, len(history), bar_position)
    try:
        for epoch in range(len(history) + 1, cfg.epochs + 1):
            started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            train_loss, train_acc = train_epoch(step, images, labels, train_rows, cfg, generator)
            train_seconds = time.perf_counter() - started
            valid_loss, valid_acc, _ = evaluate(model, valid_x, valid_y, cfg)
            if not (math.isfinite(train_loss) and math.isfinite(valid_loss)):
                raise PipelineError(
                    f"fold {fold}, epoch {epoch}: the loss became {train_loss} (train) / "
                    f"{valid_loss} (valid). Try a lower learning rate (LR=), gradient clipping "
                    "(ARGS='--clip 1'), or a smaller hidden size; nothing of this epoch was saved"
                )
            seconds = time.perf_counter() - started
            elapsed += seconds
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                   "valid_loss": valid_loss, "valid_acc": valid_acc, "lr": lr,
                   "seconds": round(seconds, 3),
                   "samples_per_s": round(len(train_rows) / max(train_seconds, 1e-9), 1)}
            if not best or (valid_acc, -valid_loss) > (best["valid_acc"], -best["valid_loss"]):
                best = {"epoch": epoch, "valid_acc": valid_acc, "valid_loss": valid_loss}
                save_checkpoint(model_path, _checkpoint(cfg, model, key, folds_key, fold, best,
                                                        elapsed, device, complete=False))
            history.append(row)
            save_checkpoint(state_path, _state(key, step, generator, history, best, elapsed))
            write_csv(paths.fold_log(fold), pd.DataFrame(history, columns=LOG_COLUMNS))
            progress.update(row)
    finally:
        progress.close()

    # Out-of-fold predictions come from the best epoch's weights, not the last epoch's.
    final = load_checkpoint(model_path)
    model.load_state_dict(final["state_dict"])
    _write_oof(paths, fold, model, cfg, valid_x, valid_y, valid_rows)
    final.update(complete=True, seconds=elapsed)
    save_checkpoint(model_path, final)
    state_path.unlink(missing_ok=True)
    print(f"fold {fold}: best epoch {best['epoch']}, valid_acc {best['valid_acc']:.4f}, "
          f"valid_loss {best['valid_loss']:.4f}, {elapsed:.1f}s")
    return summary(final)


def _state(key: str, step: TrainStep, generator: torch.Generator, history: list[dict[str, Any]],
           best: dict[str, Any], elapsed: float) -> dict[str, Any]:
    """Everything an interrupted fold needs to carry on exactly where it stopped."""
    device = step.device
    return {
        "key": key, "model": step.model.state_dict(), "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(), "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(), "history": history, "best": best,
        "elapsed": elapsed, "device_type": device.type,
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _resume(state: dict[str, Any], step: TrainStep,
            generator: torch.Generator) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """Load a saved state into the model, optimizer, schedule and random generators."""
    step.model.load_state_dict(state["model"])
    step.optimizer.load_state_dict(state["optimizer"])
    step.scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if step.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], step.device)
    return state["history"], state["best"], state["elapsed"]


def _checkpoint(cfg: TrainConfig, model: torch.nn.Module, key: str, folds_key: str, fold: int,
                best: dict[str, Any], elapsed: float, device: torch.device,
                complete: bool) -> dict[str, Any]:
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": asdict(cfg), "key": key, "folds_key": folds_key, "fold": fold,
        "epoch": best["epoch"], "valid_acc": best["valid_acc"], "valid_loss": best["valid_loss"],
        "seconds": elapsed, "device": str(device), "complete": complete,
    }


def _write_oof(paths: Paths, fold: int, model: torch.nn.Module, cfg: TrainConfig,
               valid_x: torch.Tensor, valid_y: torch.Tensor, valid_rows: torch.Tensor) -> None:
    _, _, log_probs = evaluate(model, valid_x, valid_y, cfg)
    write_probabilities(paths.oof_preds(fold), log_probs.exp().cpu().numpy(),
                        {"row": valid_rows.cpu().numpy(), "label": valid_y.cpu().numpy()})


def _load_state(path: Path, key: str, device: torch.device) -> dict[str, Any] | None:
    """The resumable state of this very training run, or None (a stale one is discarded)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        print(f"{path}: unreadable training state; starting the fold again")
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        return None
    if state.get("device_type", "cpu") != device.type:
        # Random-number states of one device type do not fit another.
        print(f"{path}: saved on {state.get('device_type')}, now on {device.type}; "
              "starting the fold again")
        return None
    return state


def summary(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {"fold": checkpoint["fold"], "best_epoch": checkpoint["epoch"],
            "valid_loss": checkpoint["valid_loss"], "valid_acc": checkpoint["valid_acc"],
            "seconds": round(checkpoint["seconds"], 2), "device": checkpoint["device"]}


def write_probabilities(path: Path, probs: np.ndarray, front: dict[str, np.ndarray]) -> None:
    frame = pd.DataFrame(front)
    for c in range(probs.shape[1]):
        frame[f"p{c}"] = probs[:, c]
    write_csv(path, frame, float_format="%.6g")


def run(cfg: TrainConfig, paths: Paths, fold: int | None = None,
        force: bool = False) -> list[dict[str, Any]]:
    """Train every fold, or only the one given (force: even if up to date); returns summaries."""
    data = prepare.load(paths)
    fold_of, folds_key, n_folds = folds.load(paths, data.data_key, cfg)
    if fold is not None and not 0 <= fold < n_folds:
        raise PipelineError(f"train: fold {fold} does not exist; folds are numbered 0 to "
                            f"{n_folds - 1}")
    todo = [fold] if fold is not None else list(range(n_folds))
    if read_json(paths.logs / "config.json") != asdict(cfg):
        write_json(paths.logs / "config.json", asdict(cfg))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    # A small RNN leaves most of a GPU idle: by default every fold trains on it at once.
    jobs = cfg.jobs or (len(todo) if device.type == "cuda" else 1)
    if cfg.cuda_graph and device.type == "cuda" and not graph_wanted(cfg, device):
        print("train: no CUDA graph for a model with dropout: its step is random, so a replay "
              "cannot be checked against the normal step (set dropout 0 to use one)")
    graphs = ", steps replayed from CUDA graphs" if graph_wanted(cfg, device) else ""
    if jobs > 1 and len(todo) > 1:
        return _run_parallel(cfg, paths, todo, device, jobs, force, graphs)
    print(f"train: {cfg.model}, hidden {cfg.hidden}, {cfg.epochs} epochs, folds {todo} on "
          f"{describe(device)}{graphs}")
    return [train_fold(cfg, paths, k, data, fold_of, folds_key, device, force=force) for k in todo]


def _run_parallel(cfg: TrainConfig, paths: Paths, todo: list[int], device: torch.device,
                  jobs: int, force: bool, graphs: str) -> list[dict[str, Any]]:
    """Several folds at once, one process each: CPU cores split between them, GPUs shared."""
    jobs = min(jobs, len(todo))
    gpus = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 0
    threads = max(1, torch.get_num_threads() // jobs)
    print(f"train: {jobs} folds at a time on {describe(device)}"
          + (f", spread over {gpus} GPUs" if gpus > 1 else "") + graphs)
    tasks = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for i, k in enumerate(todo):
            worker_device = f"cuda:{i % gpus}" if gpus > 1 else str(device)
            tasks.append(pool.submit(_fold_worker, asdict(cfg), str(paths.root), k, worker_device,
                                     threads, i, force))
        return [task.result() for task in tasks]


def _fold_worker(cfg_fields: dict[str, Any], root: str, fold: int, device: str,
                 threads: int, position: int, force: bool) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True
    cfg = TrainConfig(**cfg_fields)
    paths = Paths(Path(root))
    data = prepare.load(paths)
    fold_of, folds_key, _ = folds.load(paths, data.data_key)
    return train_fold(cfg, paths, fold, data, fold_of, folds_key, torch.device(device), position,
                      force)
