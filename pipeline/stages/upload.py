"""The upload stage, and the leaderboard: send submissions/submission.csv to the competition with
the official client, wait for its public score, and list the account's submissions (`make lb`).

Nothing is sent unless the file is a valid, full-size submission made from the competition's data:
a submission of the built-in sample would only waste one of the day's submissions. What Kaggle
takes is recorded in submissions/runs.jsonl at once, against the run or blend that made the file;
its score is recorded when it comes (here, or later by `make lb`).
"""

from __future__ import annotations

import sys

from pipeline.config import COMPETITION, Paths
from pipeline.errors import Interrupted, PipelineError
from pipeline.kaggle import api as kaggle_api
from pipeline.options import default
from pipeline.store import ledger
from pipeline.store.data import data_source
from pipeline.store.run import latest, run_dir
from pipeline.store.submission import COMPETITION_TEST_ROWS, validate_file

SUBMISSIONS_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/submissions"
MAX_WAIT = 3600.0
LB_COLUMNS = ("date", "description", "status", "public score", "ref", "from")


def run(paths: Paths, message: str, timeout: float = default("timeout"),
        wait: float = default("wait")) -> int:
    """Validate and submit, record the upload, then wait up to wait seconds for its public score;
    returns Kaggle's submission reference."""
    message = (message or "").strip()
    if not message:
        raise PipelineError('upload: the submission needs a description: make upload MESSAGE="what changed"')
    if not 0 <= wait <= MAX_WAIT:
        raise PipelineError(f"WAIT={wait:g}: must be 0 to {MAX_WAIT:g} seconds")
    _refuse_sample(paths)
    validate_file(paths.submission_csv, COMPETITION_TEST_ROWS)
    run_id, kept = ledger.made_by(paths)
    try:
        ref, answer = kaggle_api.submit(paths.submission_csv, message, timeout)
    except KeyboardInterrupt:
        raise Interrupted(f"while sending {paths.submission_csv}: Kaggle may have taken it already; "
                          "`make lb` lists the account's submissions: look there before uploading "
                          "again (each upload spends one of the day's submissions)") from None
    if not ref:
        raise PipelineError(f"Kaggle did not take the submission: {answer or 'no reason given'}. "
                            f"Nothing was submitted; check {SUBMISSIONS_URL} and retry later")
    ledger.add_upload(paths, ref, run_id, kept, message)
    made = f" (made by {run_id})" if run_id else ""
    print(f"upload: submitted {paths.submission_csv}{made} to '{COMPETITION}': reference {ref}"
          + (f" ({answer})" if answer else ""))
    if wait > 0:
        _await_score(paths, ref, run_id, wait, timeout)
    else:
        print("upload: not waiting for the score (WAIT=0); `make lb` shows it once Kaggle has it")
    return ref


def _await_score(paths: Paths, ref: int, run_id: str | None, wait: float, timeout: float) -> None:
    """Poll for the score; a failure to get one is a warning, never a lost upload record."""
    print(f"upload: waiting up to {wait:g} s for Kaggle to score it (WAIT=<seconds> to change)")
    try:
        got = kaggle_api.wait_for_score(ref, wait, timeout)
    except PipelineError as exc:
        print(f"warning: the upload is recorded (reference {ref}), but its score could not be "
              f"fetched: {exc}. `make lb` fetches it later", file=sys.stderr)
        return
    except KeyboardInterrupt:
        raise Interrupted(f"while waiting for the score: the upload is recorded (reference {ref}, in "
                          f"{ledger.runs_path(paths).relative_to(paths.root)}); `make lb` brings its "
                          "score once Kaggle has it. Rerunning `make upload` would submit the file "
                          "again") from None
    status = str(got.get("status") or "pending")
    if status == "pending":
        print(f"upload: not scored within WAIT={wait:g} s; it stays recorded as pending. "
              f"`make lb` shows the score once Kaggle has it (or see {SUBMISSIONS_URL})")
        return
    ledger.add_score(paths, ref, run_id, status, got.get("public_score"), str(got.get("error") or ""))
    if status == "error":
        raise PipelineError(f"Kaggle took submission {ref} but could not score it: "
                            f"{got.get('error') or 'no reason given'} (recorded in "
                            f"{ledger.runs_path(paths).relative_to(paths.root)})")
    print(f"upload: public score {ledger.score_text({**got, 'status': status})}"
          + (f" ({run_id})" if run_id else ""))


def leaderboard(paths: Paths, timeout: float = default("timeout"), fmt: str = default("format")) -> str:
    """Print the account's submissions with where each came from; records scores that arrived
    for uploads still pending in the record. Returns the text printed."""
    listed = kaggle_api.submissions(timeout)
    ledger.warn_damaged(paths, "lb")
    known = ledger.uploads(paths)
    rows = []
    for sub in listed:
        ref = int(sub.get("ref") or 0)
        mine = known.get(ref)
        status = str(sub.get("status") or "")
        if mine and status != mine.get("status") and status in ("complete", "error"):
            ledger.add_score(paths, ref, mine.get("run"), status, sub.get("public_score"),
                             str(sub.get("error") or ""))
        why = f": {sub['error']}" if status == "error" and sub.get("error") else ""
        rows.append({"date": str(sub.get("date", "")).replace("T", " ")[:16],
                     "description": sub.get("description", ""), "status": status + why,
                     "public score": ledger.score_text(sub) if status == "complete" else "", "ref": str(ref),
                     "from": (mine.get("run") or "(unknown run)") if mine else "-"})
    text = ledger.format_table(
        rows, LB_COLUMNS, fmt, empty=f"no submissions to '{COMPETITION}' yet; `make upload "
        'MESSAGE="..."` makes one', footer=f"\n{len(rows)} submission(s) to '{COMPETITION}' (newest "
        "first); from: the run or blend that made it, - when it was not uploaded from this project")
    sys.stdout.write(text + "\n")
    return text


def _refuse_sample(paths: Paths) -> None:
    """The submission's data must not be the built-in sample, by either record of where it came from."""
    name = latest(paths)
    records = {str(paths.source_json): data_source(paths)}
    # Even a damaged record that says "sample" stops it.
    if name and (source := run_dir(paths, name).source()) is not None:
        records[f"runs/{name}/run.json"] = source
    for where, source in records.items():
        if source == "sample":
            raise PipelineError(
                f"upload: {paths.submission_csv} was made from the built-in sample ({where} says so), "
                "not the competition data; Kaggle would score it as noise. Run `make download "
                "SOURCE=kaggle FORCE=1` and `make submit`, then upload")
