"""The folds stage: a stratified, shuffled, seeded k-fold assignment written once to folds.csv."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config import Paths, Settings
from pipeline.errors import PipelineError
from pipeline.store.data import Prepared, folds_inputs, read_folds
from pipeline.store.fresh import Output
from pipeline.store.io import write_csv


def assign(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """The fold of every row: each row in exactly one fold, every class spread evenly."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels, minlength=10)
    if len(labels) < n_folds:
        raise PipelineError(f"FOLDS={n_folds}: train.csv has only {len(labels)} rows; each fold "
                            "needs at least one: use fewer folds or add rows")
    rarest = int(np.flatnonzero(counts == counts[counts > 0].min())[0])
    if counts[rarest] < n_folds:
        fix = "use fewer folds (FOLDS=2 or more), or " if n_folds > 2 else ""
        raise PipelineError(f"FOLDS={n_folds}: digit {rarest} has {counts[rarest]} row(s) in "
                            f"train.csv, fewer than the folds, so some fold would never see it; "
                            f"{fix}add rows of digit {rarest}, or drop that digit's rows")
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_of[valid] = fold
    return fold_of


def run(cfg: Settings, paths: Paths, data: Prepared) -> np.ndarray:
    """Write input/folds.csv (row,label,fold) unless it is current; returns the fold of every row."""
    found: list[np.ndarray] = []

    def check() -> None:
        fold_of = read_folds(paths)
        if len(fold_of) != len(data.train_y) or set(np.unique(fold_of)) != set(range(cfg.folds)):
            raise PipelineError(f"{paths.folds_csv} does not hold {cfg.folds} folds of "
                                f"{len(data.train_y)} rows")
        found.append(fold_of)

    made = Output(paths.folds_json, folds_inputs(data.data_key, cfg), [paths.folds_csv], check)
    if not made.rerun("folds:", f"{cfg.folds} folds (FOLD_SEED {cfg.fold_seed}) of the same data"):
        return found[0]
    fold_of = assign(data.train_y.astype(np.int64), cfg.folds, cfg.fold_seed)
    frame = pd.DataFrame({"row": np.arange(len(fold_of)), "label": data.train_y, "fold": fold_of})
    write_csv(paths.folds_csv, frame)
    made.mark(folds=cfg.folds, seed=cfg.fold_seed)
    sizes = np.bincount(fold_of)
    print(f"folds: {cfg.folds} stratified folds of {sizes.min()}-{sizes.max()} rows "
          f"(FOLD_SEED {cfg.fold_seed})")
    return fold_of
