"""One trial: the settings it draws, the run it trains (and scores), and the worker processes that
run trials (each given the study's Job: everything but the data, which it loads itself)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np

from pipeline.config import Paths, Settings, validate
from pipeline.errors import PipelineError
from pipeline.store.data import Prepared, load_prepared, read_folds
from pipeline.store.run import FoldRecord, Plan, RunDir, run_dir, run_id
from pipeline.tuning.space import suggest
from pipeline.tuning.study import Job, open_study, progress


class Objective:
    """Train (and, with every fold, predict) the run of a trial's settings; return its score."""

    def __init__(self, job: Job, paths: Paths, data: Prepared, fold_of: np.ndarray) -> None:
        self.job, self.paths, self.data, self.fold_of = job, paths, data, fold_of

    def __call__(self, trial: Any) -> float:
        try:
            return self._score(trial)
        except PipelineError as exc:  # the trial fails (Optuna goes on); its line says why
            trial.set_user_attr("outcome", f"failed: {exc}")
            raise
        except KeyboardInterrupt:  # failed by Optuna; the next `make tune` queues it again
            trial.set_user_attr("outcome", "interrupted")
            raise

    def _score(self, trial: Any) -> float:
        from filelock import FileLock, Timeout

        cfg = validate(replace(self.job.base, **suggest(trial, self.job.space)), f"trial {trial.number}")
        run = run_dir(self.paths, run_id(cfg, self.data.data_key))
        trial.set_user_attr("run", run.id)
        # Two workers that drew the same settings share one run folder: one trains, the other
        # waits and then finds the run current.
        lock = FileLock(self.paths.runs / f".train-{run.id}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"tune: trial {trial.number}: its run {run.id} is being trained by another "
                  "trial; waiting for it", flush=True)
            lock.acquire()
        try:
            return self._train(trial, cfg, run)
        finally:
            lock.release()

    def _train(self, trial: Any, cfg: Settings, run: RunDir) -> float:
        import optuna

        stages, pruner, fold_ids = self.job.stages, self.job.pruner, self.job.fold_ids(cfg)
        plan = Plan(cfg, self.paths, run, self.data, self.fold_of)

        def report(value: float, step: int, outcome: str) -> None:
            trial.report(value, step)
            if trial.should_prune():
                trial.set_user_attr("outcome", outcome)
                raise optuna.TrialPruned()

        def on_epoch(fold: int, epoch: int, valid_acc: float) -> None:
            if pruner != "wilcoxon":
                report(valid_acc, fold * 1000 + round(100 * epoch / cfg.epochs),
                       f"pruned at fold {fold} epoch {epoch}")

        records: list[FoldRecord] = []
        for fold in fold_ids:  # fold by fold, so the Wilcoxon pruner can stop between them
            records += stages.train(plan, [fold], on_epoch=on_epoch)
            if pruner == "wilcoxon":
                report(records[-1].valid_acc, fold, f"pruned after fold {fold}")
        if len(fold_ids) == cfg.folds:
            return float(stages.predict(plan, records, publish=False).oof_acc)
        return sum(r.valid_acc for r in records) / len(records)


def optimize(made: Any, job: Job, paths: Paths, data: Prepared, fold_of: np.ndarray,
             share: int) -> None:
    """Run up to `share` trials of the study here, stopping once it has job.trials finished ones."""
    import optuna
    from optuna.trial import TrialState

    stop = optuna.study.MaxTrialsCallback(job.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    made.optimize(Objective(job, paths, data, fold_of), n_trials=share, callbacks=[stop, progress],
                  catch=(PipelineError,))


def worker(job: Job, share: int) -> None:
    """One trial process of WORKERS=n: its share of the cores, the same study. SIGINT stops it only
    while it works (idle, it ignores SIGINT, so a Ctrl-C never leaves a traceback of an idle one)."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.workers))
        paths = Paths(job.root)
        made = open_study(paths, job)
        optimize(made, job, paths, load_prepared(paths), read_folds(paths), share)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
