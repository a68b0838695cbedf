"""A run's folder, the one home of a run (runs/<id>/, a blend's runs/blend-<hex>/; docs/files.md
lists its files): its paths and id, its record (run.json, written last: the ensemble's files are
then complete), its folds' records, runs/latest, the listing of runs, and the ensemble's files that
predict and blend write. Every other module reads a run's files through this one, and its records as
typed records (RunRecord, FoldRecord), never as dicts read by key.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from functools import partialmethod
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypedDict

import numpy as np
import pandas as pd

from pipeline.config import Paths, Settings, fingerprint
from pipeline.errors import PipelineError
from pipeline.store.data import Prepared, Pseudo
from pipeline.store.fresh import Output
from pipeline.store.io import atomic_write_text, read_json, write_csv, write_json
from pipeline.store.submission import validate_file, validate_frame

CLASSES = 10
PROB_COLUMNS = [f"p{c}" for c in range(CLASSES)]
LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "seconds",
               "samples_per_s"]
# Run and study names: what a folder name may safely be (no separators, no leading dot).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
STUDIES = "tune"  # runs/tune/ holds the tuning studies; no run has this name
BLEND = "blend-"  # every blend's id starts so, and no trained run's (those start with their cell)


def check_name(name: str, what: str = "RUN") -> str:
    """A run or study name that stays inside its folder: no separators, no '..', no leading dot."""
    if not NAME.fullmatch(name or "") or ".." in name:
        raise PipelineError(f"{what}={name!r}: not a run name; names are letters, digits, '.', '_' "
                            "and '-' (no '/', no '..'); `make runs` lists them")
    return name


def run_id(cfg: Settings, data_key: str) -> str:
    """Readable and unique to what the models depend on: the learned settings and the data."""
    key = fingerprint({"settings": cfg.learned(), "data": data_key})
    view = "" if cfg.view == "rows" else f"-{cfg.view}"
    distilled = "-kd" if cfg.teacher else ""
    return f"{cfg.model}{view}-h{cfg.hidden}-e{cfg.epochs}{distilled}-{key[:6]}"


# -- the records ------------------------------------------------------------------------------------


_ADAPTERS: dict[type, Any] = {}


def _adapter(cls: type) -> Any:
    """pydantic's validator of a record type, built once (building one takes milliseconds, using it
    microseconds: `make runs` parses every run's record)."""
    if cls not in _ADAPTERS:
        from pydantic import TypeAdapter

        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


class Record:
    """A JSON record of a run, a plain dataclass checked by pydantic when it is read (parse), strictly:
    true is no number, 2.0 no whole number, NaN no number; keys it does not know are left out
    (records of older and newer versions load). pydantic is imported only then, so a command that
    reads no record starts as fast as before."""

    __pydantic_config__: ClassVar[dict[str, bool]] = {"strict": True, "allow_inf_nan": False}
    FIELDS: ClassVar[dict[str, str]] = {}  # the file's name of a field -> the field's, where they differ

    @classmethod
    def parse(cls, made: Any, where: Path) -> Self:
        """The record of a file's contents; a PipelineError naming the run, the file and the fields
        that are missing or not valid."""
        from pydantic import ValidationError

        named = f"{where.parent.name}/{where.name}"
        if not isinstance(made, dict):
            raise PipelineError(f"{named}: not a record")
        names = {v: k for k, v in cls.FIELDS.items()}
        values = {cls.FIELDS.get(k, k): v for k, v in cls.defaults(made).items()}
        try:  # JSON (its strict mode takes an object for a dataclass), as the file held it
            record = _adapter(cls).validate_json(json.dumps(values))
        except ValidationError as exc:
            bad = [names.get(str(e["loc"][0]), str(e["loc"][0])) if e["loc"] else "the record"
                   for e in exc.errors()]
        else:
            bad = record.problems()
        if bad:
            raise PipelineError(f"{named}: missing or not valid: {', '.join(sorted(set(bad)))}")
        return record

    @classmethod
    def defaults(cls, made: dict[str, Any]) -> dict[str, Any]:
        """What an older record lacks, filled in."""
        return made

    def problems(self) -> list[str]:
        """Fields that are each valid, but not together."""
        return []

    def dump(self) -> dict[str, Any]:
        """The record as its file holds it."""
        return {self.FIELDS.get(k, k): v for k, v in asdict(self).items()}  # type: ignore[call-overload]


@dataclass(frozen=True)
class KaggleOrigin(Record):
    """Where a run trained on Kaggle's machines came from (`make kaggle-run`)."""

    kernel: str  # owner/slug of the private kernel that trained it (deleted afterwards unless KEEP=1)
    version: int  # the kernel's version that ran
    accelerator: str  # the machine asked for: NvidiaTeslaT4, or none (a CPU session)

    @property
    def url(self) -> str:
        return f"https://www.kaggle.com/code/{self.kernel}"


