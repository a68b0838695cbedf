"""An ensemble's files and its record: what predict writes for a run and blend for a blend.

    oof.csv         every train row's probabilities, from models that never saw it (row, label, p0..p9)
    test.csv        every test row's averaged probabilities (ImageId, p0..p9)
    cv.csv          a row per fold (valid_loss, valid_acc, rows; a run adds best_epoch, seconds), then `all`
    submission.csv  ImageId, Label: the test rows' most likely digit
    run.json        the record (RunRecord), written last: the files above are then complete

write() writes the four files, finish() then run.json; completed(), read() and check() read them
back. Every other module reads a run's record as a RunRecord, never as a dict.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from pipeline.config import Paths
from pipeline.errors import PipelineError
from pipeline.store.artifacts import RunDir, all_runs, mark_current, read_probabilities, write_probabilities
from pipeline.store.io import write_csv, write_json
from pipeline.store.submission import validate_file, validate_frame

KINDS = ("run", "blend")


@dataclass(frozen=True)
class KaggleOrigin:
    """Where a run trained on Kaggle's machines came from (`make kaggle-run`)."""

    kernel: str  # owner/slug of the private kernel that trained it (deleted afterwards unless KEEP=1)
    version: int  # the kernel's version that ran
    accelerator: str  # the machine asked for: NvidiaTeslaT4, or none (a CPU session)

    @property
    def url(self) -> str:
        return f"https://www.kaggle.com/code/{self.kernel}"


@dataclass(frozen=True)
class RunRecord:
    """run.json of a run (kind "run") or of a blend (kind "blend")."""

    kind: str
    model: str  # the cell (rnn, gru, lstm), or "blend"
    oof_acc: float  # out-of-fold accuracy (a blend's weights were fitted on the same rows)
    oof_loss: float
    fold_min: float  # the lowest and highest per-fold accuracy
    fold_max: float
    seconds: float  # training and prediction (a blend: its members' too)
    finished: float  # time.time() when written
    data: str  # the prepared data's key
    folds: int
    fold_seed: int | None
    source: str = "unknown"  # where input/ came from: kaggle, dir, sample or unknown
    device: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # a run's learned settings (and tta)
    seed: int | None = None
    tta: int = 0
    oof_acc_tta: float | None = None  # with TTA, the held-out accuracy of the same passes
    train_seconds: float | None = None
    oof_acc_honest: float | None = None  # a blend: each fold scored by weights fitted without it
    weights: dict[str, int] = field(default_factory=dict)  # a blend: member id -> times picked
    mean: str | None = None  # a blend: prob or logprob
    kept: str = ""  # the kept copy of its submission in submissions/
    key: str = ""  # the fingerprint of the inputs it was made from (the freshness rule)
    test_data: str = ""  # the test images' key alone (Prepared.test_key; "" in older records)
    inputs: dict[str, Any] = field(default_factory=dict)
    kaggle: KaggleOrigin | None = None  # trained on Kaggle (`make kaggle-run`), not here

    @property
    def where(self) -> str:
        """The device it trained on, marked when that was on Kaggle."""
        return f"Kaggle: {self.device}" if self.kaggle else self.device

    @property
    def is_blend(self) -> bool:
        return self.kind == "blend"

    @property
    def accuracy(self) -> float:
        """The figure to rank it by: a blend's honest accuracy, a run's OOF accuracy."""
        return self.oof_acc_honest if self.is_blend and self.oof_acc_honest is not None else self.oof_acc

    def members(self) -> str:
        """A blend's members as `id xN` words."""
        return ", ".join(f"{k} x{v}" for k, v in self.weights.items())


NUMBERS = ("oof_acc", "oof_loss", "fold_min", "fold_max", "seconds", "finished")
_OPTIONAL_NUMBERS = ("oof_acc_tta", "train_seconds", "oof_acc_honest")


