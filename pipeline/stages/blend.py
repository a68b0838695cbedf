"""The blend stage: several runs' probabilities, weighted by greedy forward selection with
replacement on their out-of-fold log loss (Caruana et al., ICML 2004); a run's weight is how often
it was picked. Weights chosen on the rows they are scored on flatter the blend, so an honest estimate
is reported too: each fold scored by a selection refitted on the other folds. Only runs on the same
data and folds can be blended: each row is then predicted by models that never saw it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy.special import softmax

from pipeline.config import Paths, fingerprint
from pipeline.errors import PipelineError
from pipeline.options import default
from pipeline.store import ledger
from pipeline.store.data import Prepared, data_source
from pipeline.store.io import write_json
from pipeline.store.run import (
    BLEND,
    STUDIES,
    RunDir,
    RunRecord,
    all_runs,
    complete,
    log_loss,
    run_dir,
    scores,
)

MAX_STEPS = 100  # picks in all; a blend of a few runs settles long before


def combine(probs: np.ndarray, weights: np.ndarray, mean: str) -> np.ndarray:
    """Weighted mean of (runs, N, 10) probabilities, or of their logs (renormalised)."""
    return _mix(_terms(probs, mean), weights, mean)


def _terms(probs: np.ndarray, mean: str) -> np.ndarray:
    """What the mean averages: the probabilities, or their logs."""
    return probs if mean == "prob" else np.log(np.clip(probs, 1e-12, 1))


def _mix(terms: np.ndarray, weights: np.ndarray, mean: str) -> np.ndarray:
    mixed = np.tensordot(weights / weights.sum(), terms, axes=1)
    return mixed if mean == "prob" else softmax(mixed, axis=1)


def select(probs: np.ndarray, labels: np.ndarray, mean: str) -> np.ndarray:
    """How many times each run is picked by greedy forward selection with replacement."""
    counts, terms = np.zeros(len(probs)), _terms(probs, mean)  # the logs taken once, not per trial
    # Each run as a blend of itself (renormalised as every blend is), so that picking it again
    # never looks like a gain: a one-run blend is that run once.
    losses = [log_loss(_mix(terms[m:m + 1], np.ones(1), mean), labels) for m in range(len(probs))]
    counts[int(np.argmin(losses))] = 1
    current = min(losses)
    for _ in range(MAX_STEPS):
        # The blend with one more pick of each run in turn (a row of the identity adds it).
        trials = [log_loss(_mix(terms, counts + pick, mean), labels) for pick in np.eye(len(probs))]
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
    record: RunRecord
    oof: np.ndarray
    test: np.ndarray


def candidates(paths: Paths, data: Prepared, n_folds: int, fold_seed: int,
               names: list[str] | None) -> tuple[list[Member], list[str]]:
    """The runs to blend, and the reasons others were left out (blends are left out unsaid)."""
    chosen: list[Member] = []
    skipped: list[str] = []
    pool = [run_dir(paths, n) for n in names] if names else all_runs(paths)
    for run in pool:
        try:
            member = _member(run, data, n_folds, fold_seed, named=bool(names))
        except PipelineError as exc:
            if names:
                raise PipelineError(f"RUNS: {run.id} cannot be blended: {exc}; the runs must share "
                                    f"the current data and folds ({n_folds} folds, FOLD_SEED "
                                    f"{fold_seed})") from None
            skipped.append(f"{run.id}: {exc}")
            continue
        if member is not None:
            chosen.append(member)
    return chosen, skipped


def _member(run: RunDir, data: Prepared, n_folds: int, fold_seed: int, named: bool) -> Member | None:
    """The run as a blend member; None for a blend; a PipelineError saying why it cannot be one."""
    if named and run.id == STUDIES:
        raise PipelineError("the tuning studies' folder, not a run")
    if named and not run.path.is_dir():
        raise PipelineError("no such run")
    if run.is_blend:  # even a damaged one
        if named:
            raise PipelineError("a blend itself")
        return None
    try:
        record = run.completed()
    except PipelineError as exc:
        raise PipelineError(f"damaged: {exc}; {run.remake()}") from None
    if record is None:
        raise PipelineError("not complete (still training, or never predicted)")
    if record.data != data.data_key:
        raise PipelineError("made from other data than input/*.csv now hold")
    if (record.n_folds, record.fold_seed) != (n_folds, fold_seed):
        raise PipelineError(f"on other folds ({record.n_folds} folds, FOLD_SEED {record.fold_seed})")
    try:
        probs = run.probabilities(len(data.train_y), len(data.test_x))
    except PipelineError as exc:
        raise PipelineError(f"damaged: {exc}") from None
    return Member(run, record, *probs)


def run(paths: Paths, data: Prepared, fold_of: np.ndarray, fold_seed: int,
        names: list[str] | None = None, mean: str = default("mean"), force: bool = False,
        make_first: Callable[[], object] | None = None) -> RunRecord:
    """Blend the named runs (default: all on these data and folds); make_first: makes one if none."""
    n_folds = int(fold_of.max()) + 1
    chosen, skipped = candidates(paths, data, n_folds, fold_seed, names)
    for line in skipped:
        print(f"blend: skipped {line}")
    # Only a project without any run gets one made: where runs are skipped, the settings that
    # blend them were likely forgotten, and a run trained unasked would cost hours.
    if not chosen and names is None and make_first is not None and not all_runs(paths):
        print("blend: no completed run on these folds yet: making the run of these settings first")
        make_first()
        chosen, _ = candidates(paths, data, n_folds, fold_seed, names)
    if not chosen:
        raise PipelineError(nothing_to_blend(paths, data, n_folds, fold_seed))
    inputs = {"members": {m.run.id: m.record.key for m in chosen}, "mean": mean, "data": data.data_key}
    out = RunDir(paths.runs / f"{BLEND}{fingerprint(inputs)[:6]}")
    made = out.ensemble(inputs, len(data.train_y), len(data.test_x))
    why = made.rerun(f"blend: {out.id}", "the same runs, unchanged", force)
    record = out.finish(made, _blend(paths, out, chosen, data, fold_of, mean)) if why else out.read()
    record = ledger.publish(paths, out, record, len(data.test_x), new=bool(why))
    print(f"blend: {record.members()}")
    print(f"blend: OOF accuracy {record.accuracy:.4f} honest (selection refitted without "
          f"each fold), {record.oof_acc:.4f} in-sample; wrote {paths.submission_csv} "
          f"(kept as submissions/{record.kept})")
    return record


def nothing_to_blend(paths: Paths, data: Prepared, n_folds: int, fold_seed: int) -> str:
    """Why there is nothing to blend, with the settings that blend the runs there are."""
    others = set()
    for run in all_runs(paths):
        record = complete(run)
        if record is not None and not run.is_blend and record.data == data.data_key:
            others.add((record.n_folds, record.fold_seed))
    said = "".join(f"`make blend FOLDS={k} FOLD_SEED={seed}` blends those on {k} folds (FOLD_SEED "
                   f"{seed}); " for k, seed in sorted(others, key=str))
    return (f"blend: no completed run on the current data and folds ({n_folds} folds, FOLD_SEED "
            f"{fold_seed}); {said}`make submit FOLDS={n_folds} FOLD_SEED={fold_seed}` (with the settings "
            "you want) makes one on these folds")


def _blend(paths: Paths, out: RunDir, chosen: list[Member], data: Prepared, fold_of: np.ndarray,
           mean: str) -> RunRecord:
    labels = data.train_y.astype(np.int64)
    oofs, tests = np.stack([m.oof for m in chosen]), np.stack([m.test for m in chosen])
    started = time.perf_counter()
    counts = select(oofs, labels, mean)
    honest = honest_accuracy(oofs, labels, fold_of, mean)
    blended_oof = combine(oofs, counts, mean)
    cv = out.write(blended_oof, combine(tests, counts, mean), labels, fold_of)
    weights = {m.run.id: int(c) for m, c in zip(chosen, counts, strict=True) if c}
    write_json(out.blend, {"weights": weights, "mean": mean,
                           "considered": [m.run.id for m in chosen]})
    return RunRecord(
        kind="blend", model="blend", **scores(cv),
        seconds=sum(m.record.seconds for m in chosen) + time.perf_counter() - started,
        finished=time.time(), data=data.data_key, test_data=data.test_key, n_folds=int(fold_of.max()) + 1,
        fold_seed=chosen[0].record.fold_seed, source=data_source(paths), weights=weights, mean=mean,
        oof_acc_honest=honest)
