"""`make tune`: an Optuna study whose trials are runs, on an embedded journal or a PostgreSQL server
the test starts itself."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import SAMPLE, copy_project, free_port, run_cli, start_cli

from pipeline.config import Paths
from pipeline.store.artifacts import all_runs, completed

pytestmark = pytest.mark.slow

SPACE = """
[lr]
low = 1e-3
high = 1e-2
log = true
[hidden]
choices = [8, 16]
[label_smoothing]
low = 0.0
high = 0.2
"""
BASE = ("--folds", "2", "--epochs", "2")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with the sample prepared and a small search space."""
    root = tmp_path_factory.mktemp("tune")
    run_cli(root, "folds", *SAMPLE, *BASE)
    (root / "space.toml").write_text(SPACE)
    return root


@pytest.fixture
def project(sample: Path, tmp_path: Path) -> Path:
    return copy_project(sample, tmp_path / "p")


def run_tune(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli(root, "tune", *BASE, "--space", str(root / "space.toml"), *args, check=check)


def study(root: Path, name: str = "rnn") -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    log = str(root / "runs" / "tune" / name / "journal.log")
    return optuna.load_study(study_name=name,
                             storage=optuna.storages.JournalStorage(JournalFileBackend(log)))


def states(made: optuna.Study) -> list[str]:
    return [t.state.name for t in made.get_trials(deepcopy=False)]


def test_a_tiny_study_writes_best_toml_and_its_trials_are_runs(project: Path) -> None:
    result = run_tune(project, "--trials", "3")
    assert result.stdout.count("tune: trial ") == 3 and "best: trial" in result.stdout
    best = project / "runs" / "tune" / "rnn" / "best.toml"
    text = best.read_text()
    assert "make submit CONFIG=runs/tune/rnn/best.toml" in text and "hidden = " in text
    runs = {r.id for r in all_runs(Paths(project)) if completed(r)}
    trial_runs = {t.user_attrs["run"] for t in study(project).get_trials()}
    assert trial_runs <= runs and trial_runs  # every trial trained all folds: a complete run
    assert "study rnn: 3 complete" in run_cli(project, "tune-status").stdout
    # best.toml is a config file the pipeline reads: the best trial's run again, nothing retrains
    again = run_cli(project, "predict", "--config", str(best))
    assert "train: fold 0 skipped" in again.stdout
    # resuming adds trials instead of starting over
    more = run_tune(project, "--trials", "4")
    assert "3 finished trials, running until 4" in more.stdout
    assert len(study(project).get_trials()) == 4
    page = run_cli(project, "report", "--study", "rnn")
    assert "wrote" in page.stdout and (project / "reports" / "study-rnn" / "history.png").is_file()


def test_the_journal_opens_as_optuna_dashboard_opens_it(project: Path) -> None:
    """optuna-dashboard takes a journal by its path: a plain file, opened with Optuna's own
    JournalFileBackend and its default lock (what `optuna-dashboard <file>` does on Linux)."""
    run_tune(project, "--trials", "2")
    told = run_cli(project, "tune-status").stdout
    journal = Path(told.split("optuna-dashboard ", 1)[1].strip())
    assert journal == project / "runs" / "tune" / "rnn" / "journal.log" and journal.is_file()
    assert not Path(f"{journal}.lock").exists()  # no lock left behind for the dashboard to wait on
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["rnn"]
    trials = optuna.load_study(study_name="rnn", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(t.user_attrs["run"] and 0 < t.value <= 1 for t in trials)


def test_two_workers_share_the_study(project: Path) -> None:
    run_tune(project, "--trials", "4", "--workers", "2", "--tune-folds", "1")
    trials = study(project).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert [s for s in states(study(project)) if s == "COMPLETE"] == ["COMPLETE"] * 4


def test_a_pruned_trial_is_recorded_as_pruned(project: Path) -> None:
    """The median pruner stops trials scoring below the others (learning rates too low to learn)."""
    (project / "space.toml").write_text('[lr]\nlow = 1e-8\nhigh = 1e-2\nlog = true\n'
                                        '[hidden]\nchoices = [16]\n')
    result = run_tune(project, "--trials", "12", "--tune-folds", "1", "--pruner", "median",
                  "--epochs", "3")
    made = study(project)
    pruned = [t for t in made.get_trials() if t.state.name == "PRUNED"]
    best_lr = made.best_trial.params["lr"]
    assert pruned and all(t.params["lr"] < best_lr for t in pruned)
    assert result.stdout.count("pruned at fold 0 epoch") == len(pruned)
    assert f"{len(pruned)} pruned" in run_cli(project, "tune-status").stdout


def test_a_killed_worker_does_not_wedge_the_study(project: Path) -> None:
    proc = start_cli(project, "tune", "--trials", "2", "--space", str(project / "space.toml"),
                     "--folds", "2", "--epochs", "40")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((project / "runs").glob("*/fold_0.state.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert states(study(project)) == ["RUNNING"]
    result = run_tune(project, "--trials", "2", "--epochs", "40")
    assert "left running by a stopped worker: marked failed" in result.stdout
    final = states(study(project))
    assert final.count("FAIL") == 1 and final.count("COMPLETE") == 2
    assert "resuming after epoch" in result.stdout  # the retried settings resumed the killed run


@pytest.mark.parametrize(("space", "words"), [
    ("[hiden]\nchoices = [8]\n", ["[hiden]: unknown parameter"]),
    ("[lr]\nlow = 0.01\nhigh = 0.001\n", ["[lr]: an empty range", "low = 0.01"]),
    ("[hidden]\nchoices = []\n", ["[hidden]: an empty range"]),
    ("[device]\nchoices = ['cpu']\n", ["[device]: unknown parameter"]),
    ("[hidden]\nchoices = [0]\n", ["HIDDEN=0 is out of range"]),
])
def test_bad_space_is_a_clear_error(project: Path, space: str, words: list[str]) -> None:
    (project / "space.toml").write_text(space)
    result = run_tune(project, "--trials", "1", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr
    assert not (project / "runs" / "tune").exists() or not list((project / "runs" / "tune").rglob("*.toml"))


def test_unreachable_storage_and_another_space_are_clear_errors(project: Path) -> None:
    port = free_port()
    result = run_tune(project, "--trials", "1", "--storage",
                  f"postgresql://user:secret@127.0.0.1:{port}/optuna", check=False)
    assert result.returncode == 1 and "cannot use this database" in result.stderr
    assert "secret" not in result.stderr and "user:***@" in result.stderr
    run_tune(project, "--trials", "1", "--tune-folds", "1")
    (project / "space.toml").write_text("[hidden]\nchoices = [4]\n")
    other = run_tune(project, "--trials", "2", "--tune-folds", "1", check=False)
    assert other.returncode == 1 and "another search space" in other.stderr


# -- a real PostgreSQL server ---------------------------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server of our own on 127.0.0.1 (a free port), removed at the end."""
    if not (PG_BIN / "initdb").is_file():
        pytest.skip("PostgreSQL 15 server not installed: `apt-get install postgresql` (Debian) "
                    "to run the many-machine test")
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="digits-pg-"))  # not under pytest's private folder
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_user, str(PG_BIN / "initdb"), "-D", str(data), "-U", "tune", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "log"),
                    "-o", f"-h 127.0.0.1 -p {port} -k {folder}", "start"], check=True,
                   capture_output=True)
    try:
        subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "tune",
                        "optuna"], check=True, capture_output=True)
        yield f"postgresql://tune@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_on_two_machines_share_a_postgres_study(project: Path, tmp_path: Path,
                                                            postgres: str) -> None:
    """Two projects (as two machines would have) run the same line against one database."""
    other = tmp_path / "machine-b"
    shutil.copytree(project, other)
    line = ["tune", *BASE, "--tune-folds", "1", "--trials", "4", "--study", "shared",
            "--storage", postgres]
    procs = [start_cli(root, *line, "--space", str(root / "space.toml"), output=True,
                       env={"OMP_NUM_THREADS": "1"})
             for root in (project, other)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outputs]
    made = optuna.load_study(study_name="shared", storage=postgres)
    finished = [t for t in made.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) >= 4 and len({t.number for t in made.get_trials()}) == len(made.get_trials())
    assert all(out.count("tune: trial ") >= 1 for out, _ in outputs)  # both machines ran trials
    status = run_cli(project, "tune-status", "--study", "shared", "--storage", postgres).stdout
    assert "study shared:" in status and "complete" in status


def test_ctrl_c_marks_the_trial_and_stops_cleanly(project: Path) -> None:
    proc = start_cli(project, "tune", "--trials", "2", "--space", str(project / "space.toml"),
                     "--folds", "2", "--epochs", "40", output=True, sigint=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((project / "runs").glob("*/fold_0.state.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert states(study(project)) == ["FAIL"]  # marked, not left running


@pytest.mark.parametrize("stage", ["tune", "tune-status"])
def test_a_study_name_that_would_leave_the_project_is_refused(project: Path, stage: str) -> None:
    result = run_cli(project, stage, "--study", "../../x", check=False)
    assert result.returncode == 1 and "STUDY='../../x': not a run name" in result.stderr
    assert not (project.parent / "x").exists() and not (project / "runs" / "tune").exists()


def test_a_failing_trial_says_why_and_the_study_goes_on(project: Path) -> None:
    (project / "space.toml").write_text("[batch]\nchoices = [5000]\n")  # larger than a fold
    result = run_tune(project, "--trials", "1", "--drop-last")
    assert "failed: BATCH=5000 is larger than the" in result.stdout and "Traceback" not in result.stderr
    assert "no complete trial yet" in result.stdout and states(study(project)) == ["FAIL"]