def parse(made: Any, where: Path) -> RunRecord:
    """The record of a run.json's contents; a PipelineError naming the file and the field when it
    is damaged. Keys it does not know are ignored (records of older and newer versions load)."""
    named = f"{where.parent.name}/{where.name}"  # the run's folder and its file
    if not isinstance(made, dict):
        raise PipelineError(f"{named}: not a record")

    def number(name: str) -> bool:
        value = made.get(name)
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    bad = [k for k in NUMBERS if not number(k)]
    if "finished" not in bad:  # a time a date can be made of
        try:
            datetime.fromtimestamp(made["finished"])
        except (OverflowError, OSError, ValueError):
            bad.append("finished")
    bad += [k for k in _OPTIONAL_NUMBERS if made.get(k) is not None and not number(k)]
    if made.get("kind", "run") not in KINDS:
        bad.append("kind")
    if not isinstance(made.get("key"), str) or not made["key"]:
        bad.append("key")
    for name, kind in (("config", dict), ("weights", dict), ("inputs", dict), ("model", str),
                       ("data", str), ("kept", str), ("device", str), ("source", str), ("test_data", str)):
        if name in made and not isinstance(made[name], kind):
            bad.append(name)
    for name, required in (("folds", True), ("tta", False), ("seed", False), ("fold_seed", False)):
        value = made.get(name)
        if (value is not None or required) and (not isinstance(value, int) or isinstance(value, bool)):
            bad.append(name)
    if made.get("mean") is not None and not isinstance(made["mean"], str):
        bad.append("mean")
    if made.get("kind") == "blend" and not number("oof_acc_honest"):
        bad.append("oof_acc_honest")
    origin = _kaggle_origin(made.get("kaggle"))
    if origin is False:
        bad.append("kaggle")
    if bad:
        raise PipelineError(f"{named}: missing or not valid: {', '.join(sorted(set(bad)))}")
    known = {f.name for f in fields(RunRecord)}
    values = {k: v for k, v in made.items() if k in known}
    # Records from before FOLD_SEED kept the seed that drew the folds as seed.
    values.setdefault("fold_seed", made.get("seed"))
    values.setdefault("kind", "run")
    values.setdefault("model", "blend" if values["kind"] == "blend" else "")
    values["kaggle"] = origin
    return RunRecord(**values)


def _contents(run: RunDir) -> Any | None:
    """run.json as JSON; None when there is none (not predicted yet); a PipelineError naming it
    when it cannot be read or is not JSON (a write cut short): a damaged record, not a missing one."""
    named = f"{run.id}/{run.record.name}"
    try:
        text = run.record.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{named}: unreadable ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{named}: not valid JSON at line {exc.lineno} column {exc.colno} "
                            "(truncated or damaged)") from None
def _kaggle_origin(made: Any) -> KaggleOrigin | bool | None:
    """The record's `kaggle` field as a KaggleOrigin (None when absent), False when it is damaged.
    Keys it does not know are ignored, as in the rest of the record."""
    if made is None:
        return None
    if not isinstance(made, dict):
        return False
    kernel, version, accelerator = made.get("kernel"), made.get("version"), made.get("accelerator")
    if not (isinstance(kernel, str) and isinstance(accelerator, str) and isinstance(version, int)
            and not isinstance(version, bool)):
        return False
    return KaggleOrigin(kernel=kernel, version=version, accelerator=accelerator)


def read(run: RunDir) -> RunRecord:
    """The run's record; a PipelineError when it is missing or damaged."""
    made = _contents(run)
    if made is None:
        raise PipelineError(f"{run.id}/{run.record.name}: missing")
    return parse(made, run.record)


def completed(run: RunDir) -> RunRecord | None:
    """A run's record when its predictions are complete and all its files are there, else None;
    a PipelineError when run.json is damaged (not JSON, or complete with a field not valid)."""
    made = _contents(run)
    if made is not None and not isinstance(made, dict):
        parse(made, run.record)  # names it: not a record
    if not isinstance(made, dict) or not made.get("complete"):
        return None
    if not all(p.is_file() for p in (run.oof, run.test, run.submission)):
        return None
    return parse(made, run.record)


def newest(paths: Paths) -> RunDir | None:
    """The complete run or blend that finished last (a damaged one is left out); None for none."""
    found = []
    for run in all_runs(paths):
        try:
            record = completed(run)
        except PipelineError:
            continue
        if record is not None:
            found.append((record.finished, run.id))
    return RunDir(paths.runs / max(found)[1]) if found else None


def save(run: RunDir, record: RunRecord) -> RunRecord:
    """Write run.json (the record is complete: its files were written before)."""
    write_json(run.record, {"complete": True, **asdict(record)})
    return record


def finish(run: RunDir, inputs: dict[str, Any], record: RunRecord) -> RunRecord:
    """Write the record that makes the ensemble's files current (the freshness rule's mark)."""
    facts = {k: v for k, v in asdict(record).items() if k not in ("key", "inputs")}
    made = mark_current(run.record, inputs, complete=True, **facts)
    return replace(record, key=made["key"], inputs=made["inputs"])


# -- scores ---------------------------------------------------------------------------------------

