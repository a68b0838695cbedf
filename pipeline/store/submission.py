"""What a valid Digit Recognizer submission is: ImageId 1..N in order and a Label 0-9 for each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

COMPETITION_TEST_ROWS = 28_000


def validate_frame(frame: pd.DataFrame, expected_rows: int | None, where: str) -> None:
    """Raise PipelineError naming the first problem; expected_rows None skips the count check."""
    if list(frame.columns) != ["ImageId", "Label"]:
        raise PipelineError(f"{where}: header is {','.join(map(str, frame.columns))}; expected ImageId,Label")
    if expected_rows is not None and len(frame) != expected_rows:
        raise PipelineError(f"{where}: {len(frame)} rows; expected {expected_rows} (one per test image)")
    if len(frame) == 0:
        raise PipelineError(f"{where}: no rows")
    numbers = {c: pd.to_numeric(frame[c], errors="coerce").to_numpy() for c in ("ImageId", "Label")}
    for column, values in numbers.items():
        _first_bad(where, column, np.isnan(values) | (values != values.round()), frame[column].to_numpy(),
                   "{!r} is not a whole number")
    ids, labels = numbers["ImageId"], numbers["Label"]
    _first_bad(where, "ImageId", ids != range(1, len(frame) + 1), ids,
               "{}; expected {row} (ids run 1..N in order)")
    _first_bad(where, "Label", (labels < 0) | (labels > 9), labels, "{}; expected a digit 0-9")


def _first_bad(where: str, column: str, bad: np.ndarray, values: np.ndarray, said: str) -> None:
    """A PipelineError naming the first bad row, its value shown as said formats it."""
    if bad.any():
        i = int(bad.argmax())
        raise PipelineError(f"{where}: line {i + 2}, column {column}: " + said.format(values[i], row=i + 1))


def validate_file(path: Path, expected_rows: int | None) -> pd.DataFrame:
    """Read and validate a submission CSV."""
    if not Path(path).is_file():
        raise PipelineError(f"{path}: not found; run `make submit` first")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a readable CSV ({exc})") from exc
    validate_frame(frame, expected_rows, where=str(path))
    return frame.astype({"ImageId": "int64", "Label": "int64"})
