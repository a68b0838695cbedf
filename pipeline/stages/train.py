"""The train stage: one model per fold of a run, with a CSV log, the best epoch's weights and
out-of-fold predictions, all in the run's folder.

The fold's state is saved whole after every epoch: a killed run loses at most the epoch in progress,
and its rerun ends exactly where an uninterrupted run would. The finished model is written only when
the fold is finished, so a retrain (FORCE=1) never leaves a half-trained model in its place.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.config import Settings, fingerprint
from pipeline.engine import checkpoint
from pipeline.engine.augment import augment
from pipeline.engine.checkpoint import FoldState
from pipeline.engine.models import build_model
from pipeline.engine.runtime import describe, predict_log_proba, resolve_device
from pipeline.engine.step import TrainStep, graph_wanted
from pipeline.errors import PipelineError
from pipeline.store.data import digest
from pipeline.store.fresh import Output
from pipeline.store.io import write_csv, write_json
from pipeline.store.run import LOG_COLUMNS, FoldRecord, Plan, read_probabilities, write_probabilities

# (fold, epoch, valid accuracy) after each saved epoch; tuning reports there, and may stop the fold.
OnEpoch = Callable[[int, int, float], None]


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


def new_state(cfg: Settings, fold: int, n_rows: int, device: torch.device) -> FoldState:
    """A fold's state before its first epoch: a fresh model, its optimizer and schedule, seeded."""
    torch.manual_seed(cfg.seed * 1000 + fold)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch(cfg, n_rows))
    step = TrainStep(model, optimizer, scheduler, cfg, device,
                     log=lambda message: print(f"fold {fold}: {message}"))
    return FoldState(step, torch.Generator(device=device).manual_seed(cfg.seed * 1000 + fold))


def epoch_batches(images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, cfg: Settings,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The epoch's shuffled (and augmented) images as float, with their labels: the whole epoch in a
    few large calls takes the data work off the per-step path (a batch is then a view)."""
    order = rows[torch.randperm(len(rows), generator=generator, device=rows.device)]
    x = images[order].float()
    if cfg.augment:
        # On a CPU, chunks small enough to stay in cache; on a GPU, one call for the whole epoch.
        chunk = 2048 if x.device.type == "cpu" else len(x)
        x = torch.cat([augment(x[i:i + chunk], generator, cfg) for i in range(0, len(x), chunk)])
    return x, labels[order]


def train_epoch(state: FoldState, images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
                cfg: Settings) -> tuple[float, float]:
    """One pass over the fold's training rows; returns mean loss and accuracy."""
    state.step.model.train()
    x, y = epoch_batches(images, labels, rows, cfg, state.generator)
    seen = min(steps_per_epoch(cfg, len(rows)) * cfg.batch, len(rows))
    # The sums stay on the device: reading them back each step would stall a GPU.
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, seen, cfg.batch):
        loss, right = state.step(x[start:start + cfg.batch], y[start:start + cfg.batch])
        loss_sum += loss
        correct += right
    return loss_sum.item() / seen, correct.item() / seen


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


@dataclass(frozen=True)
class FoldRows:
    """A fold's data on the training device. Distilled: the test images follow the train images, and
    the targets are class probabilities. The training rows never include a held-out row."""

    images: torch.Tensor
    targets: torch.Tensor
    train_rows: torch.Tensor
    valid_rows: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor


def fold_rows(plan: Plan, fold: int, device: torch.device) -> FoldRows:
    data, pseudo = plan.data, plan.pseudo
    # The whole data set lives on the device as uint8; batches are indexed there.
    images = torch.from_numpy(data.train_x).to(device)
    labels = torch.from_numpy(data.train_y.astype(np.int64)).to(device)
    train_rows = torch.from_numpy(np.flatnonzero(plan.fold_of != fold)).to(device)
    valid_rows = torch.from_numpy(np.flatnonzero(plan.fold_of == fold)).to(device)
    targets = labels
    if pseudo is not None and len(pseudo.images):
        n = len(data.train_x)
        images = torch.cat([images, torch.from_numpy(pseudo.images).to(device)])
        targets = torch.cat([F.one_hot(labels, 10).float(),
                             torch.from_numpy(pseudo.targets.astype(np.float32)).to(device)])
        train_rows = torch.cat([train_rows, torch.arange(n, n + len(pseudo.images), device=device)])
    return FoldRows(images, targets, train_rows, valid_rows, images[valid_rows], labels[valid_rows])


