"""The record of uploads and scores in submissions/runs.jsonl, read without Kaggle."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Paths
from pipeline.store import ledger


def test_an_uploads_state_is_its_latest_score(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    ledger.add(paths, {"run": "rnn-a", "model": "rnn", "oof_acc": 0.9, "submission": "a.csv"})
    ledger.add_upload(paths, 7, "rnn-a", "a.csv", "first")
    ledger.add_score(paths, 99, "rnn-x", "complete", 0.5)  # a score without its upload: not ours
    assert ledger.uploads(paths)[7]["status"] == "pending"
    ledger.add_score(paths, 7, "rnn-a", "complete", 0.971)
    ledger.add_upload(paths, 8, "rnn-a", "a.csv", "again")
    with open(ledger.runs_path(paths), "ab") as handle:  # a write cut off mid-line
        handle.write(b'{"kind": "score", "ref": 8, "sta')
    ledger.add_score(paths, 8, "rnn-a", "error", None, "bad file")
    found = ledger.uploads(paths)
    assert sorted(found) == [7, 8]
    assert (found[7]["status"], found[7]["public_score"], found[7]["message"]) == ("complete", 0.971, "first")
    assert (found[8]["status"], found[8]["error"]) == ("error", "bad file")
    assert ledger.leaderboard_by_run(paths)["rnn-a"]["ref"] == 8  # the run's latest upload
    assert ledger.score_text(found[7]) == "0.97100" and ledger.score_text(found[8]) == "error"
    assert ledger.score_text(None) == ""
    # Uploads and scores are not runs: finding a run by its kept copy ignores them.
    assert ledger.find(paths, "a.csv")["model"] == "rnn"
    assert [e["run"] for e in ledger.run_entries(paths)] == ["rnn-a"]


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
