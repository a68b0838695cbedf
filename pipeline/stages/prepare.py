"""The prepare stage: competition CSVs -> validated uint8 arrays in input/prepared/.

Pixel k of a CSV row (columns matched by name) lands at image row k // 28, column k % 28, and image
row r is time step r of the recurrent models.

Parsing takes a fast path: a byte check (digits, commas, line ends, the padding a spreadsheet may
add), then pandas' C parser straight into uint8. Only when that fails does a slow scanner walk the
file to name the first problem: the file, the line an editor shows, the column number and name, what
was expected and what was found. Both paths accept exactly the same cells: ASCII digits, optionally
quoted or padded; "12.0", "+3", "-0" and "1e2" are rejected, not rounded. A UTF-8 byte-order mark,
CRLF or CR line ends, no final newline and blank lines at the end still load; a blank line in the
middle is an error (usually two files pasted together). Duplicate images are kept and counted.
Nothing is written until both files have passed, so bad input leaves an existing cache untouched.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.config import Paths
from pipeline.errors import PipelineError
from pipeline.store.data import PIXELS, Prepared, load_prepared, save_prepared
from pipeline.store.fresh import Output

_DIGITS_AND_SEPARATORS = b"0123456789,\r\n"
_PADDING = b' \t"'  # what a spreadsheet may put around a number; both paths strip it the same way
_PIXEL_RE = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_LABEL_RE = rb"[0-9]"
# A cell in quotes, whole: quotes only around a number, each side a separator or the line's end.
_QUOTED = re.compile(rb'(?<![^,\r\n])[ \t]*"[ \t]*[0-9]+[ \t]*"[ \t]*(?![^,\r\n])')
# What a file is when its start says it is not a CSV at all.
_NOT_CSV = ((b"PK\x03\x04", "a zip archive (unzip it and put train.csv/test.csv in input/)"),
            (b"\x1f\x8b", "a gzip archive (decompress it first)"),
            ((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE), "UTF-16 text (save the file as UTF-8 CSV)"))
_LINE_END = re.compile(rb"\r\n?|\n")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def to_images(flat: np.ndarray) -> np.ndarray:
    """(N, 784) pixels -> (N, 28, 28): pixel k at row k // 28, column k % 28."""
    return np.ascontiguousarray(flat.reshape(-1, 28, 28))


# -- reading and validating one CSV --------------------------------------------------------------

