"""The blend stage: several runs' probabilities, weighted on their out-of-fold predictions.

Greedy forward selection with replacement (Caruana et al., ICML 2004): start from the run with the
lowest out-of-fold log loss, then repeatedly add the run (possibly one already in) whose addition
lowers the blend's out-of-fold log loss most; stop when no addition helps. A run's weight is how
often it was picked. Weights chosen on the same rows they are scored on flatter the blend, so an
honest estimate is reported too: for each fold, the selection is refitted on the other folds' rows
and scored on that fold's rows.

Only runs on the same data and the same folds can be blended: their out-of-fold predictions then
cover the same rows, each row predicted by models that never saw it.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from pipeline.config import Paths, fingerprint
from pipeline.errors import PipelineError
from pipeline.store.artifacts import (
    STUDIES,
    Prepared,
    RunDir,
    all_runs,
    check_probabilities,
    completed,
    data_source,
    mark_current,
    run_dir,
    stale,
    write_probabilities,
)
from pipeline.store.io import read_json, write_csv, write_json
from pipeline.store.ledger import publish
from pipeline.store.submission import validate_file

MEANS = ("prob", "logprob")
MAX_STEPS = 100  # picks in all; a blend of a few runs settles long before


def combine(probs: np.ndarray, weights: np.ndarray, mean: str) -> np.ndarray:
    """Weighted mean of (runs, N, 10) probabilities, or of their logs (renormalised)."""
    w = weights / weights.sum()
    if mean == "prob":
        return np.tensordot(w, probs, axes=1)
    logs = np.tensordot(w, np.log(np.clip(probs, 1e-12, 1)), axes=1)
    out = np.exp(logs - logs.max(1, keepdims=True))
    return out / out.sum(1, keepdims=True)


def _loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean())


def select(probs: np.ndarray, labels: np.ndarray, mean: str = "prob") -> np.ndarray:
    """How many times each run is picked by greedy forward selection with replacement."""
    counts = np.zeros(len(probs))
    # Each run as a blend of itself (renormalised as every blend is), so that picking it again
    # never looks like a gain: a one-run blend is that run once.
    losses = [_loss(combine(probs[m:m + 1], np.ones(1), mean), labels) for m in range(len(probs))]
    counts[int(np.argmin(losses))] = 1
    current = min(losses)
    for _ in range(MAX_STEPS):
        trials = []
        for m in range(len(probs)):
            trial = counts.copy()
            trial[m] += 1
            trials.append(_loss(combine(probs, trial, mean), labels))
        m = int(np.argmin(trials))
        if trials[m] >= current - 1e-9:
            break
        counts[m] += 1
        current = trials[m]
    return counts


def honest_accuracy(probs: np.ndarray, labels: np.ndarray, fold_of: np.ndarray, mean: str) -> float:
    """Accuracy where each fold's rows are scored by a selection fitted on the other folds' rows."""
    correct = 0
    for f in np.unique(fold_of):
        held = fold_of == f
        counts = select(probs[:, ~held], labels[~held], mean)
        correct += int((combine(probs[:, held], counts, mean).argmax(1) == labels[held]).sum())
    return correct / len(labels)


class Member(NamedTuple):
    """A run that may be blended: its folder, its record and its (checked) probabilities."""

    run: RunDir
    record: dict[str, Any]
    oof: np.ndarray
    test: np.ndarray


def fold_seed_of(record: dict[str, Any]) -> Any:
    """The seed that drew a record's folds (records from before FOLD_SEED kept it as seed)."""
    return record.get("fold_seed", record.get("seed"))


def candidates(paths: Paths, data: Prepared, folds: int, fold_seed: int,
               names: list[str] | None) -> tuple[list[Member], list[str]]:
    """The runs to blend, and the reasons others were left out."""
    chosen: list[Member] = []
    skipped: list[str] = []
    pool = [run_dir(paths, n) for n in names] if names else all_runs(paths)
    for run in pool:
        record = completed(run)
        problem, probs = "", None
        if names and run.id == STUDIES:
            problem = "the tuning studies' folder, not a run"
        elif names and not run.path.is_dir():
            problem = "no such run"
        elif record is None:
            problem = "not complete (still training, or never predicted)"
        elif record.get("kind") == "blend":
            problem = "a blend itself"
        elif not isinstance(record.get("key"), str):
            problem = (f"damaged: its run.json has no key; `make predict RUN={run.id} FORCE=1` "
                       "remakes it")
        elif record.get("data") != data.data_key:
            problem = "made from other data than input/*.csv now hold"
        elif (record.get("folds"), fold_seed_of(record)) != (folds, fold_seed):
            problem = f"on other folds ({record.get('folds')} folds, FOLD_SEED {fold_seed_of(record)})"
        else:
            try:
                probs = check_probabilities(run, len(data.train_y), len(data.test_x))
            except PipelineError as exc:
                problem = f"damaged: {exc}"
        if problem and names:
            raise PipelineError(f"RUNS: {run.id} cannot be blended: {problem}; the runs must share "
                                f"the current data and folds ({folds} folds, FOLD_SEED {fold_seed})")
        if problem:
            if record is None or record.get("kind") != "blend":
                skipped.append(f"{run.id}: {problem}")
            continue
        assert record is not None and probs is not None
        chosen.append(Member(run, record, *probs))
    return chosen, skipped


