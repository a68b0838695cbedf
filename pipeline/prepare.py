"""The prepare stage: competition CSVs -> validated uint8 arrays in input/prepared/.

Pixel k of a CSV row lands at image row k // 28, column k % 28, and image row r is time step r of
the recurrent models. Parsing takes a fast path (pandas' C parser plus vectorised checks); only when
that finds something wrong does a slow scanner walk the file to name the exact line and column.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Paths
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, read_json, write_json

PIXELS = [f"pixel{k}" for k in range(784)]
CACHE_VERSION = 1


@dataclass
class Prepared:
    train_x: np.ndarray  # uint8 (N, 28, 28)
    train_y: np.ndarray  # uint8 (N,)
    test_x: np.ndarray  # uint8 (M, 28, 28)
    data_key: str  # fingerprint of the three arrays


def to_images(flat: np.ndarray) -> np.ndarray:
    """(N, 784) pixels -> (N, 28, 28): pixel k at row k // 28, column k % 28."""
    return np.ascontiguousarray(flat.reshape(-1, 28, 28))


# -- reading and validating one CSV --------------------------------------------------------------

def read_competition_csv(path: Path, labelled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Read train.csv (labelled) or test.csv; returns uint8 images and uint8 labels (or None)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: the file is empty; expected a header line and one row per image")
    names = _read_header(path, labelled)
    try:
        values = _fast_parse(path, names)
    except Exception:
        values = None
    if values is None:
        _diagnose(path, names, labelled)
        raise PipelineError(f"{path}: could not be parsed as a competition CSV")
    order = [names.index(c) for c in (["label"] if labelled else []) + PIXELS]
    values = values[:, order]
    labels = values[:, 0].astype(np.uint8) if labelled else None
    images = to_images(values[:, 1:] if labelled else values).astype(np.uint8)
    return images, labels


def _read_header(path: Path, labelled: bool) -> list[str]:
    with open(path, "rb") as handle:
        raw = handle.readline()
    try:
        line = raw.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: line 1: not UTF-8 text (byte {exc.start}); "
                            "expected a CSV header like label,pixel0,...,pixel783") from exc
    names = [n.strip().strip('"') for n in line.split(",")]
    expected = (["label"] if labelled else []) + PIXELS
    what = "train.csv (label,pixel0..pixel783)" if labelled else "test.csv (pixel0..pixel783)"
    seen: set[str] = set()
    for col, name in enumerate(names, start=1):
        if name in seen:
            raise PipelineError(f"{path}: line 1, column {col}: duplicated column name {name!r}")
        seen.add(name)
        if name == "label" and not labelled:
            raise PipelineError(f"{path}: line 1, column {col}: a 'label' column in the test file; "
                                f"expected {what}")
        if name != "label" and name not in expected:
            raise PipelineError(f"{path}: line 1, column {col}: unknown column name {name!r}; "
                                f"expected {what}")
    if labelled and "label" not in seen:
        raise PipelineError(f"{path}: line 1: no 'label' column; expected {what}")
    missing = [n for n in expected if n not in seen]
    if missing:
        raise PipelineError(f"{path}: line 1: {len(names)} columns, expected {len(expected)}; "
                            f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return names


def _fast_parse(path: Path, names: list[str]) -> np.ndarray | None:
    """The whole body as int64 (rows, columns) in header order, or None if anything is off."""
    import pandas as pd

    frame = pd.read_csv(path, encoding="utf-8-sig", engine="c", header=0, names=names,
                        skip_blank_lines=False)
    if len(frame) == 0 or not all(dtype == np.int64 for dtype in frame.dtypes):
        return None
    values = frame.to_numpy()
    label_col = names.index("label") if "label" in names else None
    pixels = np.delete(values, label_col, axis=1) if label_col is not None else values
    if pixels.min() < 0 or pixels.max() > 255:
        return None
    if label_col is not None and (values[:, label_col].min() < 0 or values[:, label_col].max() > 9):
        return None
    return values


def _diagnose(path: Path, names: list[str], labelled: bool) -> None:
    """Walk the file row by row and raise on the first problem, naming line and column."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PipelineError(f"{path}: line {line}: not UTF-8 text (binary data?) at byte "
                            f"{exc.start}; expected comma-separated integers") from exc
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise PipelineError(f"{path}: line {line}: contains NUL bytes (binary data?); "
                            "expected comma-separated integers")
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    rows = 0
    for cells in reader:
        line = reader.line_num
        if not cells or cells == [""]:
            raise PipelineError(f"{path}: line {line}: empty line; expected {len(names)} values")
        rows += 1
        if len(cells) != len(names):
            raise PipelineError(f"{path}: line {line}: {len(cells)} values, expected {len(names)} "
                                "(one per header column)")
        for col, (name, cell) in enumerate(zip(names, cells, strict=True), start=1):
            _check_cell(path, line, col, name, cell.strip())
    if rows == 0:
        raise PipelineError(f"{path}: only a header line; expected one row per image after it")


def _check_cell(path: Path, line: int, col: int, name: str, cell: str) -> None:
    where = f"{path}: line {line}, column {col} ({name})"
    low, high, what = (0, 9, "a label 0-9") if name == "label" else (0, 255, "a pixel 0-255")
    if cell == "":
        raise PipelineError(f"{where}: empty cell; expected {what}")
    try:
        value = int(cell)
    except ValueError:
        try:
            number = float(cell)
        except ValueError:
            raise PipelineError(f"{where}: {cell[:20]!r} is not a number; expected {what}") from None
        if number != number or number in (float("inf"), float("-inf")) or not number.is_integer():
            raise PipelineError(f"{where}: {cell[:20]!r} is not a whole number; expected {what}") \
                from None
        value = int(number)
    if not low <= value <= high:
        raise PipelineError(f"{where}: {cell[:20]} is out of range; expected {what}")


def count_duplicates(images: np.ndarray) -> int:
    """How many images repeat an earlier one exactly (they are kept: they are real data)."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    _, first = np.unique(flat, axis=0, return_index=True)
    return len(flat) - len(first)


# -- the cache -----------------------------------------------------------------------------------

def _array_paths(paths: Paths) -> dict[str, Path]:
    return {name: paths.prepared / f"{name}.npy" for name in ("train_x", "train_y", "test_x")}


def _stat_key(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha1()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(str(arrays[name].shape).encode())
        h.update(np.ascontiguousarray(arrays[name]).data)
    return h.hexdigest()[:16]


def load(paths: Paths) -> Prepared:
    """The prepared arrays, checked against the digest recorded when they were written."""
    meta = read_json(paths.prepared / "meta.json")
    if not meta or meta.get("version") != CACHE_VERSION:
        raise PipelineError(f"{paths.prepared}: no prepared data; run `make prepare` first")
    try:
        arrays = {n: np.load(p, allow_pickle=False) for n, p in _array_paths(paths).items()}
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{paths.prepared}: the prepared cache is unreadable ({exc}); "
                            "run `make prepare` to rebuild it") from exc
    if _digest(arrays) != meta.get("data_key"):
        raise PipelineError(f"{paths.prepared}: the prepared cache does not match its record; "
                            "run `make prepare` to rebuild it")
    return Prepared(**arrays, data_key=meta["data_key"])


def _cache_is_current(paths: Paths) -> tuple[bool, str]:
    meta = read_json(paths.prepared / "meta.json")
    if not meta:
        return False, ""
    if meta.get("inputs") != {"train": _stat_key(paths.train_csv), "test": _stat_key(paths.test_csv)}:
        return False, "the CSV files changed"
    try:
        load(paths)
    except PipelineError:
        return False, "the cache is corrupt or incomplete; rebuilding it"
    return True, ""


def run(paths: Paths, force: bool = False) -> str:
    """Validate both CSVs and write the cache (unless it is current); returns the data key."""
    for csv_path, other in ((paths.train_csv, paths.test_csv), (paths.test_csv, paths.train_csv)):
        if not csv_path.is_file():
            extra = f" ({other.name} is present)" if other.is_file() else ""
            raise PipelineError(f"{csv_path}: file not found{extra}; run `make download` first")
    if not force:
        current, why = _cache_is_current(paths)
        if current:
            print("prepare: up to date")
            return load(paths).data_key
        if why:
            print(f"prepare: {why}")
    train_x, train_y = read_competition_csv(paths.train_csv, labelled=True)
    test_x, _ = read_competition_csv(paths.test_csv, labelled=False)
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x}
    key = _digest(arrays)
    for name, target in _array_paths(paths).items():
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            np.save(handle, arrays[name], allow_pickle=False)
    inputs = {"train": _stat_key(paths.train_csv), "test": _stat_key(paths.test_csv)}
    write_json(paths.prepared / "meta.json", {
        "version": CACHE_VERSION, "inputs": inputs, "data_key": key,
        "n_train": len(train_x), "n_test": len(test_x),
    })
    dupes = count_duplicates(train_x)
    note = f"; {dupes} duplicate train images kept" if dupes else ""
    counts = np.bincount(train_y, minlength=10)
    print(f"prepare: {len(train_x)} train images (per class {counts.min()}-{counts.max()}), "
          f"{len(test_x)} test images{note}")
    return key
