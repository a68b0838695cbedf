"""The train stage: one model per fold of a run, with a CSV log, the best epoch's weights and
out-of-fold predictions, all in the run's folder.

Per epoch, in order: shuffle (and augment on the device), step through the batches, evaluate on the
fold's held-out rows, keep the best weights, save the resumable state, rewrite the log. A killed run
loses at most the epoch in progress; the rerun resumes with the same optimizer, schedule and random
state, so it ends exactly where an uninterrupted run would. The finished model is written only when
the fold is finished, so a retrain (FORCE=1) never leaves a half-trained model in its place.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.config import Paths, Settings, fingerprint, resolve
from pipeline.engine import checkpoint
from pipeline.engine.augment import augment
from pipeline.engine.models import build_model
from pipeline.engine.runtime import describe, predict_log_proba, resolve_device
from pipeline.engine.step import TrainStep, graph_wanted
from pipeline.errors import PipelineError
from pipeline.store.artifacts import (
    LOG_COLUMNS,
    Prepared,
    Pseudo,
    RunDir,
    digest,
    load_prepared,
    mark_current,
    needs_rerun,
    read_folds,
    read_probabilities,
    write_probabilities,
)
from pipeline.store.io import read_json, write_csv, write_json


def make_optimizer(cfg: Settings, model: torch.nn.Module) -> torch.optim.Optimizer:
    # On CUDA the fused kernels update every parameter in one launch.
    fused = next(model.parameters()).device.type == "cuda" or None
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def make_scheduler(cfg: Settings, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle" and total >= 4:
        # OneCycleLR divides by the length of its warm-up (pct_start * total - 1 steps): give it at
        # least half a step however short the run.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=max(0.25, 1.5 / total))
    if cfg.schedule in ("onecycle", "cosine"):  # too few steps for a warm-up: anneal only
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def steps_per_epoch(cfg: Settings, n_rows: int) -> int:
    steps = n_rows // cfg.batch if cfg.drop_last else math.ceil(n_rows / cfg.batch)
    if steps == 0:
        raise PipelineError(f"BATCH={cfg.batch} is larger than the {n_rows} training rows of a fold "
                            f"and DROP_LAST is on, so no batch would train; BATCH must be at most "
                            f"{n_rows} here (or turn DROP_LAST off)")
    return steps


def epoch_batches(images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, cfg: Settings,
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
        x = torch.cat([augment(x[i:i + chunk], generator, cfg) for i in range(0, len(x), chunk)])
    return x, labels[order]


def train_epoch(step: TrainStep, images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
                cfg: Settings, generator: torch.Generator) -> tuple[float, float]:
    """One pass over the fold's training rows; returns mean loss and accuracy."""
    step.model.train()
    step.reset()
    x_epoch, y_epoch = epoch_batches(images, labels, rows, cfg, generator)
    for start in range(0, steps_per_epoch(cfg, len(rows)) * cfg.batch, cfg.batch):
        step(x_epoch[start:start + cfg.batch], y_epoch[start:start + cfg.batch])
    return step.means()


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             cfg: Settings) -> tuple[float, float, torch.Tensor]:
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
        # Bars of folds trained at once (position given) would overwrite each other: plain lines.
        if sys.stderr.isatty() and position is None:
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, initial=start, desc=f"fold {fold}", unit="epoch",
                            leave=True, dynamic_ncols=True, position=position)

    def update(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", valid_acc=f"{row['valid_acc']:.4f}")
            self.bar.update(1)
        else:
            # One write per line, so lines of folds trained at once never run into each other.
            sys.stdout.write(f"fold {self.fold} epoch {row['epoch']:>3}/{self.epochs}  "
                             f"train_loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.4f}  "
                             f"valid_loss {row['valid_loss']:.4f}  valid_acc {row['valid_acc']:.4f}  "
                             f"{row['seconds']:.1f}s  {row['samples_per_s']:.0f} samples/s\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fold_inputs(run: RunDir, fold: int, pseudo: Pseudo | None = None) -> dict[str, Any]:
    """What a fold's model is made from: its run (settings and data, by the run id), its fold and,
    when distilled, the teacher's predictions."""
    inputs: dict[str, Any] = {"run": run.id, "fold": fold}
    if pseudo is not None:
        inputs["teacher"] = pseudo.key
    return inputs


def training_set(data: Prepared, fold_of: np.ndarray, fold: int, pseudo: Pseudo | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, training targets, training rows, held-out rows) of a fold, on the device.

    The targets are class indices, or with pseudo rows class probabilities (one-hot for labelled
    rows), and the images then hold the test images after the train images. The held-out rows are
    train rows of the fold only; the training rows never include one of them."""
    images = torch.from_numpy(data.train_x).to(device)
    targets = torch.from_numpy(data.train_y.astype(np.int64)).to(device)
    train_rows = torch.from_numpy(np.flatnonzero(fold_of != fold)).to(device)
    valid_rows = torch.from_numpy(np.flatnonzero(fold_of == fold)).to(device)
    if pseudo is not None and len(pseudo.images):
        n = len(data.train_x)
        images = torch.cat([images, torch.from_numpy(pseudo.images).to(device)])
        targets = torch.cat([F.one_hot(targets, 10).float(),
                             torch.from_numpy(pseudo.targets.astype(np.float32)).to(device)])
        train_rows = torch.cat([train_rows, torch.arange(n, n + len(pseudo.images), device=device)])
    return images, targets, train_rows, valid_rows


def state_key(run: RunDir, fold: int, fold_of: np.ndarray, pseudo: Pseudo | None = None) -> str:
    """The key of a fold's resumable state: its run and fold, and the rows it holds out, so a saved
    state resumes only on the rows it was trained on."""
    return fingerprint({**fold_inputs(run, fold, pseudo), "held out": digest({"rows": fold_of == fold})})


def train_fold(cfg: Settings, run: RunDir, fold: int, data: Prepared, fold_of: np.ndarray,
               device: torch.device, bar_position: int | None = None,
               on_epoch: Callable[[int, int, float], None] | None = None,
               pseudo: Pseudo | None = None) -> dict[str, Any]:
    """Train one fold (resuming its saved state if there is one); returns its record.

    on_epoch(fold, epoch, valid_acc) is called after each epoch is saved (tuning reports there, and
    may stop the fold by raising)."""
    key = state_key(run, fold, fold_of, pseudo)
    torch.manual_seed(cfg.seed * 1000 + fold)
    model = build_model(cfg).to(device)
    # The whole data set lives on the device as uint8; batches are indexed there.
    images, targets, train_rows, valid_rows = training_set(data, fold_of, fold, pseudo, device)
    valid_x = images[valid_rows]
    valid_y = torch.from_numpy(data.train_y.astype(np.int64)).to(device)[valid_rows]
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch(cfg, len(train_rows)))
    step = TrainStep(model, optimizer, scheduler, cfg, device,
                     log=lambda message: print(f"fold {fold}: {message}"))
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + fold)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    best_weights: dict[str, torch.Tensor] = {}
    elapsed = 0.0
    state = checkpoint.load_state(run.state(fold), key, device)
    if state:
        checkpoint.resume(state, step, generator)
        history, best, best_weights, elapsed = (state["history"], state["best"],
                                                state["best_weights"], state["elapsed"])
        print(f"fold {fold}: resuming after epoch {len(history)} of {cfg.epochs}")

    progress = Progress(fold, cfg.epochs, len(history), bar_position)
    try:
        for epoch in range(len(history) + 1, cfg.epochs + 1):
            started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            train_loss, train_acc = train_epoch(step, images, targets, train_rows, cfg, generator)
            train_seconds = time.perf_counter() - started
            valid_loss, valid_acc, _ = evaluate(step.trained, valid_x, valid_y, cfg)
            _check_finite(fold, epoch, train_loss, valid_loss)
            seconds = time.perf_counter() - started
            elapsed += seconds
            history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                            "valid_loss": valid_loss, "valid_acc": valid_acc, "lr": lr,
                            "seconds": round(seconds, 3),
                            "samples_per_s": round(len(train_rows) / max(train_seconds, 1e-9), 1)})
            if not best or (valid_acc, -valid_loss) > (best["valid_acc"], -best["valid_loss"]):
                best = {"epoch": epoch, "valid_acc": valid_acc, "valid_loss": valid_loss}
                best_weights = {k: v.detach().cpu().clone() for k, v in step.trained.state_dict().items()}
            checkpoint.save_state(run.state(fold), key, step, generator, history, best, best_weights,
                                  elapsed)
            if not run.config.is_file():  # with the first state that resumes: RUN=<id> resumes it
                write_json(run.config, asdict(cfg))
            write_csv(run.log(fold), pd.DataFrame(history, columns=LOG_COLUMNS))
            progress.update(history[-1])
            if on_epoch is not None:
                on_epoch(fold, epoch, valid_acc)
    finally:
        progress.close()
    return _finish(cfg, run, fold, model, best, best_weights, elapsed, device, valid_x, valid_y,
                   valid_rows, pseudo)


def _check_finite(fold: int, epoch: int, train_loss: float, valid_loss: float) -> None:
    if not (math.isfinite(train_loss) and math.isfinite(valid_loss)):
        raise PipelineError(
            f"fold {fold}, epoch {epoch}: the loss became {train_loss} (train) / {valid_loss} (valid). "
            "Try a lower learning rate (LR=), gradient clipping (CLIP=1), or a smaller hidden size; "
            "nothing of this epoch was saved")


def _finish(cfg: Settings, run: RunDir, fold: int, model: torch.nn.Module, best: dict[str, Any],
            best_weights: dict[str, torch.Tensor], elapsed: float, device: torch.device,
            valid_x: torch.Tensor, valid_y: torch.Tensor, valid_rows: torch.Tensor,
            pseudo: Pseudo | None) -> dict[str, Any]:
    """The best epoch's weights become the finished model; its out-of-fold predictions go beside it."""
    model.load_state_dict(best_weights)
    _, _, log_probs = evaluate(model, valid_x, valid_y, cfg)
    write_probabilities(run.oof_fold(fold), log_probs.exp().cpu().numpy(),
                        {"row": valid_rows.cpu().numpy(), "label": valid_y.cpu().numpy()})
    checkpoint.save(run.model(fold), checkpoint.finished(model, cfg, best))
    record = {"fold": fold, "best_epoch": best["epoch"], "valid_loss": best["valid_loss"],
              "valid_acc": best["valid_acc"], "seconds": round(elapsed, 2),
              "device": describe(device), "trained_at": time.time()}
    mark_current(run.fold_record(fold), fold_inputs(run, fold, pseudo), **record)
    run.state(fold).unlink(missing_ok=True)
    print(f"fold {fold}: best epoch {best['epoch']}, valid_acc {best['valid_acc']:.4f}, "
          f"valid_loss {best['valid_loss']:.4f}, {elapsed:.1f}s")
    return record


def fold_stale(run: RunDir, fold: int, fold_of: np.ndarray, pseudo: Pseudo | None = None,
               force: bool = False) -> str:
    """Why the fold must be trained (said in one line), '' when its finished model, its out-of-fold
    predictions and record are current and the model held out exactly the rows the folds give this
    fold now (a model trained on other folds is never current)."""

    def check() -> None:
        checkpoint.model_from(run.model(fold))
        rows, _ = read_probabilities(run.oof_fold(fold), "row")
        if not np.array_equal(np.sort(rows.astype(np.int64)), np.flatnonzero(fold_of == fold)):
            raise PipelineError(f"{run.oof_fold(fold).name}: trained on other folds than "
                                f"{len(np.unique(fold_of))} folds of input/folds.csv give")

    return needs_rerun(f"train: fold {fold}", run.fold_record(fold), fold_inputs(run, fold, pseudo),
                       [run.model(fold), run.oof_fold(fold)], check=check, force=force,
                       current="its model is current")


def check_settings(cfg: Settings, fold_of: np.ndarray) -> None:
    """Stop before training, in one sentence, when the settings cannot train on these folds."""
    found = sorted(int(f) for f in np.unique(fold_of))
    if found != list(range(cfg.folds)):
        raise PipelineError(f"FOLDS={cfg.folds}, but the folds given hold {len(found)} "
                            f"({', '.join(map(str, found[:10]))}); `make folds FOLDS={cfg.folds}` "
                            "writes them (a run trains only on the folds of its own settings)")
    smallest = int(len(fold_of) - np.bincount(fold_of).max())
    steps_per_epoch(cfg, smallest)


def run(cfg: Settings, paths: Paths, run_dir: RunDir, data: Prepared, fold_of: np.ndarray,
        folds: list[int] | None = None, force: bool = False,
        on_epoch: Callable[[int, int, float], None] | None = None,
        pseudo: Pseudo | None = None) -> list[dict[str, Any]]:
    """Train every fold of the run, or only those given, skipping the current ones (force: retrain
    even those); returns the folds' records. on_epoch: see train_fold (folds then train in turn).
    pseudo: distillation's extra rows (the run's TEACHER's test predictions)."""
    n_folds = cfg.folds
    for fold in folds or []:
        if not 0 <= fold < n_folds:
            raise PipelineError(f"FOLD={fold}: no fold {fold} in this run; its folds are 0 to "
                                f"{n_folds - 1}")
    folds = list(range(n_folds)) if folds is None else folds
    device = resolve_device(cfg.device)  # before anything is written: a wrong DEVICE changes nothing
    if cfg.teacher and pseudo is None:
        raise PipelineError(f"TEACHER={cfg.teacher}: a distilled run trains on its teacher's test "
                            "predictions; `make distill TEACHER=...` (or `make submit`) gives them")
    check_settings(cfg, fold_of)
    todo = []
    for k in folds:
        if fold_stale(run_dir, k, fold_of, pseudo, force=force):
            todo.append(k)
    if todo and pseudo is not None and pseudo.teacher_gone:
        raise PipelineError(f"TEACHER={cfg.teacher}: no such run or blend any more (forgotten?), and "
                            f"folds {todo} of {run_dir.id} need its test predictions to train, so they "
                            "cannot be trained; distill from another teacher (TEACHER=<id>; `make runs` "
                            "lists them)")
    if todo:
        _train_folds(cfg, paths, run_dir, data, fold_of, todo, device, on_epoch, pseudo)
    if not run_dir.config.is_file():  # written with a fold's first saved epoch, never before
        write_json(run_dir.config, asdict(cfg))
    return [read_fold_record(run_dir, k) for k in folds]


def read_fold_record(run: RunDir, fold: int) -> dict[str, Any]:
    record = read_json(run.fold_record(fold))
    if not isinstance(record, dict):
        raise PipelineError(f"{run.fold_record(fold)}: missing or unreadable")
    return record


def _train_folds(cfg: Settings, paths: Paths, run_dir: RunDir, data: Prepared, fold_of: np.ndarray,
                 todo: list[int], device: torch.device,
                 on_epoch: Callable[[int, int, float], None] | None, pseudo: Pseudo | None) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    if cfg.cuda_graph and device.type == "cuda" and not graph_wanted(cfg, device):
        print("train: no CUDA graph for a model with dropout: its step is random, so a replay "
              "cannot be checked against the normal step (set dropout 0 to use one)")
    graphs = ", steps replayed from CUDA graphs" if graph_wanted(cfg, device) else ""
    # A small RNN leaves most of a GPU idle: by default every fold trains on it at once.
    jobs = min(cfg.jobs or (len(todo) if device.type == "cuda" else 1), len(todo))
    if jobs > 1 and on_epoch is None:
        _run_parallel(cfg, paths, run_dir, todo, device, jobs, graphs, pseudo)
        return
    print(f"train: {run_dir.id}: folds {todo} on {describe(device)}{graphs}")
    for k in todo:
        train_fold(cfg, run_dir, k, data, fold_of, device, on_epoch=on_epoch, pseudo=pseudo)


def _run_parallel(cfg: Settings, paths: Paths, run_dir: RunDir, todo: list[int], device: torch.device,
                  jobs: int, graphs: str, pseudo: Pseudo | None) -> None:
    """Several folds at once, one process each: CPU cores split between them, GPUs shared."""
    gpus = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 0
    threads = max(1, torch.get_num_threads() // jobs)
    where = describe(device, threads) + (" each" if device.type == "cpu" else "")
    print(f"train: {run_dir.id}: {jobs} folds at a time on {where}"
          + (f", spread over {gpus} GPUs" if gpus > 1 else "") + graphs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        tasks = [pool.submit(_fold_worker, asdict(cfg), str(paths.root), run_dir.id, k,
                             f"cuda:{i % gpus}" if gpus > 1 else str(device), threads, i, pseudo)
                 for i, k in enumerate(todo)]
        for task in tasks:
            task.result()


def _fold_worker(cfg_fields: dict[str, Any], root: str, run_id: str, fold: int, device: str,
                 threads: int, position: int, pseudo: Pseudo | None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True
    paths = Paths(Path(root))
    # The settings come from another process: checked as the command line checks them.
    return train_fold(resolve(overrides=cfg_fields), RunDir(paths.runs / run_id), fold, load_prepared(paths),
                      read_folds(paths), torch.device(device), position, pseudo=pseudo)