def run(paths: Paths, data: Prepared, fold_of: np.ndarray, folds: int, fold_seed: int,
        names: list[str] | None = None, mean: str = "logprob", force: bool = False) -> dict[str, Any]:
    """Blend the chosen runs (default: every completed run on these data and folds) into a
    submission; returns the blend's record."""
    if mean not in MEANS:
        raise PipelineError(f"MEAN={mean!r}: must be one of {', '.join(MEANS)}")
    chosen, skipped = candidates(paths, data, folds, fold_seed, names)
    for line in skipped:
        print(f"blend: skipped {line}")
    if not chosen:
        raise PipelineError(f"blend: no completed run on the current data and folds ({folds} folds, "
                            f"FOLD_SEED {fold_seed}); `make submit FOLDS={folds} "
                            f"FOLD_SEED={fold_seed}` makes one")
    members = {m.run.id: m.record["key"] for m in chosen}
    inputs = {"members": members, "mean": mean, "data": data.data_key}
    out = RunDir(paths.runs / f"blend-{fingerprint(inputs)[:6]}")
    why = "FORCE=1" if force else stale(out.record, inputs, [out.oof, out.test, out.submission],
                                        check=lambda: validate_file(out.submission, len(data.test_x)))
    if why:
        print(f"blend: {out.id} reruns: {why}")
        record = mark_current(out.record, inputs, **_blend(paths, out, chosen, data, fold_of, mean))
    else:
        print(f"blend: {out.id} skipped: the same runs, unchanged")
        record = read_json(out.record)
    kept = publish(paths, out, record, len(data.test_x), new=bool(why))
    weights = ", ".join(f"{k} x{v}" for k, v in record["weights"].items())
    print(f"blend: {weights}")
    print(f"blend: OOF accuracy {record['oof_acc_honest']:.4f} honest (selection refitted without "
          f"each fold), {record['oof_acc']:.4f} in-sample; wrote {paths.submission_csv} "
          f"(kept as {kept.relative_to(paths.root)})")
    return record


def _blend(paths: Paths, out: RunDir, chosen: list[Member], data: Prepared, fold_of: np.ndarray,
           mean: str) -> dict[str, Any]:
    labels = data.train_y.astype(np.int64)
    oofs_a, tests_a = np.stack([m.oof for m in chosen]), np.stack([m.test for m in chosen])
    started = time.perf_counter()
    counts = select(oofs_a, labels, mean)
    honest = honest_accuracy(oofs_a, labels, fold_of, mean)
    blended_oof = combine(oofs_a, counts, mean)
    blended_test = combine(tests_a, counts, mean)
    frame = pd.DataFrame({"ImageId": np.arange(1, len(blended_test) + 1),
                          "Label": blended_test.argmax(1).astype(np.int64)})
    out.path.mkdir(parents=True, exist_ok=True)
    write_probabilities(out.oof, blended_oof, {"row": np.arange(len(labels)), "label": labels})
    write_probabilities(out.test, blended_test, {"ImageId": frame["ImageId"].to_numpy()})
    write_csv(out.submission, frame)
    weights = {m.run.id: int(c) for m, c in zip(chosen, counts, strict=True) if c}
    write_json(out.blend, {"weights": weights, "mean": mean,
                           "considered": [m.run.id for m in chosen]})
    per_fold = [float((blended_oof[fold_of == f].argmax(1) == labels[fold_of == f]).mean())
                for f in np.unique(fold_of)]
    cv = [{"fold": str(f), "valid_loss": _loss(blended_oof[fold_of == f], labels[fold_of == f]),
           "valid_acc": acc, "rows": int((fold_of == f).sum())}
          for f, acc in zip(np.unique(fold_of), per_fold, strict=True)]
    cv.append({"fold": "all", "valid_loss": _loss(blended_oof, labels),
               "valid_acc": float((blended_oof.argmax(1) == labels).mean()), "rows": len(labels)})
    write_csv(out.cv, pd.DataFrame(cv))
    return {"complete": True, "kind": "blend", "model": "blend", "weights": weights, "mean": mean,
            "oof_acc": float((blended_oof.argmax(1) == labels).mean()), "oof_acc_honest": honest,
            "oof_loss": _loss(blended_oof, labels), "fold_min": min(per_fold),
            "fold_max": max(per_fold), "data": data.data_key, "folds": int(fold_of.max()) + 1,
            "fold_seed": fold_seed_of(chosen[0].record), "device": "", "config": {},
            "seconds": sum(m.record["seconds"] for m in chosen
                           if isinstance(m.record.get("seconds"), int | float))
            + time.perf_counter() - started,
            "source": data_source(paths), "finished": time.time()}