@dataclass(frozen=True)
class RunRecord(Record):
    """run.json of a run (kind "run") or of a blend (kind "blend")."""

    model: str  # the cell (rnn, gru, lstm), or "blend"
    oof_acc: float  # out-of-fold accuracy (a blend's weights were fitted on the same rows)
    oof_loss: float
    fold_min: float  # the lowest and highest per-fold accuracy
    fold_max: float
    seconds: float  # training and prediction (a blend: its members' too)
    finished: float  # time.time() when written
    data: str  # the prepared data's key
    n_folds: int  # `folds` in run.json
    fold_seed: int | None
    kind: Literal["run", "blend"] = "run"
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
    FIELDS: ClassVar[dict[str, str]] = {"folds": "n_folds"}

    @classmethod
    def defaults(cls, made: dict[str, Any]) -> dict[str, Any]:
        # Records from before FOLD_SEED kept the seed that drew the folds as seed.
        return {"fold_seed": made.get("seed"), "model": "blend" if made.get("kind") == "blend" else "",
                **made}

    def problems(self) -> list[str]:
        bad = ["key"] * (not self.key) + ["oof_acc_honest"] * (
            self.kind == "blend" and self.oof_acc_honest is None)
        try:
            datetime.fromtimestamp(self.finished)
        except (OverflowError, OSError, ValueError):
            bad.append("finished")
        return bad

    @property
    def where(self) -> str:
        """The device it trained on, marked when that was on Kaggle."""
        return f"Kaggle: {self.device}" if self.kaggle else self.device

    @property
    def accuracy(self) -> float:
        """The figure to rank it by: a blend's honest accuracy, a run's OOF accuracy."""
        return self.oof_acc if self.oof_acc_honest is None else self.oof_acc_honest

    def members(self) -> str:
        """A blend's members as `id xN` words."""
        return ", ".join(f"{k} x{v}" for k, v in self.weights.items())


@dataclass(frozen=True)
class FoldRecord(Record):
    """fold_<k>.json: a finished fold's best epoch, its held-out scores, its time and device, and
    (the freshness rule's) the inputs it was made from with their key."""

    fold: int
    best_epoch: int
    valid_loss: float
    valid_acc: float
    seconds: float
    device: str
    trained_at: float
    inputs: dict[str, Any] = field(default_factory=dict)
    key: str = ""


# -- one run's folder ---------------------------------------------------------------------------------

