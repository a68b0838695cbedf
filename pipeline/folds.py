"""The folds stage: a stratified, shuffled, seeded k-fold assignment written once to folds.csv."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from pipeline import prepare
from pipeline.config import Paths, TrainConfig, fingerprint
from pipeline.errors import PipelineError
from pipeline.io import read_json, write_csv, write_json


def assign(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """The fold of every row: each row in exactly one fold, every class spread evenly."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels, minlength=10)
    if counts[counts > 0].min() < n_folds:
        rarest = int(np.flatnonzero(counts == counts[counts > 0].min())[0])
        raise PipelineError(f"folds: class {rarest} has {counts[rarest]} rows, fewer than the "
                            f"{n_folds} folds asked for; use fewer folds")
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_of[valid] = fold
    return fold_of


def folds_key(data_key: str, cfg: TrainConfig) -> str:
    return fingerprint({"data": data_key, "folds": cfg.folds, "seed": cfg.seed})


def _digest(fold_of: np.ndarray) -> str:
    return hashlib.sha1(np.asarray(fold_of, dtype=np.int64).tobytes()).hexdigest()[:16]


def load(paths: Paths, data_key: str, cfg: TrainConfig | None = None) -> tuple[np.ndarray, str, int]:
    """The fold of every train row, the folds' key and their count, checked against the data
    (and against the config's FOLDS and SEED when one is given)."""
    meta = read_json(paths.folds_json)
    if not meta or not paths.folds_csv.is_file():
        raise PipelineError(f"{paths.folds_csv}: no folds yet; run `make folds` first")
    try:
        fold_of = pd.read_csv(paths.folds_csv)["fold"].to_numpy()
    except (ValueError, KeyError) as exc:
        raise PipelineError(f"{paths.folds_csv}: unreadable ({exc}); run `make folds`") from exc
    if meta.get("data_key") != data_key or _digest(fold_of) != meta.get("digest"):
        raise PipelineError(f"{paths.folds_csv}: made for other data (or changed since); "
                            "run `make folds`")
    if cfg is not None and (meta["folds"], meta["seed"]) != (cfg.folds, cfg.seed):
        raise PipelineError(f"{paths.folds_csv}: has {meta['folds']} folds from seed {meta['seed']}, "
                            f"but FOLDS={cfg.folds} SEED={cfg.seed} are asked for; run "
                            f"`make folds FOLDS={cfg.folds} SEED={cfg.seed}` first")
    return fold_of, meta["key"], int(meta["folds"])


def run(cfg: TrainConfig, paths: Paths) -> str:
    """Write input/folds.csv (row,label,fold) unless it is current; returns its key."""
    data = prepare.load(paths)
    key = folds_key(data.data_key, cfg)
    try:
        _, current, _ = load(paths, data.data_key, cfg)
    except PipelineError:
        current = None
    if current == key:
        print(f"folds: up to date ({cfg.folds} folds, seed {cfg.seed})")
        return key
    fold_of = assign(data.train_y.astype(np.int64), cfg.folds, cfg.seed)
    frame = pd.DataFrame({"row": np.arange(len(fold_of)), "label": data.train_y, "fold": fold_of})
    write_csv(paths.folds_csv, frame)
    write_json(paths.folds_json, {"key": key, "folds": cfg.folds, "seed": cfg.seed,
                                  "data_key": data.data_key, "digest": _digest(fold_of)})
    sizes = np.bincount(fold_of)
    print(f"folds: {cfg.folds} stratified folds of {sizes.min()}-{sizes.max()} rows (seed {cfg.seed})")
    return key
