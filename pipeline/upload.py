"""The upload stage: send submissions/submission.csv to the competition with the official client.

Nothing is sent unless the file is a valid, full-size submission made from the competition's data:
a submission of the built-in sample would only waste one of the day's submissions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.artifacts import data_source, latest
from pipeline.config import COMPETITION, Paths
from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.submission import COMPETITION_TEST_ROWS, validate_file

SUBMISSIONS_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/submissions"


def run(paths: Paths, message: str, timeout: float = 300.0) -> int:
    """Validate and submit; returns Kaggle's submission reference."""
    message = (message or "").strip()
    if not message:
        raise PipelineError('upload: the submission needs a description: make upload MESSAGE="what changed"')
    _refuse_sample(paths)
    validate_file(paths.submission_csv, COMPETITION_TEST_ROWS)
    from pipeline import kaggle_api

    with tempfile.TemporaryDirectory(prefix="digits-upload-") as workdir:
        ref, answer = kaggle_api.submit(COMPETITION, paths.submission_csv, message, Path(workdir), timeout)
    if not ref:
        raise PipelineError(f"Kaggle did not take the submission: {answer or 'no reason given'}. "
                            f"Nothing was submitted; check {SUBMISSIONS_URL} and retry later")
    print(f"upload: submitted {paths.submission_csv} to '{COMPETITION}': reference {ref}"
          + (f" ({answer})" if answer else ""))
    print(f"upload: the score appears at {SUBMISSIONS_URL}")
    return ref


def _refuse_sample(paths: Paths) -> None:
    """The submission's data must not be the built-in sample, by either record of where it came from."""
    name = latest(paths)
    made = read_json(paths.runs / name / "run.json") if name else None
    records = {str(paths.source_json): data_source(paths)}
    if isinstance(made, dict):
        records[f"runs/{name}/run.json"] = str(made.get("source"))
    for where, source in records.items():
        if source == "sample":
            raise PipelineError(
                f"upload: {paths.submission_csv} was made from the built-in sample ({where} says so), "
                "not the competition data; Kaggle would score it as noise. Run `make download "
                "SOURCE=kaggle FORCE=1` and `make submit`, then upload")
