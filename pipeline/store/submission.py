"""What a valid Digit Recognizer submission is: ImageId 1..N in order and a Label 0-9 for each."""

from __future__ import annotations

from pathlib import Path

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
    numbers = {}
    for column in ("ImageId", "Label"):
        numeric = pd.to_numeric(frame[column], errors="coerce")
        bad = numeric.isna() | (numeric != numeric.round())
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise PipelineError(f"{where}: line {i + 2}, column {column}: {frame[column].iloc[i]!r} "
                                "is not a whole number")
        numbers[column] = numeric.to_numpy()
    ids = numbers["ImageId"]
    wrong = ids != range(1, len(frame) + 1)
    if wrong.any():
        i = int(wrong.argmax())
        raise PipelineError(f"{where}: line {i + 2}, column ImageId: {ids[i]}; expected {i + 1} "
                            "(ids run 1..N in order)")
    labels = numbers["Label"]
    out = (labels < 0) | (labels > 9)
    if out.any():
        i = int(out.argmax())
        raise PipelineError(f"{where}: line {i + 2}, column Label: {labels[i]}; expected a digit 0-9")


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
