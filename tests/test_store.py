"""store: file formats (cv tables, submissions), files replaced together, and the ledger of runs
and uploads."""

from __future__ import annotations

import errno
import os
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import Paths, Settings
from pipeline.errors import PipelineError
from pipeline.store import ledger
from pipeline.store.io import replace_together, staged_files
from pipeline.store.submission import validate_file, validate_frame


def test_an_uploads_state_is_its_latest_score_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    ledger.add(paths, {"run": "rnn-a", "model": "rnn", "oof_acc": 0.9, "submission": "a.csv",
                       "config": {**asdict(Settings()), "hidden": 64}})
    ledger.add_upload(paths, 7, "rnn-a", "a.csv", "first")
    ledger.add_score(paths, 99, "rnn-x", "complete", 0.5)  # a score without its upload: not ours
    assert ledger.uploads(paths)[7]["status"] == "pending"
    ledger.add_score(paths, 7, "rnn-a", "complete", 0.971)
    ledger.add_upload(paths, 8, "rnn-a", "a.csv", "again")
    with open(ledger.runs_path(paths), "ab") as handle:  # a write cut off mid-line
        handle.write(b'{"kind": "score", "ref": 8, "sta')
    assert ledger.read(paths)[1] == [6]
    ledger.add_score(paths, 8, "rnn-a", "error", None, "bad file")
    entries, skipped = ledger.read(paths)
    lines = ledger.runs_path(paths).read_bytes().split(b"\n")
    assert skipped == [6] and lines[5] == b'{"kind": "score", "ref": 8, "sta' and lines[-1] == b""
    assert entries[0]["changed"] == {"hidden": 64} and "T" in entries[-1]["time"]  # ISO 8601, filled in
    found = ledger.uploads(paths)
    assert sorted(found) == [7, 8]
    assert (found[7]["status"], found[7]["public_score"], found[7]["message"]) == ("complete", 0.971, "first")
    assert (found[8]["status"], found[8]["error"]) == ("error", "bad file")
    assert ledger.leaderboard_by_run(paths)["rnn-a"]["ref"] == 8  # the run's latest upload
    assert ledger.score_text(found[7]) == "0.97100" and ledger.score_text(found[8]) == "error"
    assert ledger.score_text(None) == ""
    # Uploads and scores are not runs: finding a run by its kept copy ignores them.
    assert [e["model"] for e in ledger.run_entries(paths) if e["submission"] == "a.csv"] == ["rnn"]
    assert [e["run"] for e in ledger.run_entries(paths)] == ["rnn-a"]


@pytest.mark.parametrize("torn", [b"{", b'{"kind": "upload", "ref": 1, "st'])
def test_an_entry_after_a_torn_line_of_any_length_is_kept(tmp_path: Path, torn: bytes) -> None:
    paths = Paths(tmp_path)
    ledger.runs_path(paths).parent.mkdir(parents=True)
    ledger.runs_path(paths).write_bytes(torn)
    ledger.add_upload(paths, 7, "rnn-a", "a.csv", "first")
    assert ledger.read(paths)[1] == [1] and ledger.uploads(paths)[7]["message"] == "first"


def test_made_by_names_the_run_whose_submission_is_current(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert ledger.made_by(paths) == (None, None)  # no submission at all
    paths.submissions.mkdir()
    paths.submission_csv.write_text("ImageId,Label\n1,2\n")
    (paths.submissions / "old.csv").write_text("ImageId,Label\n1,3\n")
    (paths.submissions / "new.csv").write_text("ImageId,Label\n1,2\n")
    ledger.add(paths, {"run": "rnn-old", "submission": "old.csv"})
    ledger.add(paths, {"run": "blend-new", "submission": "new.csv"})
    assert ledger.made_by(paths) == ("blend-new", "new.csv")
    (paths.submissions / "new.csv").unlink()  # kept copies deleted: runs/latest, if it matches
    assert ledger.made_by(paths) == (None, None)
    (paths.runs / "rnn-late").mkdir(parents=True)
    (paths.runs / "rnn-late" / "submission.csv").write_text("ImageId,Label\n1,2\n")
    (paths.runs / "latest").write_text("rnn-late\n")
    assert ledger.made_by(paths) == ("rnn-late", None)


FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(("old", "error", "raised"), [
    (True, FULL, r"test.csv: cannot write \(No space left.*as they were"),
    (True, KeyboardInterrupt(), None),  # passed on as it is, after the files are put back
    (False, FULL, "cannot write"),
], ids=["disk-full", "interrupted", "into-an-empty-folder"])
def test_a_failed_second_rename_puts_both_files_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     old: bool, error: BaseException, raised: str) -> None:
    """train.csv and test.csv are replaced together or not at all, whatever stops the second rename."""
    folder = tmp_path / "input"
    before = {"train.csv": "old train", "test.csv": "old test"} if old else {}
    for name, text in before.items():
        folder.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    real = os.replace

    def replace(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        if Path(src).name == "test.csv" and ".staging-" in str(src):
            raise error
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with staged_files(folder, ["train.csv", "test.csv"]) as staged:
        for path in staged:
            path.write_text("new")
        with pytest.raises(PipelineError if raised else KeyboardInterrupt, match=raised):
            replace_together([(staged[0], folder / "train.csv"), (staged[1], folder / "test.csv")])
    assert {p.name: p.read_text() for p in folder.iterdir()} == before  # and nothing left over


def _submission(labels: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"ImageId": range(1, len(labels) + 1), "Label": labels})


def test_valid_submission_passes(tmp_path: Path) -> None:
    assert validate_frame(_submission([0, 9, 3]), expected_rows=3, where="s.csv") is None
    _submission([0, 9, 3]).to_csv(tmp_path / "s.csv", index=False)
    frame = validate_file(tmp_path / "s.csv", expected_rows=3)
    assert list(frame["ImageId"]) == [1, 2, 3] and list(frame["Label"]) == [0, 9, 3]


@pytest.mark.parametrize("frame, message", [
    (_submission([1, 2]).rename(columns={"Label": "label"}), "header"),
    (_submission([1, 2, 3]), "3 rows; expected 2"),
    (_submission([1, 10]), "line 3, column Label"),
    (_submission([1, -1]), "line 3, column Label"),
    (pd.DataFrame({"ImageId": [1, 3], "Label": [0, 0]}), "line 3, column ImageId"),
    (pd.DataFrame({"ImageId": [1, 2], "Label": [0, 1.5]}), "not a whole number"),
])
def test_invalid_submissions_are_named(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        validate_frame(frame, expected_rows=2, where="s.csv")