def fold_inputs(plan: Plan, fold: int) -> dict[str, Any]:
    """What a fold's model is made from: its run (by id), its fold and any teacher's predictions."""
    teacher = {} if plan.pseudo is None else {"teacher": plan.pseudo.key}
    return {"run": plan.run.id, "fold": fold, **teacher}


def state_key(plan: Plan, fold: int) -> str:
    """A saved state resumes only with the same inputs and the same held-out rows."""
    return fingerprint({**fold_inputs(plan, fold), "held out": digest({"rows": plan.fold_of == fold})})


def train_fold(plan: Plan, fold: int, device: torch.device, on_epoch: OnEpoch | None = None,
               bar: int | None = None) -> FoldRecord:
    """Train one fold, resuming its saved state if there is one; returns its record."""
    cfg, run = plan.cfg, plan.run
    rows = fold_rows(plan, fold, device)
    state, key = new_state(cfg, fold, len(rows.train_rows), device), state_key(plan, fold)
    if state.restore(run.state(fold), key):
        print(f"fold {fold}: resuming after epoch {state.epoch} of {cfg.epochs}")
    progress = Progress(fold, cfg.epochs, state.epoch, bar)
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            started, lr = time.perf_counter(), state.step.scheduler.get_last_lr()[0]
            train_loss, train_acc = train_epoch(state, rows.images, rows.targets, rows.train_rows, cfg)
            train_seconds = time.perf_counter() - started
            valid_loss, valid_acc, _ = evaluate(state.step.trained, rows.valid_x, rows.valid_y, cfg)
            _check_finite(fold, epoch, train_loss, valid_loss)
            seconds = time.perf_counter() - started
            state.end_epoch({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                             "valid_loss": valid_loss, "valid_acc": valid_acc, "lr": lr,
                             "seconds": round(seconds, 3), "samples_per_s": round(
                                 len(rows.train_rows) / max(train_seconds, 1e-9), 1)}, seconds)
            state.save(run.state(fold), key)
            if not run.config.is_file():  # with the first state that resumes: RUN=<id> resumes it
                write_json(run.config, asdict(cfg))
            write_csv(run.log(fold), pd.DataFrame(state.history, columns=LOG_COLUMNS))
            progress.update(state.history[-1])
            if on_epoch is not None:
                on_epoch(fold, epoch, valid_acc)
    finally:
        progress.close()
    return _finish(plan, fold, state, rows)


def _check_finite(fold: int, epoch: int, train_loss: float, valid_loss: float) -> None:
    if not (math.isfinite(train_loss) and math.isfinite(valid_loss)):
        raise PipelineError(
            f"fold {fold}, epoch {epoch}: the loss became {train_loss} (train) / {valid_loss} (valid). "
            "Try a lower learning rate (LR=), gradient clipping (CLIP=1), or a smaller hidden size; "
            "nothing of this epoch was saved")


def _finish(plan: Plan, fold: int, state: FoldState, rows: FoldRows) -> FoldRecord:
    """The best epoch's weights become the finished model; its out-of-fold predictions go beside it."""
    run, model, best = plan.run, state.step.model, state.best
    model.load_state_dict(state.best_weights)
    _, _, log_probs = evaluate(model, rows.valid_x, rows.valid_y, plan.cfg)
    write_probabilities(run.oof_fold(fold), log_probs.exp().cpu().numpy(),
                        {"row": rows.valid_rows.cpu().numpy(), "label": rows.valid_y.cpu().numpy()})
    checkpoint.save_finished(run.model(fold), model, plan.cfg, best)
    made = fold_output(plan, fold).mark(
        fold=fold, best_epoch=best["epoch"], valid_loss=best["valid_loss"], valid_acc=best["valid_acc"],
        seconds=round(state.elapsed, 2), device=describe(state.step.device), trained_at=time.time())
    run.state(fold).unlink(missing_ok=True)
    print(f"fold {fold}: best epoch {best['epoch']}, valid_acc {best['valid_acc']:.4f}, "
          f"valid_loss {best['valid_loss']:.4f}, {state.elapsed:.1f}s")
    return FoldRecord(**made)


def fold_output(plan: Plan, fold: int) -> Output:
    """A fold's outputs: never current when they held out other rows than the folds give now."""
    run = plan.run

    def check() -> None:
        checkpoint.model_from(run.model(fold))
        held_out, _ = read_probabilities(run.oof_fold(fold), "row")
        if not np.array_equal(np.sort(held_out.astype(np.int64)), np.flatnonzero(plan.fold_of == fold)):
            raise PipelineError(f"{run.oof_fold(fold).name}: trained on other folds than "
                                f"{len(np.unique(plan.fold_of))} folds of input/folds.csv give")

    return Output(run.fold_record(fold), fold_inputs(plan, fold), (run.model(fold), run.oof_fold(fold)),
                  check)