def read_competition_csv(path: Path, labelled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Read train.csv (labelled) or test.csv; returns uint8 images and uint8 labels (or None)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read it ({exc.strerror})") from exc
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    first = _LINE_END.search(data, start)  # CRLF, LF or a lone CR
    header_end, body_start = (first.start(), first.end()) if first else (len(data), len(data))
    end = _content_end(data, body_start)  # blank lines at the very end are harmless
    if end == body_start and not data[start:header_end].strip(b" \t"):
        raise PipelineError(f"{path}: line 1, column 1: expected a CSV header and one row per image, "
                            f"found an empty file ({len(data)} bytes)")
    names = _read_header(path, data[start:header_end], labelled)
    if end == body_start:
        raise PipelineError(f"{path}: line 2, column 1 ({names[0]}): expected one row per image after "
                            "the header, found no rows (the file has only a header line)")
    values = _fast_parse(data, body_start, end, names, path)
    if values is None:
        _diagnose(path, data[body_start:end], names)
        raise PipelineError(f"{path}: could not be parsed as a competition CSV (line 2 onwards, column 1 "
                            f"({names[0]})): expected comma-separated integers")
    labels = np.ascontiguousarray(values[:, names.index("label")]) if labelled else None
    return to_images(values[:, [names.index(n) for n in PIXELS]]), labels


def _show(name: str, quote: bool = False) -> str:
    """A column name as a message shows it: plain when plain (unless quote), else quoted, cut short."""
    if not quote and name and len(name) <= 40 and name.isprintable() and " " not in name:
        return name
    return repr(name[:40] + ("..." if len(name) > 40 else ""))


def _read_header(path: Path, raw: bytes, labelled: bool) -> list[str]:
    expected = (["label"] if labelled else []) + PIXELS
    what = ("train.csv's header label,pixel0,...,pixel783" if labelled
            else "test.csv's header pixel0,...,pixel783")
    where = f"{path}: line 1"
    kind = next((what for start, what in _NOT_CSV if raw.startswith(start)), "")
    problem = (1, kind) if kind else _not_text(raw)
    if problem:
        raise PipelineError(f"{where}, column {problem[0]}: expected {what}, found {problem[1]}")
    line = raw.decode("utf-8")
    if not line.strip():
        raise PipelineError(f"{where}, column 1: expected {what}, found an empty line")
    if "," not in line:
        for sep, called in (("\t", "tabs"), (";", "semicolons"), ("|", "bars"), (" ", "spaces")):
            if sep in line.strip():
                raise PipelineError(f"{where}, column 1: expected {what} separated by commas, found "
                                    f"names separated by {called} (save the file as comma-separated CSV)")
    names = [n.strip() for n in next(csv.reader([line]))]
    known = set(expected)
    seen: dict[str, int] = {}
    for col, name in enumerate(names, start=1):
        at = f"{where}, column {col} ({_show(name)})"
        if name in seen:
            raise PipelineError(f"{at}: expected each column name once, found {_show(name)} again "
                                f"(also column {seen[name]})")
        seen[name] = col
        if name == "label" and not labelled:
            raise PipelineError(f"{at}: expected {what}, found a 'label' column (is this train.csv? "
                                "test.csv has no labels)")
        if name not in known:
            if not name:
                found = "an empty column name (a trailing comma?)"
            elif name.lower() in known:
                found = f"{_show(name, quote=True)} (names are lower case: {name.lower()})"
            else:
                found = f"unknown column name {_show(name, quote=True)}"
            raise PipelineError(f"{at}: expected {what}, found {found}")
    if labelled and "label" not in seen:
        hint = " (is this test.csv?)" if sorted(names) == sorted(PIXELS) else ""
        raise PipelineError(f"{where}, column 1 ({_show(names[0])}): expected {what}, found no 'label' "
                            f"column{hint}")
    missing = [n for n in expected if n not in seen]
    if missing:
        first = missing[0]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise PipelineError(f"{where}, column {expected.index(first) + 1} ({first}): expected "
                            f"{len(expected)} columns ({what}), found {len(names)}; column {first} "
                            f"is missing{more}")
    return names


def _not_text(raw: bytes) -> tuple[int, str] | None:
    """(column, description) of the first byte in a line that is not UTF-8 text, or None."""
    bad = raw.find(b"\x00")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.start if bad < 0 else min(bad, exc.start)
    if bad < 0:
        return None
    return raw.count(b",", 0, bad) + 1, f"byte 0x{raw[bad]:02x}, which is not text (binary data?)"


def _content_end(data: bytes, start: int) -> int:
    """The index just after the last byte from start on that is not a space, tab or line end
    (read from the end a block at a time: no copy of a file of many megabytes)."""
    end = len(data)
    while end > start:
        chunk = data[max(start, end - 65536):end]
        if kept := len(chunk.rstrip(b" \t\r\n")):
            return end - len(chunk) + kept
        end -= len(chunk)
    return start


def _fast_parse(data: bytes, body_start: int, end: int, names: list[str],
                path: Path | None = None) -> np.ndarray | None:
    """data[body_start:end] as uint8 in header order, or None; path: the file (read faster by name)."""
    import pandas as pd

    # translate keeps the order of what it does not delete, so the header's leftovers come first;
    # working on the whole file saves copying 76 MB.
    in_header = len(data[:body_start].translate(None, _DIGITS_AND_SEPARATORS))
    odd = data.translate(None, _DIGITS_AND_SEPARATORS)[in_header:]
    if odd and odd.translate(None, _PADDING):
        return None  # a sign, a decimal point, a letter, binary data...: the scanner says which
    if b'"' in odd and b'"' in _QUOTED.sub(b"", data[body_start:end]):
        return None  # a quote that does not wrap a whole cell (a line break in quotes, "1"2...)
    tail = data[end:]
    if tail in (b"", b"\n", b"\r", b"\r\n"):
        # The file as it is (by name when given), skipping the header line.
        source, skip = (path if path is not None else io.BytesIO(data)), 1
    else:
        source, skip = io.BytesIO(data[body_start:end]), 0  # without the blank lines at the end
    try:
        frame = pd.read_csv(source, header=None, skiprows=skip, engine="c", dtype=np.uint8,
                            na_filter=False, skip_blank_lines=False)
    except (ValueError, OverflowError, OSError, pd.errors.ParserError):
        return None  # out of range, empty cells, ragged rows
    if frame.shape[1] != len(names):
        return None
    values = frame.to_numpy()
    if "label" in names and len(values) and values[:, names.index("label")].max() > 9:
        return None
    return values


@functools.lru_cache(maxsize=4)
def _line_re(names: tuple[str, ...]) -> re.Pattern[bytes]:
    """A line that is valid at a glance: plain numbers in range, one per column."""
    return re.compile(b",".join(_LABEL_RE if n == "label" else _PIXEL_RE for n in names))


def _diagnose(path: Path, body: bytes, names: list[str]) -> None:
    """Walk the rows in file order and raise on the first problem, naming line and column."""
    clean = _line_re(tuple(names))
    for number, raw in enumerate(body.splitlines(), start=2):
        if clean.fullmatch(raw):
            continue
        _check_line(path, number, raw, names)


def _check_line(path: Path, number: int, raw: bytes, names: list[str]) -> None:
    where = f"{path}: line {number}"
    n = len(names)
    problem = _not_text(raw)
    if problem:
        col, found = problem
        name = f" ({names[col - 1]})" if col <= n else ""
        raise PipelineError(f"{where}, column {col}{name}: expected comma-separated integers, found "
                            f"{found}")
    line = raw.decode("utf-8")
    if not line.strip():
        raise PipelineError(f"{where}, column 1 ({names[0]}): expected {n} comma-separated values, "
                            "found an empty line (remove blank lines between rows)")
    cells = next(csv.reader([line]))
    for col, (name, cell) in enumerate(zip(names, cells, strict=False), start=1):
        _check_cell(f"{where}, column {col} ({name})", name, cell)
    if len(cells) < n:
        col = len(cells) + 1
        raise PipelineError(f"{where}, column {col} ({names[col - 1]}): expected {n} values, one per "
                            f"header column, found {len(cells)} (the row is too short)")
    if len(cells) > n:
        raise PipelineError(f"{where}, column {n + 1} (past the last column, {names[-1]}): expected {n} "
                            f"values, one per header column, found {len(cells)} (the row is too long)")
    stray = _QUOTED.sub(lambda m: b"#" * len(m.group()), raw).find(b'"')
    if stray >= 0:
        col = raw.count(b",", 0, stray) + 1
        raise PipelineError(f"{where}, column {col} ({names[min(col, n) - 1]}): expected a whole number, "
                            "in quotes or not, found a quote inside the cell (a quote may only wrap "
                            "the whole number)")


def _check_cell(where: str, name: str, cell: str) -> None:
    """Accept ASCII digits (padded with spaces or tabs) in range; anything else is named."""
    high, what = (9, "a label 0-9") if name == "label" else (255, "a pixel value 0-255")
    text = cell.strip(" \t")
    shown = repr(cell[:20] + ("..." if len(cell) > 20 else ""))
    if text.isascii() and text.isdigit():
        if int(text) <= high:
            return
        found = f"{shown}, above {high}"
    elif text == "":
        found = "an empty cell"
    elif text[0] in "+-" and text[1:].isascii() and text[1:].isdigit():
        found = f"{shown}, a negative number" if text[0] == "-" and int(text[1:]) else \
            f"{shown}, a number with a sign"
    elif not _DECIMAL.fullmatch(text):
        found = f"{shown}, which is not a number"
        if "," in cell:
            found += " (an unclosed quote joins the cells after it)"
    elif float(text).is_integer():
        found = f"{shown}; write whole numbers without a decimal point or exponent"
    else:
        found = f"{shown}, a fraction"
    raise PipelineError(f"{where}: expected {what} (a whole number), found {found}")


def count_duplicates(images: np.ndarray) -> int:
    """How many images repeat an earlier one exactly: raw bytes in a set, faster than np.unique."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    return len(flat) - len(set(map(bytes, flat)))


# -- the stage ----------------------------------------------------------------------------------

def _check_writable(folder: Path) -> None:
    """Fail before the slow work when the cache cannot be written."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise PipelineError(f"{existing}: is a file; expected a folder for the prepared cache "
                            f"({folder})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PipelineError(f"{existing}: cannot write here (no write permission, or a read-only "
                            f"file system); prepare writes its cache to {folder}")


def _check_inputs_exist(paths: Paths) -> None:
    for csv_path, other in ((paths.train_csv, paths.test_csv), (paths.test_csv, paths.train_csv)):
        if csv_path.is_dir():
            raise PipelineError(f"{csv_path}: is a folder; expected the competition's CSV file")
        if not csv_path.is_file():
            if other.is_file():
                raise PipelineError(f"{csv_path}: file not found, while {other.name} is present; put "
                                    f"{csv_path.name} in {csv_path.parent} (nothing is filled in from "
                                    "another source), or `make download FORCE=1` to fetch both")
            raise PipelineError(f"{csv_path}: file not found (nor {other.name}); `make download` "
                                "puts both there")


def class_warning(labels: np.ndarray, n_folds: int = 2) -> str:
    """A warning when the labels cannot make a useful digit classifier, else ''."""
    counts = np.bincount(labels.astype(np.int64), minlength=10)
    missing = [d for d in range(10) if counts[d] == 0]
    if missing:
        return (f"train.csv has no rows of digit(s) {', '.join(map(str, missing))}: the models can "
                "never predict them, and the out-of-fold accuracy says nothing about them; add rows "
                "of every digit")
    few = [d for d in range(10) if counts[d] < max(n_folds, 5)]
    if few:
        return (f"digit(s) {', '.join(f'{d} ({counts[d]} rows)' for d in few)} have very few rows: "
                "their accuracy will be noise; add rows of those digits")
    return ""


def run(paths: Paths, force: bool = False) -> Prepared:
    """Validate both CSVs and write the cache unless it is current; returns the prepared data."""
    _check_inputs_exist(paths)
    data: list[Prepared] = []
    # What the cache is made from: each CSV's size and modification time.
    stats = {p.name: p.stat() for p in (paths.train_csv, paths.test_csv)}
    inputs = {name: [stat.st_size, stat.st_mtime_ns] for name, stat in stats.items()}
    made = Output(paths.prepared / "meta.json", inputs,
                  check=lambda: data.append(load_prepared(paths)))
    if not made.rerun("prepare:", "train.csv and test.csv unchanged", force):
        return data[0]
    _check_writable(paths.prepared)
    # pandas' parser releases the GIL, so the two files are read at once (faster on 2 cores);
    # train.csv's problem, if any, is the one reported. pandas is imported once, before the threads.
    import pandas  # noqa: F401

    with ThreadPoolExecutor(max_workers=2) as pool:
        train_job = pool.submit(read_competition_csv, paths.train_csv, True)
        test_job = pool.submit(read_competition_csv, paths.test_csv, False)
        train_x, train_y = train_job.result()
        test_x, _ = test_job.result()
    assert train_y is not None
    prepared = save_prepared(paths, {"train_x": train_x, "train_y": train_y, "test_x": test_x}, made)
    dupes = count_duplicates(train_x)
    note = f"; {dupes} duplicate train images kept" if dupes else ""
    counts = np.bincount(train_y, minlength=10)
    print(f"prepare: {len(train_x)} train images (per class {counts.min()}-{counts.max()}), "
          f"{len(test_x)} test images{note}")
    warning = class_warning(train_y)
    if warning:
        print(f"prepare: WARNING: {warning}")
    return prepared
