"""The data in input/ (docs/files.md lists its files): the CSVs' source (download), the pixel cache
(prepare), the folds, and the extra training rows of distillation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import FOLD_SETTINGS, Paths, Settings
from pipeline.errors import PipelineError
from pipeline.store.fresh import Output
from pipeline.store.io import atomic_path, read_json

PIXELS = [f"pixel{k}" for k in range(784)]
CACHE_VERSION = 2
ARRAYS = ("train_x", "train_y", "test_x")
SAMPLE_BANNER = (
    "*** Using the BUILT-IN SAMPLE (scikit-learn's 1,797 digits, resized to 28x28), not the "
    "competition data. Good for trying the pipeline; its submission is not for Kaggle. ***"
)


@dataclass
class Prepared:
    train_x: np.ndarray  # uint8 (N, 28, 28)
    train_y: np.ndarray  # uint8 (N,)
    test_x: np.ndarray  # uint8 (M, 28, 28)
    data_key: str  # fingerprint of the three arrays

    @property
    def test_key(self) -> str:
        """The fingerprint of the test images alone: a record made from another train.csv may still
        hold predictions of these very digits."""
        return digest({"test_x": self.test_x})


@dataclass(frozen=True)
class Pseudo:
    """Distillation's extra training rows: test images with the teacher's (tempered) probabilities.

    They are test rows only, never train rows: no fold's model learns anything about its own
    held-out rows from them beyond what the teacher's test predictions carry."""

    images: np.ndarray  # uint8 (M, 28, 28)
    targets: np.ndarray  # float32 (M, 10), rows sum to 1
    key: str  # the teacher's record key: a re-predicted teacher makes the folds stale
    # The teacher is gone (forgotten): no rows, only the key its folds were trained with, so the
    # folds trained with it stay current and none can be trained.
    teacher_gone: bool = False


def digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha1()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(str(arrays[name].shape).encode())
        h.update(np.ascontiguousarray(arrays[name]).data)
    return h.hexdigest()[:16]


def save_prepared(paths: Paths, arrays: dict[str, np.ndarray], made: Output) -> Prepared:
    """Write the cache and the record (made) that makes it current."""
    key = digest(arrays)
    for name in ARRAYS:
        with atomic_path(paths.prepared / f"{name}.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, arrays[name], allow_pickle=False)
    made.mark(version=CACHE_VERSION, data_key=key, n_train=len(arrays["train_x"]),
              n_test=len(arrays["test_x"]))
    return Prepared(**arrays, data_key=key)


def load_prepared(paths: Paths) -> Prepared:
    """The prepared arrays, checked against the digest recorded when they were written."""
    meta = read_json(paths.prepared / "meta.json")
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
        raise PipelineError(f"{paths.prepared}: no prepared data (make prepare builds it)")
    arrays = {}
    for name in ARRAYS:
        path = paths.prepared / f"{name}.npy"
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise PipelineError(f"{path}: the prepared cache is missing or unreadable ({exc})") from exc
    if digest(arrays) != meta.get("data_key"):
        raise PipelineError(f"{paths.prepared}: the prepared cache does not match its record")
    return Prepared(**arrays, data_key=meta["data_key"])


def folds_inputs(data_key: str, cfg: Settings) -> dict[str, Any]:
    """What folds.csv is made from: the data and the fold settings (each also in every run's id)."""
    return {"data": data_key, **{name: getattr(cfg, name) for name in FOLD_SETTINGS}}


def read_folds(paths: Paths) -> np.ndarray:
    import pandas as pd

    try:
        return pd.read_csv(paths.folds_csv)["fold"].to_numpy(dtype=np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"{paths.folds_csv}: unreadable ({exc})") from exc


def source_record(paths: Paths) -> dict[str, Any]:
    """input/source.json: {"source": ..., "dir": ...} ({} when there is none)."""
    record = read_json(paths.source_json)
    return record if isinstance(record, dict) else {}


def data_source(paths: Paths) -> str:
    """Which source the files in input/ came from ('unknown' for files put there by hand)."""
    return str(source_record(paths).get("source", "unknown"))

