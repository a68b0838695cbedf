"""Distillation: a run that learns from the labelled train rows and from the test rows labelled by a
teacher (a run or a blend): the teacher's averaged test probabilities, tempered, as soft targets.

Honest by construction: the extra rows are test rows only. A fold's model never trains on its own
held-out train rows, nor on the teacher's out-of-fold probabilities of train rows (those came from
teacher models that saw this fold's held-out rows), so its out-of-fold accuracy stays an estimate of
unseen digits.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import Paths, Settings
from pipeline.errors import PipelineError
from pipeline.store import ensemble
from pipeline.store.artifacts import Prepared, Pseudo, read_probabilities, run_dir


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities as softmax(log p / T): T > 1 softens them, T < 1 sharpens them."""
    logits = np.log(np.clip(probs, 1e-12, 1)) / temperature
    logits -= logits.max(1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(1, keepdims=True)


def pseudo_rows(paths: Paths, cfg: Settings, data: Prepared) -> Pseudo:
    """The teacher's test rows with at least DISTILL_THRESHOLD confidence, and their soft targets."""
    teacher = run_dir(paths, cfg.teacher) if cfg.teacher else None
    try:
        record = ensemble.completed(teacher) if teacher is not None else None
    except PipelineError as exc:
        assert teacher is not None
        raise PipelineError(f"TEACHER={cfg.teacher}: its record is damaged ({exc}); "
                            f"{ensemble.remake(teacher)}") from None
    if teacher is None or record is None:
        raise PipelineError(f"TEACHER={cfg.teacher}: no completed run or blend of that name in "
                            f"{paths.runs}; `make runs` lists them")
    if record.data != data.data_key:
        raise PipelineError(f"TEACHER={cfg.teacher} was made from other data than input/*.csv now "
                            "hold; its test predictions are of other digits")
    ids, probs = read_probabilities(teacher.test, "ImageId")
    if len(ids) != len(data.test_x) or not np.isfinite(probs).all() or (probs < 0).any() \
            or (probs.sum(1) <= 0).any():
        raise PipelineError(f"{teacher.test}: expected {len(data.test_x)} rows of probabilities; "
                            f"`make predict RUN={cfg.teacher} FORCE=1` remakes them")
    keep = probs.max(1) >= cfg.distill_threshold
    targets = temper(probs[keep] / probs[keep].sum(1, keepdims=True), cfg.distill_temperature)
    print(f"distill: teacher {teacher.id} (OOF accuracy {record.accuracy:.4f}): {int(keep.sum())} of "
          f"{len(keep)} test rows with confidence >= {cfg.distill_threshold:g}, temperature "
          f"{cfg.distill_temperature:g}")
    return Pseudo(images=data.test_x[keep], targets=targets.astype(np.float32), key=record.key)