def check_settings(cfg: Settings, fold_of: np.ndarray) -> None:
    """Stop before training, in one sentence, when the settings cannot train on these folds."""
    found = sorted(int(f) for f in np.unique(fold_of))
    if found != list(range(cfg.folds)):
        raise PipelineError(f"FOLDS={cfg.folds}, but the folds given hold {len(found)} "
                            f"({', '.join(map(str, found[:10]))}); `make folds FOLDS={cfg.folds}` "
                            "writes them (a run trains only on the folds of its own settings)")
    smallest = int(len(fold_of) - np.bincount(fold_of).max())
    steps_per_epoch(cfg, smallest)


def run(plan: Plan, fold_ids: list[int] | None = None, force: bool = False,
        on_epoch: OnEpoch | None = None) -> list[FoldRecord]:
    """Train the run's folds (or those given) that are not current (force: all); their records."""
    cfg, n_folds = plan.cfg, plan.cfg.folds
    for fold in fold_ids or []:
        if not 0 <= fold < n_folds:
            raise PipelineError(f"FOLD={fold}: no fold {fold} in this run; its folds are 0 to {n_folds - 1}")
    fold_ids = list(range(n_folds)) if fold_ids is None else fold_ids
    device = resolve_device(cfg.device)  # before anything is written: a wrong DEVICE changes nothing
    if cfg.teacher and plan.pseudo is None:
        raise PipelineError(f"TEACHER={cfg.teacher}: a distilled run trains on its teacher's test "
                            "predictions; `make distill TEACHER=...` (or `make submit`) gives them")
    check_settings(cfg, plan.fold_of)
    todo = [k for k in fold_ids if fold_output(plan, k).rerun(f"train: fold {k}", "its model is current",
                                                               force)]
    if todo and plan.pseudo is not None and plan.pseudo.teacher_gone:
        raise PipelineError(f"TEACHER={cfg.teacher}: no such run or blend any more (forgotten?), and "
                            f"folds {todo} of {plan.run.id} need its test predictions to train, so they "
                            "cannot be trained; distill from another teacher (TEACHER=<id>; `make runs` "
                            "lists them)")
    jobs = _jobs(plan, todo, device, on_epoch)
    graphs = ", steps replayed from CUDA graphs" if graph_wanted(cfg, device) else ""
    if jobs > 1:
        _run_parallel(plan, todo, device, jobs, graphs)
    elif todo:
        print(f"train: {plan.run.id}: folds {todo} on {describe(device)}{graphs}")
        for k in todo:
            train_fold(plan, k, device, on_epoch)
    if not plan.run.config.is_file():  # written with a fold's first saved epoch, never before
        write_json(plan.run.config, asdict(cfg))
    return [plan.run.fold(k) for k in fold_ids]


def _jobs(plan: Plan, todo: list[int], device: torch.device, on_epoch: OnEpoch | None) -> int:
    """How many folds train at once (0: none to train)."""
    cfg = plan.cfg
    if not todo:
        return 0
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    if cfg.cuda_graph and device.type == "cuda" and not graph_wanted(cfg, device):
        print("train: no CUDA graph for a model with dropout: its step is random, so a replay "
              "cannot be checked against the normal step (set dropout 0 to use one)")
    # A small RNN leaves most of a GPU idle: by default every fold trains on it at once.
    jobs = min(cfg.jobs or (len(todo) if device.type == "cuda" else 1), len(todo))
    return 1 if on_epoch is not None else jobs


def _run_parallel(plan: Plan, todo: list[int], device: torch.device, jobs: int, graphs: str) -> None:
    """Several folds at once, one process each: CPU cores split between them, GPUs shared."""
    gpus = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 0
    threads = max(1, torch.get_num_threads() // jobs)
    spread = f", spread over {gpus} GPUs" if gpus > 1 else ""
    print(f"train: {plan.run.id}: {jobs} folds at a time on {describe(device, threads)}"
          f"{' each' if device.type == 'cpu' else ''}{spread}{graphs}")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        tasks = [pool.submit(_fold_worker, plan, k, f"cuda:{i % gpus}" if gpus > 1 else str(device),
                             threads, i) for i, k in enumerate(todo)]
        for task in tasks:
            task.result()


def _fold_worker(plan: Plan, fold: int, device: str, threads: int, position: int) -> FoldRecord:
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True
    return train_fold(plan, fold, torch.device(device), bar=position)