class RunDir:
    """The files of one run folder, and its records."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.id = self.path.name
        self.config, self.record = self.path / "config.json", self.path / "run.json"
        self.cv, self.oof, self.test = self.path / "cv.csv", self.path / "oof.csv", self.path / "test.csv"
        self.submission, self.blend = self.path / "submission.csv", self.path / "blend.json"

    @property
    def is_blend(self) -> bool:
        """A blend's folder (made by blend, never trained): the one way a blend is told."""
        return self.id.startswith(BLEND)

    def _of_fold(self, name: str, fold: int) -> Path:
        return self.path / name.format(fold)

    # A fold's files, each called with the fold's number.
    model = partialmethod(_of_fold, "fold_{}.pt")
    fold_record = partialmethod(_of_fold, "fold_{}.json")
    state = partialmethod(_of_fold, "fold_{}.state.pt")  # the resumable state of a fold in training
    log = partialmethod(_of_fold, "fold_{}.csv")
    oof_fold = partialmethod(_of_fold, "oof_{}.csv")
    test_fold = partialmethod(_of_fold, "test_{}.csv")

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def remake(self) -> str:
        """How damaged ensemble files are made again: a run's by predict, a blend's by blend."""
        return ("`make blend FORCE=1` with its runs remakes it" if self.is_blend
                else f"`make predict RUN={self.id} FORCE=1` remakes it")

    # -- its records ------------------------------------------------------------------------------

    def _contents(self) -> Any | None:
        """run.json as JSON; None when there is none (not predicted yet); a PipelineError naming it
        when it cannot be read or is not JSON (a write cut short): damaged, not missing."""
        named = f"{self.id}/{self.record.name}"
        try:
            return json.loads(self.record.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{named}: not valid JSON at line {exc.lineno} column {exc.colno} "
                                "(truncated or damaged)") from None
        except (OSError, ValueError) as exc:  # a folder, no permission, not UTF-8
            raise PipelineError(f"{named}: unreadable ({exc})") from None

    def read(self) -> RunRecord:
        """The run's record; a PipelineError when it is missing or damaged."""
        if (made := self._contents()) is None:
            raise PipelineError(f"{self.id}/{self.record.name}: missing")
        return RunRecord.parse(made, self.record)

    def completed(self) -> RunRecord | None:
        """The record when the run's predictions are complete and all its files are there, else
        None; a PipelineError when run.json is damaged (not JSON, or complete with a field not valid)."""
        if (made := self._contents()) is not None and not isinstance(made, dict):
            RunRecord.parse(made, self.record)  # names it: not a record
        if made and made.get("complete") and all(p.is_file() for p in (self.oof, self.test, self.submission)):
            return RunRecord.parse(made, self.record)
        return None

    def source(self) -> str | None:
        """Where the data of its record came from, read even from a damaged record (None if none)."""
        try:
            made = self._contents()
        except PipelineError:
            return None
        return str(made.get("source")) if isinstance(made, dict) else None

    def save(self, record: RunRecord) -> RunRecord:
        """Write run.json (the record is complete: its files were written before)."""
        write_json(self.record, {"complete": True, **record.dump()})
        return record

    def ensemble(self, inputs: dict[str, Any], n_train: int, n_test: int) -> Output:
        """The ensemble's files as the freshness rule's output, run.json its record."""
        return Output(self.record, inputs, (self.oof, self.test, self.cv, self.submission),
                      check=lambda: self.check(n_train, n_test))

    def finish(self, made: Output, record: RunRecord) -> RunRecord:
        """Write the record that makes the ensemble's files current."""
        facts = {k: v for k, v in record.dump().items() if k not in ("key", "inputs")}
        written = made.mark(complete=True, **facts)
        return replace(record, key=written["key"], inputs=written["inputs"])

    def fold(self, fold: int) -> FoldRecord:
        """A finished fold's record; a PipelineError when it is missing or damaged."""
        if (made := read_json(self.fold_record(fold))) is None:
            raise PipelineError(f"{self.fold_record(fold)}: missing or unreadable")
        return FoldRecord.parse(made, self.fold_record(fold))

    def teacher_key(self, n_folds: int) -> str | None:
        """The teacher's key the trained folds of a distilled run recorded (one key, else None):
        what keeps them current once the teacher itself is gone."""
        keys = set()
        for fold in range(n_folds):
            with contextlib.suppress(PipelineError):
                keys.add(self.fold(fold).inputs.get("teacher"))
        keys.discard(None)
        return str(keys.pop()) if len(keys) == 1 else None

    def settings(self) -> dict[str, Any]:
        """config.json as a table of settings ({} when there is none)."""
        if not isinstance(found := read_json(self.config) or {}, dict):
            raise PipelineError(f"{self.config.name} is not a table of settings")
        return found

    # -- the ensemble's files -----------------------------------------------------------------------

    def write(self, oof: np.ndarray, test: np.ndarray, labels: np.ndarray, fold_of: np.ndarray,
              fold_records: list[FoldRecord] | None = None) -> pd.DataFrame:
        """oof.csv, test.csv, cv.csv and submission.csv of an ensemble; returns cv.csv's table.
        fold_records: a run's, whose best epoch and seconds join its cv.csv rows."""
        labels = labels.astype(np.int64)
        ids = np.arange(1, len(test) + 1)
        frame = pd.DataFrame({"ImageId": ids, "Label": test.argmax(1).astype(np.int64)})
        validate_frame(frame, expected_rows=len(test), where="ensemble")
        self.path.mkdir(parents=True, exist_ok=True)
        # The old record no longer describes these files: an interrupted rewrite is never "current".
        self.record.unlink(missing_ok=True)
        write_probabilities(self.oof, oof, {"row": np.arange(len(labels)), "label": labels})
        write_probabilities(self.test, test, {"ImageId": ids})
        groups = [*(fold_of == k for k in range(int(fold_of.max()) + 1)), np.ones(len(labels), bool)]
        cv = pd.DataFrame({"fold": [*map(str, range(len(groups) - 1)), "all"],
                           "valid_loss": [log_loss(oof[g], labels[g]) for g in groups],
                           "valid_acc": [accuracy(oof[g], labels[g]) for g in groups],
                           "rows": [int(g.sum()) for g in groups]})
        if fold_records is not None:
            cv.insert(1, "best_epoch", [*(f.best_epoch for f in fold_records), ""])
            seconds = [round(f.seconds, 2) for f in fold_records]
            cv["seconds"] = [*seconds, round(sum(f.seconds for f in fold_records), 2)]
        write_csv(self.cv, cv)
        write_csv(self.submission, frame)
        return cv

    def check(self, n_train: int, n_test: int) -> RunRecord:
        """The ensemble's files as its record says they are: run.json, submission.csv, oof.csv,
        test.csv and cv.csv (a row per fold) complete and readable; else a PipelineError."""
        record = self.read()
        validate_file(self.submission, n_test)
        self.probabilities(n_train, n_test)
        self.cv_table(record.n_folds)
        return record

    def probabilities(self, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
        """The out-of-fold and test probabilities, (n_train, 10) and (n_test, 10): oof.csv must hold
        every train row once, in order, and test.csv every test row, all finite; else a
        PipelineError saying how to remake them (a truncated file is damaged too)."""
        found = []
        for path, index, n, first in ((self.oof, "row", n_train, 0), (self.test, "ImageId", n_test, 1)):
            ids, probs = read_probabilities(path, index)
            if len(ids) != n or not np.array_equal(ids, np.arange(first, n + first)):
                raise PipelineError(f"{path}: {len(ids)} rows, not the {n} rows of the data in order "
                                    f"(truncated or damaged); {self.remake()}")
            if not np.isfinite(probs).all():
                raise PipelineError(f"{path}: holds values that are not numbers; {self.remake()}")
            found.append(probs)
        return found[0], found[1]

    def cv_table(self, n_folds: int) -> pd.DataFrame:
        """cv.csv: a row per fold 0..n_folds-1, then the row `all`, with numeric valid_loss and
        valid_acc; else a PipelineError saying how to remake it."""
        try:
            cv = pd.read_csv(self.cv, dtype={"fold": str})
            fold_ids = list(cv["fold"])
            numbers = cv[["valid_loss", "valid_acc"]].to_numpy(dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{self.cv}: not a readable cross-validation table ({exc}); "
                                f"{self.remake()}") from exc
        if fold_ids != [str(f) for f in range(n_folds)] + ["all"] or not np.isfinite(numbers).all():
            raise PipelineError(f"{self.cv}: expected a row for each of folds 0 to {n_folds - 1}, then "
                                f"`all`, with numbers; found folds {', '.join(map(str, fold_ids)) or 'none'} "
                                f"(truncated or damaged); {self.remake()}")
        return cv


@dataclass(frozen=True)
class Plan:
    """A run to make: its settings and folder, the data and folds it learns from and, when it is
    distilled, its teacher's rows. The command line makes it; train, predict and kaggle-run take it."""

    cfg: Settings
    paths: Paths
    run: RunDir
    data: Prepared
    fold_of: np.ndarray
    pseudo: Pseudo | None = None


# -- the runs of a project ------------------------------------------------------------------------

def run_dir(paths: Paths, name: str) -> RunDir:
    return RunDir(paths.runs / check_name(name))


def studies_dir(paths: Paths) -> Path:
    """runs/tune/: the tuning studies (make tune), one folder each; not a run."""
    return paths.runs / STUDIES


def all_runs(paths: Paths) -> list[RunDir]:
    if not paths.runs.is_dir():
        return []
    return sorted((RunDir(p) for p in paths.runs.iterdir()
                   if p.is_dir() and NAME.fullmatch(p.name) and p.name != STUDIES), key=lambda r: r.id)


def complete(run: RunDir) -> RunRecord | None:
    """The record of a complete run, None when it is not complete or damaged (a listing goes on)."""
    try:
        return run.completed()
    except PipelineError:
        return None


def newest(paths: Paths) -> RunDir | None:
    """The complete run or blend that finished last (a damaged one is left out); None for none."""
    found = [(r.finished, run.id) for run in all_runs(paths) if (r := complete(run)) is not None]
    return RunDir(paths.runs / max(found)[1]) if found else None


def set_latest(paths: Paths, name: str) -> None:
    if latest(paths) != name:
        atomic_write_text(paths.runs / "latest", name + "\n")


def latest(paths: Paths) -> str | None:
    try:
        name = (paths.runs / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name if NAME.fullmatch(name) else None


# -- probabilities and scores -----------------------------------------------------------------------

def write_probabilities(path: Path, probs: np.ndarray, front: dict[str, np.ndarray]) -> None:
    columns = dict(zip(PROB_COLUMNS, probs.T, strict=True))
    write_csv(path, pd.DataFrame({**front, **columns}), float_format="%.6g")


def read_probabilities(path: Path, index: str) -> tuple[np.ndarray, np.ndarray]:
    """(the index column, the (N, 10) probabilities) of a file write_probabilities wrote."""
    try:
        frame = pd.read_csv(path)
        return frame[index].to_numpy(), frame[PROB_COLUMNS].to_numpy(dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"{path}: unreadable probabilities ({exc})") from exc


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's log_loss of float64 probabilities (rows renormalised, clipped to [eps, 1 - eps];
    a test checks they agree), written out: blend's greedy search calls it thousands of times."""
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


def scores(cv: pd.DataFrame) -> Scores:
    """A record's scores, read off the cv.csv table write() made: the out-of-fold accuracy and log
    loss (its row `all`) and the lowest and highest per-fold accuracy."""
    per_fold, total = cv["valid_acc"].iloc[:-1], cv.iloc[-1]
    return Scores(oof_acc=float(total["valid_acc"]), oof_loss=float(total["valid_loss"]),
                  fold_min=float(per_fold.min()), fold_max=float(per_fold.max()))
