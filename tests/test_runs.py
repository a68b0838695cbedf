"""runs and forget: every run side by side, damaged records named, one run's folder deleted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import JSON, RECORD_FIELDS, fake_run, run_cli, the_run
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.config import Paths
from pipeline.errors import PipelineError
from pipeline.stages import runs
from pipeline.store.run import all_runs, check_name, latest


def test_forget_refuses_the_studies_and_runs_never_lists_them(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "runs" / "tune" / "rnn" / "journal.log"
    journal.parent.mkdir(parents=True)
    journal.write_text("{}\n")
    fake_run(tmp_path, "rnn-h32-e2-aaaaaa")
    paths = Paths(tmp_path)
    assert [r.id for r in all_runs(paths)] == ["rnn-h32-e2-aaaaaa"]
    assert [r["run"] for r in runs.rows(paths)] == ["rnn-h32-e2-aaaaaa"]
    assert main(["--root", str(tmp_path), "forget", "--run", "tune"]) == 1
    err = capsys.readouterr().err
    assert "holds the tuning studies, not a run" in err and "Traceback" not in err
    assert journal.is_file()


@given(drop=st.sets(st.sampled_from(RECORD_FIELDS)), change=st.dictionaries(
    st.sampled_from(RECORD_FIELDS), JSON, max_size=3), config=JSON, blend=st.booleans())
def test_one_damaged_run_is_named_and_never_hides_the_others(
        tmp_path_factory: pytest.TempPathFactory, drop: set[str], change: dict[str, Any],
        config: Any, blend: bool) -> None:
    root = tmp_path_factory.mktemp("runs")
    fake_run(root, "rnn-h32-e2-good00", acc=0.5)
    bad = fake_run(root, "rnn-h32-e2-bad000", acc=0.7,
                   **({"kind": "blend", "weights": {"a": 1}, "oof_acc_honest": 0.6} if blend else {}))
    record = json.loads((bad / "run.json").read_text())
    record = {k: v for k, v in record.items() if k not in drop} | change
    (bad / "run.json").write_text(json.dumps(record))
    (bad / "config.json").write_text(json.dumps(config))
    found = {r["run"]: r for r in runs.rows(Paths(root))}
    assert found["rnn-h32-e2-good00"]["OOF acc"] == "0.5000"
    assert "rnn-h32-e2-bad000" in found
    text = runs.table(Paths(root))
    assert "rnn-h32-e2-good00" in text and "rnn-h32-e2-bad000" in text


@pytest.mark.parametrize("damage", ["a-field", "truncated"])
def test_make_runs_names_the_damaged_folders_and_lists_every_one(tmp_path: Path, damage: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fake_run(tmp_path, "rnn-h32-e2-good00")
    record = fake_run(tmp_path, "rnn-h32-e2-bad000") / "run.json"
    made = json.loads(record.read_text())
    del made["fold_min"]
    # Truncated: a write cut short, not JSON any more: damaged rather than incomplete.
    record.write_bytes(record.read_bytes()[:40] if damage == "truncated" else json.dumps(made).encode())
    (tmp_path / "runs" / "rnn-h32-e2-good00" / "config.json").write_text("[1, 2]")
    assert main(["--root", str(tmp_path), "runs"]) == 0
    out, err = capsys.readouterr()
    said = "not valid JSON" if damage == "truncated" else "missing or not valid: fold_min"
    assert f"rnn-h32-e2-bad000: damaged record (rnn-h32-e2-bad000/run.json: {said}" in err
    assert "make predict RUN=rnn-h32-e2-bad000 FORCE=1" in err
    assert "rnn-h32-e2-good00: damaged record (config.json is not a table of settings)" in err
    assert "(damaged record)" in out and "(not complete)" not in out and "2 run(s)" in out


@pytest.mark.slow
def test_blend_runs_and_forget(two_run_project: Path) -> None:
    paths = Paths(two_run_project)
    rows, cols = the_run(two_run_project, "rnn-h32"), the_run(two_run_project, "rnn-cols")
    result = run_cli(two_run_project, "blend", "--folds", "2")
    assert "honest" in result.stdout and "in-sample" in result.stdout
    made = json.loads((paths.runs / str(latest(paths)) / "run.json").read_text())
    assert made["kind"] == "blend" and set(made["weights"]) <= {rows.id, cols.id}
    assert paths.submission_csv.read_bytes() == (paths.runs / str(latest(paths)) /
                                                 "submission.csv").read_bytes()
    assert len(list(paths.submissions.glob("*-blend-cv*.csv"))) == 1
    again = run_cli(two_run_project, "blend", "--folds", "2")
    assert "skipped: the same runs" in again.stdout
    table = pd.read_csv(__import__("io").StringIO(run_cli(two_run_project, "runs", "--format", "csv").stdout))
    assert set(table["run"]) == {rows.id, cols.id, latest(paths)}
    assert table["run"].iloc[0] == table.loc[table["OOF acc"].str[:6].astype(float).idxmax(), "run"]
    assert "blend:" in table.loc[table["run"] == latest(paths), "changed settings"].iloc[0]
    by_time = run_cli(two_run_project, "runs", "--sort", "time").stdout.splitlines()
    assert by_time[2].startswith(str(latest(paths)))
    # forget removes one run's folder, nothing else
    kept = {p: p.read_bytes() for p in cols.path.rglob("*") if p.is_file()}
    forgot = run_cli(two_run_project, "forget", "--run", rows.id)
    assert "deleted" in forgot.stdout and " KB" in forgot.stdout
    assert not rows.path.exists() and {p: p.read_bytes() for p in kept} == kept
    assert paths.submission_csv.is_file() and paths.prepared.is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["../..", "/etc", "a/b", "..", ".hidden", "", "x" * 200, "a b"])
def test_names_that_would_leave_runs_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not a run name"):
        check_name(name)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    result = run_cli(tmp_path / "two_run_project", "forget", "--run", name, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (victim / "keep.txt").read_text() == "mine"


def test_runs_and_run_say_the_same_of_a_folder_without_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run stopped before anything recorded its settings (an older version wrote config.json only
    once every fold was trained): `make runs` and RUN= say the same of it, and neither makes data."""
    folder = tmp_path / "runs" / "rnn-h32-e9-stop00"
    folder.mkdir(parents=True)
    (folder / "fold_0.csv").write_text("epoch\n1\n")
    assert main(["--root", str(tmp_path), "runs"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "rnn-h32-e9-stop00" in line)
    assert "(interrupted, settings not recorded)" in row
    for stage in ("train", "predict"):
        assert main(["--root", str(tmp_path), stage, "--run", "rnn-h32-e9-stop00"]) == 1
        err = capsys.readouterr().err
        assert "no such run" not in err and "stopped before its settings were recorded" in err, err
        assert "make forget RUN=rnn-h32-e9-stop00" in err
    assert not (tmp_path / "input").exists()


def test_a_damaged_line_of_the_ledger_is_named_once_and_the_rest_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_run(tmp_path, "rnn-h32-e2-good00")
    book = tmp_path / "submissions" / "runs.jsonl"
    book.parent.mkdir()
    entries = [{"kind": "upload", "ref": 7, "run": "rnn-h32-e2-good00", "message": "m", "status": "pending"},
               {"kind": "score", "ref": 7, "status": "complete", "public_score": 0.971}]
    book.write_text(json.dumps(entries[0]) + "\n" + '{"kind": "sco' + "\n" + json.dumps(entries[1]) + "\n")
    assert main(["--root", str(tmp_path), "runs"]) == 0
    out, err = capsys.readouterr()
    assert err.count("runs.jsonl") == 1 and "line 2" in err, err
    assert "0.97100" in next(line for line in out.splitlines() if "rnn-h32-e2-good00" in line)
