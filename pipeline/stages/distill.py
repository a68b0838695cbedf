"""Distillation: a run that learns from the labelled train rows and from the test rows, with the
teacher's (a run's or a blend's) tempered test probabilities as soft targets. Honest by construction:
the extra rows are test rows only (the teacher's out-of-fold probabilities came from models that saw
this fold's held-out rows), so the out-of-fold accuracy stays an estimate of unseen digits.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import softmax

from pipeline.config import Paths, Settings
from pipeline.errors import PipelineError
from pipeline.store.data import Prepared, Pseudo
from pipeline.store.run import RunDir, RunRecord, check_name, read_probabilities, run_dir


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities as softmax(log p / T): T > 1 softens them, T < 1 sharpens them."""
    return softmax(np.log(np.clip(probs, 1e-12, 1)) / temperature, axis=1)


def pseudo_rows(paths: Paths, cfg: Settings, data: Prepared, student: RunDir | None = None) -> Pseudo:
    """The teacher's test rows with at least DISTILL_THRESHOLD confidence, and their soft targets;
    student: the distilled run, whose folds stay usable when the teacher is gone (see _gone)."""
    teacher = run_dir(paths, check_name(cfg.teacher, "TEACHER"))
    try:
        record = teacher.completed()
    except PipelineError as exc:
        raise PipelineError(f"TEACHER={cfg.teacher}: its record is damaged ({exc}); "
                            f"{teacher.remake()}") from None
    if record is None:
        return _gone(paths, cfg, student)
    same_data(cfg, record, data)
    ids, probs = read_probabilities(teacher.test, "ImageId")
    if len(ids) != len(data.test_x) or not np.isfinite(probs).all() or (probs < 0).any() \
            or (probs.sum(1) <= 0).any():
        raise PipelineError(f"{teacher.test}: expected {len(data.test_x)} rows of probabilities; "
                            f"{teacher.remake()}")
    confidence = probs.max(1)
    keep = confidence >= cfg.distill_threshold
    if not keep.any():
        raise PipelineError(keeps_nothing(cfg.distill_threshold, confidence))
    targets = temper(probs[keep] / probs[keep].sum(1, keepdims=True), cfg.distill_temperature)
    print(f"distill: teacher {teacher.id} (OOF accuracy {record.accuracy:.4f}): {int(keep.sum())} of "
          f"{len(keep)} test rows with confidence >= {cfg.distill_threshold:g}, temperature "
          f"{cfg.distill_temperature:g}")
    return Pseudo(images=data.test_x[keep], targets=targets.astype(np.float32), key=record.key)


def same_data(cfg: Settings, record: RunRecord, data: Prepared) -> None:
    """The teacher must have been made from the data now in input/; else say which file differs."""
    if record.data == data.data_key:
        return
    if not record.test_data:
        differs = "other data than input/*.csv now hold"
    elif record.test_data == data.test_key:
        differs = ("another input/train.csv than the one there now (input/test.csv is the same): its "
                   "models learned from other labelled rows")
    else:
        differs = "another input/test.csv: its test predictions are of other digits"
    raise PipelineError(f"TEACHER={cfg.teacher} was made from {differs}; make the teacher again on "
                        f"this data (a run: `make submit CONFIG=runs/{cfg.teacher}/config.json`; a "
                        "blend: `make blend`) and name it with TEACHER=")


def keeps_nothing(threshold: float, confidence: np.ndarray) -> str:
    """Why no test row is kept, and the threshold (two decimals) that keeps the most confident."""
    top = float(confidence.max())
    lower = math.floor(top * 100 + 1e-9) / 100
    while lower > 0 and not (confidence >= lower).any():  # 0.29 * 100 is 28.999...: step down
        lower = round(lower - 0.01, 2)
    return (f"DISTILL_THRESHOLD={threshold:g} keeps 0 of {len(confidence)} test rows: the teacher's "
            f"most confident row has {top:.4g}; DISTILL_THRESHOLD={lower:g} keeps "
            f"{int((confidence >= lower).sum())} (nothing was trained)")


def _gone(paths: Paths, cfg: Settings, student: RunDir | None) -> Pseudo:
    """The folds the student trained with a teacher now gone stay current (a Pseudo of no rows)."""
    key = student.teacher_key(cfg.folds) if student is not None else None
    if student is None or key is None:
        raise PipelineError(f"TEACHER={cfg.teacher}: no completed run or blend of that name in "
                            f"{paths.runs}; `make runs` lists them")
    print(f"distill: TEACHER={cfg.teacher} is gone (forgotten?); the folds {student.id} trained "
          "with it stay as they are (a fold to train would need the teacher)")
    return Pseudo(images=np.zeros((0, 28, 28), np.uint8), targets=np.zeros((0, 10), np.float32),
                  key=key, teacher_gone=True)
