"""File formats and names every stage shares, and the one rule for "is this output current".

The rule: an output records the inputs it was made from (a small dict) in a JSON record; a stage
reruns when the record is missing, its inputs differ from the current ones, an output file is
missing, or an output fails its check (damaged). `stale()` answers with the reason in words, which
needs_rerun() prints in one line. Prepare, folds, train, predict and blend all use it.

Layout:
    input/prepared/{train_x,train_y,test_x}.npy + meta.json     the pixel cache (prepare)
    input/folds.csv + folds.json                                 the fold of every train row (folds)
    runs/<id>/                                                   one run (train, predict)
        config.json  fold_<k>.pt  fold_<k>.json  fold_<k>.state.pt  fold_<k>.csv
        oof_<k>.csv  test_<k>.csv  cv.csv  oof.csv  test.csv  submission.csv  run.json
    runs/blend-<hex>/  blend.json, oof.csv, test.csv, cv.csv, submission.csv, run.json  (blend)
    runs/latest                                                  the id of the last completed run
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import FOLD_SETTINGS, Paths, Settings, fingerprint
from pipeline.errors import PipelineError
from pipeline.store.io import atomic_path, atomic_write_text, read_json, write_csv, write_json

CLASSES = 10
PIXELS = [f"pixel{k}" for k in range(784)]
PROB_COLUMNS = [f"p{c}" for c in range(CLASSES)]
LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "seconds",
               "samples_per_s"]
CACHE_VERSION = 2
# Run and study names: what a folder name may safely be (no separators, no leading dot).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
STUDIES = "tune"  # runs/tune/ holds the tuning studies; no run has this name


# -- the one freshness rule -----------------------------------------------------------------------

def stale(record: Path, inputs: dict[str, Any], outputs: Iterable[Path] = (),
          check: Callable[[], object] | None = None) -> str:
    """'' when the outputs are current; else why not, in words ("train.csv changed").

    check: raises PipelineError when an output is damaged (its message becomes the reason).
    """
    if not record.exists():
        return "not made yet"
    for path in outputs:
        if not path.is_file():
            return f"{path.name} is missing"
    made = read_json(record)
    if not isinstance(made, dict) or not isinstance(made.get("inputs"), dict):
        return f"{record.name} is missing or unreadable"
    if made.get("key") != fingerprint(inputs):
        before = made["inputs"]
        changed = [k for k in sorted(set(inputs) | set(before)) if inputs.get(k) != before.get(k)]
        return f"{', '.join(changed) or 'its inputs'} changed"
    if check is not None:
        try:
            check()
        except PipelineError as exc:
            return f"damaged ({exc})"
    return ""


def needs_rerun(said: str, record: Path, inputs: dict[str, Any], outputs: Iterable[Path] = (),
                check: Callable[[], object] | None = None, force: bool = False,
                current: str = "current") -> str:
    """The rule as every stage applies it: why the outputs must be made again ('' when they are
    current: FORCE=1 is a reason too), said in one line, `<said> reruns: <why>` or
    `<said> skipped: <current>`. The stage then makes them and marks them with mark_current."""
    why = "FORCE=1" if force else stale(record, inputs, outputs, check=check)
    print(f"{said} reruns: {why}" if why else f"{said} skipped: {current}")
    return why


def mark_current(record: Path, inputs: dict[str, Any], **facts: Any) -> dict[str, Any]:
    """Write the record that makes the outputs current: the inputs, their key and any facts.
    Returns the record as written."""
    made = {**facts, "inputs": inputs, "key": fingerprint(inputs)}
    write_json(record, made)
    return made


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


# -- prepared pixel cache -------------------------------------------------------------------------

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


def array_paths(paths: Paths) -> dict[str, Path]:
    return {name: paths.prepared / f"{name}.npy" for name in ("train_x", "train_y", "test_x")}


def digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha1()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(str(arrays[name].shape).encode())
        h.update(np.ascontiguousarray(arrays[name]).data)
    return h.hexdigest()[:16]


def save_prepared(paths: Paths, arrays: dict[str, np.ndarray], inputs: dict[str, Any]) -> str:
    key = digest(arrays)
    for name, target in array_paths(paths).items():
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            np.save(handle, arrays[name], allow_pickle=False)
    mark_current(paths.prepared / "meta.json", inputs, version=CACHE_VERSION, data_key=key,
                 n_train=len(arrays["train_x"]), n_test=len(arrays["test_x"]))
    return key


def load_prepared(paths: Paths) -> Prepared:
    """The prepared arrays, checked against the digest recorded when they were written."""
    meta = read_json(paths.prepared / "meta.json")
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
        raise PipelineError(f"{paths.prepared}: no prepared data (make prepare builds it)")
    arrays = {}
    for name, path in array_paths(paths).items():
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise PipelineError(f"{path}: the prepared cache is missing or unreadable ({exc})") from exc
    if digest(arrays) != meta.get("data_key"):
        raise PipelineError(f"{paths.prepared}: the prepared cache does not match its record")
    return Prepared(**arrays, data_key=meta["data_key"])


# -- folds ----------------------------------------------------------------------------------------

def folds_inputs(data_key: str, cfg: Settings) -> dict[str, Any]:
    """What folds.csv is made from: the data and the fold settings (each also in every run's id)."""
    return {"data": data_key, **{name: getattr(cfg, name) for name in FOLD_SETTINGS}}


def read_folds(paths: Paths) -> np.ndarray:
    import pandas as pd

    try:
        return pd.read_csv(paths.folds_csv)["fold"].to_numpy(dtype=np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"{paths.folds_csv}: unreadable ({exc})") from exc


# -- probabilities --------------------------------------------------------------------------------

def write_probabilities(path: Path, probs: np.ndarray, front: dict[str, np.ndarray]) -> None:
    import pandas as pd

    frame = pd.DataFrame(front)
    for c, name in enumerate(PROB_COLUMNS):
        frame[name] = probs[:, c]
    write_csv(path, frame, float_format="%.6g")


def read_probabilities(path: Path, index: str) -> tuple[np.ndarray, np.ndarray]:
    """(the index column, the (N, 10) probabilities) of a file write_probabilities wrote."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
        return frame[index].to_numpy(), frame[PROB_COLUMNS].to_numpy(dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"{path}: unreadable probabilities ({exc})") from exc


# -- runs -----------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class RunDir:
    """The files of one run folder."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def record(self) -> Path:
        """run.json: written last, when the run's predictions are complete."""
        return self.path / "run.json"

    @property
    def cv(self) -> Path:
        return self.path / "cv.csv"

    @property
    def oof(self) -> Path:
        return self.path / "oof.csv"

    @property
    def test(self) -> Path:
        return self.path / "test.csv"

    @property
    def submission(self) -> Path:
        return self.path / "submission.csv"

    @property
    def blend(self) -> Path:
        return self.path / "blend.json"

    def model(self, fold: int) -> Path:
        return self.path / f"fold_{fold}.pt"

    def fold_record(self, fold: int) -> Path:
        return self.path / f"fold_{fold}.json"

    def state(self, fold: int) -> Path:
        """The resumable end-of-epoch state of a fold still in training."""
        return self.path / f"fold_{fold}.state.pt"

    def log(self, fold: int) -> Path:
        return self.path / f"fold_{fold}.csv"

    def oof_fold(self, fold: int) -> Path:
        return self.path / f"oof_{fold}.csv"

    def test_fold(self, fold: int) -> Path:
        return self.path / f"test_{fold}.csv"

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


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


def set_latest(paths: Paths, name: str) -> None:
    if latest(paths) != name:
        atomic_write_text(paths.runs / "latest", name + "\n")


def latest(paths: Paths) -> str | None:
    try:
        name = (paths.runs / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name if NAME.fullmatch(name) else None


# -- where the data came from ---------------------------------------------------------------------

SAMPLE_BANNER = (
    "*** Using the BUILT-IN SAMPLE (scikit-learn's 1,797 digits, resized to 28x28), not the "
    "competition data. Good for trying the pipeline; its submission is not for Kaggle. ***"
)


def data_source(paths: Paths) -> str:
    """Which source the files in input/ came from ('unknown' for files put there by hand)."""
    record = read_json(paths.source_json) or {}
    return str(record.get("source", "unknown"))