def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class, rows renormalised and clipped to [eps,
    1 - eps] (float64's), as scikit-learn's log_loss does for float64 probabilities, all the pipeline
    has (a test checks they agree). Written out because blend's greedy search calls it thousands of
    times, and this is a hundred times faster."""
    eps = np.finfo(np.float64).eps
    rows = probs.astype(np.float64, copy=False)
    true = rows[np.arange(len(labels)), labels] / np.maximum(rows.sum(1), eps)
    return float(-np.log(np.clip(true, eps, 1 - eps)).mean())


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


class Scores(TypedDict):
    oof_acc: float
    oof_loss: float
    fold_min: float
    fold_max: float


def scores(cv: Any) -> Scores:
    """A record's scores, read off the cv.csv table write() made: the out-of-fold accuracy and log
    loss (its row `all`) and the lowest and highest per-fold accuracy."""
    per_fold, total = cv["valid_acc"].iloc[:-1], cv.iloc[-1]
    return Scores(oof_acc=float(total["valid_acc"]), oof_loss=float(total["valid_loss"]),
                  fold_min=float(per_fold.min()), fold_max=float(per_fold.max()))


# -- the ensemble's files -------------------------------------------------------------------------

def write(out: RunDir, oof: np.ndarray, test: np.ndarray, labels: np.ndarray, fold_of: np.ndarray,
          fold_facts: list[dict[str, Any]] | None = None) -> Any:
    """oof.csv, test.csv, cv.csv and submission.csv of an ensemble; returns cv.csv's table.

    fold_facts: a run's fold records (best_epoch, seconds), added to its cv.csv rows."""
    labels = labels.astype(np.int64)
    ids = np.arange(1, len(test) + 1)
    frame = _submission(ids, test)
    out.path.mkdir(parents=True, exist_ok=True)
    # The old record no longer describes these files: an interrupted rewrite is never "current".
    out.record.unlink(missing_ok=True)
    write_probabilities(out.oof, oof, {"row": np.arange(len(labels)), "label": labels})
    write_probabilities(out.test, test, {"ImageId": ids})
    import pandas as pd

    groups = [*(fold_of == k for k in range(int(fold_of.max()) + 1)), np.ones(len(labels), bool)]
    cv = pd.DataFrame({"fold": [*map(str, range(len(groups) - 1)), "all"],
                       "valid_loss": [log_loss(oof[g], labels[g]) for g in groups],
                       "valid_acc": [accuracy(oof[g], labels[g]) for g in groups],
                       "rows": [int(g.sum()) for g in groups]})
    if fold_facts is not None:
        cv.insert(1, "best_epoch", [*(f["best_epoch"] for f in fold_facts), ""])
        seconds = [round(f["seconds"], 2) for f in fold_facts]
        cv["seconds"] = [*seconds, round(sum(f["seconds"] for f in fold_facts), 2)]
    write_csv(out.cv, cv)
    write_csv(out.submission, frame)
    return cv


def _submission(ids: np.ndarray, test: np.ndarray) -> Any:
    import pandas as pd

    frame = pd.DataFrame({"ImageId": ids, "Label": test.argmax(1).astype(np.int64)})
    validate_frame(frame, expected_rows=len(test), where="ensemble")
    return frame


def check(run: RunDir, n_train: int, n_test: int) -> RunRecord:
    """An ensemble's files as its record says they are: run.json, submission.csv, oof.csv, test.csv
    and cv.csv (a row per fold of the record) all complete and readable; a PipelineError naming what
    is damaged."""
    record = read(run)
    validate_file(run.submission, n_test)
    check_probabilities(run, n_train, n_test)
    check_cv(run.cv, record.folds)
    return record


def remake(run: RunDir) -> str:
    """How a damaged ensemble's files are made again: a run by predict, a blend by blend."""
    if run.id.startswith("blend-"):
        return "`make blend FORCE=1` with its runs remakes it"
    return f"`make predict RUN={run.id} FORCE=1` remakes it"


def check_probabilities(run: RunDir, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """A run's out-of-fold and test probabilities, (n_train, 10) and (n_test, 10). oof.csv must hold
    every train row once, in order, and test.csv every test row, all finite; else a PipelineError
    saying how to remake them (a truncated file is damaged too)."""
    fix = remake(run)
    found = []
    for path, index, n in ((run.oof, "row", n_train), (run.test, "ImageId", n_test)):
        ids, probs = read_probabilities(path, index)
        first = 0 if index == "row" else 1
        if len(ids) != n or not np.array_equal(ids, np.arange(first, n + first)):
            raise PipelineError(f"{path}: {len(ids)} rows, not the {n} rows of the data in order "
                                f"(truncated or damaged); {fix}")
        if not np.isfinite(probs).all():
            raise PipelineError(f"{path}: holds values that are not numbers; {fix}")
        found.append(probs)
    return found[0], found[1]


def check_cv(path: Path, n_folds: int) -> Any:
    """cv.csv as a table: a row per fold 0..n_folds-1, then the row `all`, with numeric valid_loss
    and valid_acc; else a PipelineError saying how to remake it."""
    import pandas as pd

    fix = remake(RunDir(path.parent))
    try:
        cv = pd.read_csv(path, dtype={"fold": str})
        folds = list(cv["fold"])
        numbers = cv[["valid_loss", "valid_acc"]].to_numpy(dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a readable cross-validation table ({exc}); {fix}") from exc
    if folds != [str(f) for f in range(n_folds)] + ["all"] or not np.isfinite(numbers).all():
        raise PipelineError(f"{path}: expected a row for each of folds 0 to {n_folds - 1}, then `all`, "
                            f"with numbers; found folds {', '.join(map(str, folds)) or 'none'} "
                            f"(truncated or damaged); {fix}")
    return cv

