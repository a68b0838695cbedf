"""`make tune`: an Optuna study whose trials are runs, on an embedded journal or a PostgreSQL server
the test starts itself; and the study's bookkeeping with fake stages (no training)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from conftest import SAMPLE, VALUES, closed_port, copy_project, free_port, run_cli, start_cli, tiny_data
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import Paths, Settings, validate
from pipeline.errors import PipelineError
from pipeline.stages import tune
from pipeline.store.run import all_runs, run_id
from pipeline.tuning import space as tune_space
from pipeline.tuning import study as tune_study
from pipeline.tuning.study import Job, Stages

SECRET = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=4, max_size=20)


PLAIN = st.from_regex(r"[a-z][a-z0-9]{2,8}", fullmatch=True)


@given(user=PLAIN, password=SECRET, host=PLAIN, db=PLAIN)
def test_no_part_of_a_password_is_ever_shown(user: str, password: str, host: str, db: str) -> None:
    url = f"postgresql://{user}:{password}@{host}.example:5432/{db}"
    assert tune_study.hide_password(url) == f"postgresql://{user}:***@{host}.example:5432/{db}"
    said = tune_study.hide_password(url, f"could not connect to {url} (password {password!r} rejected)")
    assert password not in said and "***" in said


def test_a_password_with_an_at_sign_is_hidden_whole() -> None:
    url = "postgresql://user:p@ss@127.0.0.1:1/db"
    assert tune_study.hide_password(url) == "postgresql://user:***@127.0.0.1:1/db"
    assert tune_study.hide_password("postgresql://tune@host/db") == "postgresql://tune@host/db"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value > 0 else "-inf") if abs(value) == float(
            "inf") else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


SPACE_NAMES = ["hidden", "lr", "model", "augment", "dropout", "label_smoothing", "folds", "fold_seed",
               "seed", "device", "epochs"]


@given(name=st.sampled_from(SPACE_NAMES), entry=st.dictionaries(
    st.sampled_from(["choices", "low", "high", "log", "step"]), VALUES, max_size=4))
def test_any_space_entry_is_accepted_and_samplable_or_refused_in_words(
        tmp_path_factory: pytest.TempPathFactory, name: str, entry: dict[str, Any]) -> None:
    path = tmp_path_factory.mktemp("space") / "space.toml"
    path.write_text(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in entry.items()))
    try:
        space = tune_space.load_space(path)
    except PipelineError as exc:
        assert str(path) in str(exc) and f"[{name}]" in str(exc)
        return
    assert name not in ("folds", "fold_seed", "device")  # fold settings and non-learned ones: refused
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for _ in range(3):
        params = tune_space.suggest(optuna.create_study().ask(), space)
        cfg = validate(replace(Settings(), **params))
        assert isinstance(getattr(cfg, name), type(getattr(Settings(), name)))


@pytest.mark.parametrize(("text", "words"), [
    ("[hidden]\nchoices = 5\n", "choices must be a list"),
    ("[hidden]\nchoices = [8, 16]\nlog = true\n", "log = true is for a low/high range"),
    ('[lr]\nlow = "0.001"\nhigh = 0.01\n', "low must be a number"),
    ('[model]\nchoices = "rnn"\n', "choices must be a list"),
    ("[folds]\nchoices = [2, 3]\n", "decides which rows each fold holds"),
    ("[fold_seed]\nlow = 1\nhigh = 9\n", "decides which rows each fold holds"),
])
def test_the_reported_space_mistakes_name_file_key_and_what_is_expected(
        tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=re.escape(words)) as caught:
        tune_space.load_space(path)
    assert str(path) in str(caught.value)


class FakeStages:
    """train.run and predict.run stand-ins: a score from the settings, no training. interrupt_at:
    the call (counted from 0, one per fold) that raises KeyboardInterrupt, as a Ctrl-C would."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.runs: list[str] = []
        self.interrupt_at = interrupt_at

    def train(self, plan: Any, fold_ids: list[int], on_epoch: Any = None) -> list[Any]:
        self.runs.append(plan.run.id)
        if len(self.runs) - 1 == self.interrupt_at:
            raise KeyboardInterrupt
        return [SimpleNamespace(fold=f, valid_acc=1 - abs(plan.cfg.lr - 3e-3)) for f in fold_ids]

    def predict(self, plan: Any, records: list[Any], publish: bool = True) -> Any:
        return SimpleNamespace(oof_acc=records[0].valid_acc)


def study_of(root: Path, **options: Any) -> Any:
    """Run a study of the fake stages in root; returns (the summary, the stages)."""
    root.mkdir(parents=True, exist_ok=True)
    space = root / "space.toml"
    if not space.exists():
        space.write_text("[lr]\nlow = 1e-4\nhigh = 1e-2\nlog = true\n")
    data, fold_of = tiny_data()
    stages = options.pop("stages", FakeStages())
    base = options.pop("base", replace(Settings(), folds=2, epochs=2))
    job = Job(root, base, Stages(stages.train, stages.predict), "s", **{"trials": 3, **options})
    summary = tune.run(job, Paths(root), data, fold_of, space)
    return summary, stages


def trials_of(root: Path) -> list[Any]:
    return study(root, "s").get_trials(deepcopy=False)


def test_a_continued_study_draws_new_settings_and_stays_reproducible(tmp_path: Path) -> None:
    study_of(tmp_path / "a")
    _, later = study_of(tmp_path / "a", trials=6)
    lrs = [t.params["lr"] for t in trials_of(tmp_path / "a")]
    assert len(lrs) == 6 and not set(lrs[3:]) & set(lrs[:3])
    assert len(set(later.runs)) == 3 and not set(later.runs) & {t.user_attrs["run"] for t in
                                                           trials_of(tmp_path / "a")[:3]}
    study_of(tmp_path / "b")
    study_of(tmp_path / "b", trials=6)
    assert [t.params["lr"] for t in trials_of(tmp_path / "b")] == lrs  # the same seed, the same draws


def test_the_wilcoxon_pruner_stops_a_worse_trial_between_folds(tmp_path: Path) -> None:
    """PRUNER=wilcoxon compares a trial fold by fold with the best one: a trial worse on every fold
    is stopped once four folds make the difference count (p = 1/16 < 0.1), never within a fold."""
    _, stages = study_of(tmp_path, base=replace(Settings(), folds=5, epochs=1), pruner="wilcoxon",
                         trials=5)
    trials = trials_of(tmp_path)
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    best = max(t.value for t in trials if t.state.name == "COMPLETE")
    assert pruned and all(t.user_attrs["outcome"] == "pruned after fold 3" for t in pruned)
    assert all(stages.runs.count(t.user_attrs["run"]) == 4 for t in pruned)  # folds 0-3 of 5
    assert all(1 - abs(t.params["lr"] - 3e-3) < best for t in pruned)


def test_a_killed_trial_is_queued_once_and_its_run_comes_next(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    study_of(tmp_path, trials=1)
    made = study(tmp_path, "s")
    killed = made.ask()  # as a SIGKILLed worker leaves it: running, never told
    killed.suggest_float("lr", 1e-4, 1e-2, log=True)
    killed.set_user_attr("run", "rnn-h128-e2-killed")
    assert tune_study.requeue_stopped(made, journal=True) == 1
    assert "1 waiting" in tune_study.status(Paths(tmp_path), "s", None)
    assert tune_study.requeue_stopped(made, journal=True) == 0  # queued once, however often asked
    _, stages = study_of(tmp_path, trials=2)
    killed_run = run_id(replace(Settings(), folds=2, epochs=2, lr=killed.params["lr"]), "d")
    assert stages.runs[0] == killed_run  # the killed trial's run is the one trained (resumed) next
    trials = trials_of(tmp_path)
    assert trials[2].params == killed.params and trials[2].user_attrs["retry_of"] == killed.number
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "queued again" in capsys.readouterr().out


def test_an_interrupted_study_writes_its_summary_and_resumes_the_trial(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        study_of(tmp_path, trials=3, stages=FakeStages(interrupt_at=2))  # trial 1, fold 0
    assert (tmp_path / "runs" / "tune" / "s" / "best.toml").is_file()  # trial 0 completed
    stopped = trials_of(tmp_path)[1]
    assert stopped.state.name == "FAIL" and stopped.user_attrs["outcome"] == "interrupted"
    _, again = study_of(tmp_path, trials=3)
    assert again.runs[0] == stopped.user_attrs["run"]  # the interrupted run is trained first
    assert [t.state.name for t in trials_of(tmp_path)].count("COMPLETE") == 3


@pytest.mark.parametrize("other", [{"tune_folds": 0}, {"pruner": "none"}, {"tune_folds": 2}])
def test_a_study_refuses_another_scoring(tmp_path: Path, other: dict[str, Any]) -> None:
    study_of(tmp_path, trials=1, tune_folds=1)
    with pytest.raises(PipelineError, match=r"STUDY=s scores its trials with TUNE_FOLDS=1, "
                                            r"PRUNER=median; this command asks"):
        study_of(tmp_path, trials=2, **other)
    study_of(tmp_path, trials=2, tune_folds=1)  # the same scoring continues
    assert len(trials_of(tmp_path)) == 2


@pytest.mark.slow
def test_sigint_to_a_two_worker_study_stops_every_worker(tmp_path: Path) -> None:
    run_cli(tmp_path, "folds", *SAMPLE, "--folds", "2")
    (tmp_path / "space.toml").write_text("[lr]\nlow = 1e-3\nhigh = 1e-2\n")
    proc = start_cli(tmp_path, "tune", "--trials", "6", "--workers", "2", "--tune-folds", "1",
                     "--space", str(tmp_path / "space.toml"), "--folds", "2", "--epochs", "60",
                     "--hidden", "16", output=True, sigint=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list((tmp_path / "runs").glob("*/fold_0.state.pt"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # to the tune process alone, not its workers
    _, err = proc.communicate(timeout=90)  # the workers stop too, not after every trial
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    made = study(tmp_path)
    states = [t.state.name for t in made.get_trials(deepcopy=False)]
    assert "RUNNING" not in states and states.count("FAIL") == 2, states
    assert all(t.user_attrs.get("outcome") == "interrupted" for t in made.get_trials()
               if t.state.name == "FAIL")


def test_a_second_worker_waits_for_the_run_another_trial_trains(tmp_path: Path) -> None:
    import threading

    from filelock import FileLock

    (tmp_path / "runs").mkdir()
    (tmp_path / "space.toml").write_text("[lr]\nchoices = [0.002]\n")
    same = run_id(replace(Settings(), folds=2, epochs=2, lr=0.002), "d")
    held = FileLock(tmp_path / "runs" / f".train-{same}.lock")
    held.acquire()
    stages = FakeStages()
    worker = threading.Thread(target=study_of, args=(tmp_path,), kwargs={"trials": 1,
                                                                         "stages": stages})
    worker.start()
    worker.join(timeout=2)
    assert worker.is_alive() and stages.runs == []  # waiting, not training the same folder
    held.release()
    worker.join(timeout=30)
    assert not worker.is_alive() and set(stages.runs) == {same}


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
    return tune_study.load(Paths(root), name, None)


def states(made: optuna.Study) -> list[str]:
    return [t.state.name for t in made.get_trials(deepcopy=False)]


@pytest.mark.slow
def test_a_tiny_study_writes_best_toml_and_its_trials_are_runs(project: Path) -> None:
    result = run_tune(project, "--trials", "3")
    assert result.stdout.count("tune: trial ") == 3 and "best: trial" in result.stdout
    best = project / "runs" / "tune" / "rnn" / "best.toml"
    text = best.read_text()
    assert "make submit CONFIG=runs/tune/rnn/best.toml" in text and "hidden = " in text
    runs = {r.id for r in all_runs(Paths(project)) if r.completed()}
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_two_workers_share_the_study(project: Path) -> None:
    run_tune(project, "--trials", "4", "--workers", "2", "--tune-folds", "1")
    trials = study(project).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert [s for s in states(study(project)) if s == "COMPLETE"] == ["COMPLETE"] * 4


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_killed_worker_does_not_wedge_the_study(project: Path) -> None:
    proc = start_cli(project, "tune", "--trials", "2", "--space", str(project / "space.toml"),
                     "--folds", "2", "--epochs", "16")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((project / "runs").glob("*/fold_0.state.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert states(study(project)) == ["RUNNING"]
    result = run_tune(project, "--trials", "2", "--epochs", "16")
    assert "left running by a stopped worker: marked failed" in result.stdout
    final = states(study(project))
    assert final.count("FAIL") == 1 and final.count("COMPLETE") == 2
    assert "resuming after epoch" in result.stdout  # the retried settings resumed the killed run


@pytest.mark.slow
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


@pytest.mark.slow
def test_unreachable_storage_and_another_space_are_clear_errors(project: Path) -> None:
    port = closed_port()
    result = run_tune(project, "--trials", "1", "--storage",
                  f"postgresql://user:secret@127.0.0.1:{port}/optuna", check=False)
    assert result.returncode == 1 and "cannot use this database" in result.stderr
    assert "secret" not in result.stderr and "user:***@" in result.stderr
    run_tune(project, "--trials", "1", "--tune-folds", "1")
    (project / "space.toml").write_text("[hidden]\nchoices = [4]\n")
    other = run_tune(project, "--trials", "2", "--tune-folds", "1", check=False)
    assert other.returncode == 1 and "another search space" in other.stderr


PG_BIN = Path("/usr/lib/postgresql/15/bin")
# A role of the test server that must give its password (every character a URL must escape).
GUARDED, GUARDED_PASSWORD = "guarded", "p@ss:w/rd?#% x"


def psql(url: str, sql: str) -> None:
    where = url.split("@")[1].split("/")[0]
    subprocess.run([str(PG_BIN / "psql"), "-h", where.split(":")[0], "-p", where.split(":")[1],
                    "-U", "tune", "-d", "postgres", "-c", sql], check=True, capture_output=True)


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
    hba = data / "pg_hba.conf"  # the first matching line wins: GUARDED must give its password
    hba.write_text(f"host all {GUARDED} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "log"),
                    "-o", f"-h 127.0.0.1 -p {port} -k {folder}", "start"], check=True,
                   capture_output=True)
    try:
        url = f"postgresql://tune@127.0.0.1:{port}/optuna"
        for sql in (f"CREATE ROLE {GUARDED} LOGIN PASSWORD '{GUARDED_PASSWORD}'",
                    f"CREATE DATABASE {GUARDED} OWNER {GUARDED}", "CREATE DATABASE optuna"):
            psql(url, sql)
        yield url
    finally:
        subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


# Passwords of distinctive parts joined by what a URL gives a meaning to: a part that shows up in
# a message shows a piece of the password, whichever library wrote it.
PART = st.from_regex(r"[a-z][0-9][A-Z][a-z0-9]", fullmatch=True)
MARKS = st.sampled_from(list("@:/%#? "))


def storage_command(root: Path, stage: str, url: str) -> subprocess.CompletedProcess[str]:
    if stage == "tune":
        return run_tune(root, "--trials", "1", "--study", "s", "--storage", url, check=False)
    return run_cli(root, stage, "--study", "s", "--storage", url, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["tune", "tune-status"])
@pytest.mark.parametrize("server", ["absent", "refusing"])
def test_no_part_of_a_storage_password_reaches_any_message(sample: Path, request: pytest.FixtureRequest,
                                                           stage: str, server: str) -> None:
    """Against no server, and against one that refuses the password: a password holding '@' is
    refused before connecting (saying to write it %40); any other reaches the server and its refusal
    is shown with no part of the password."""
    if server == "absent":
        user, where = "tuner", f"127.0.0.1:{closed_port()}"
    else:
        user, where = GUARDED, request.getfixturevalue("postgres").split("@")[1].split("/")[0]

    @settings(max_examples=max(4, settings.default.max_examples // 6))
    @given(first=PART, rest=st.lists(st.tuples(MARKS, PART), min_size=1, max_size=3))
    def search(first: str, rest: list[tuple[str, str]]) -> None:
        password = first + "".join(mark + part for mark, part in rest)
        result = storage_command(sample, stage, f"postgresql://{user}:{password}@{where}/{user}")
        said = result.stdout + result.stderr
        assert result.returncode == 1 and result.stderr.startswith("error: STORAGE="), said
        assert "Traceback" not in said and "***@" in result.stderr
        for part in (first, *(part for _, part in rest)):
            assert part not in said, (password, said)
        if "@" in password:
            assert "%40" in result.stderr and "cannot use this database" not in result.stderr
        elif server == "refusing":
            assert "password authentication failed" in result.stderr, said

    search()


@pytest.mark.slow
def test_a_password_written_with_its_escapes_reaches_the_server(sample: Path, postgres: str) -> None:
    from urllib.parse import quote

    where = postgres.split("@")[1].split("/")[0]
    raw = storage_command(sample, "tune-status", f"postgresql://{GUARDED}:{GUARDED_PASSWORD}@{where}/x")
    assert raw.returncode == 1 and "%40" in raw.stderr and "w/rd" not in raw.stderr
    escaped = quote(GUARDED_PASSWORD, safe="")
    status = storage_command(sample, "tune-status", f"postgresql://{GUARDED}:{escaped}@{where}/{GUARDED}")
    assert status.returncode == 1 and "STUDY=s: no such study in that storage" in status.stderr, \
        status.stderr


def open_storage(root: Path, url: str, checked: Any, made: Any, errors: Any) -> None:
    """A worker opening `url`, held after it has looked for Optuna's tables and found none, until
    the test has made them (as a faster machine would have in that moment)."""
    import sqlalchemy

    def hold(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith("CREATE") and not made.is_set():
            checked.wait()
            made.wait()

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", hold)
    try:
        tune_study.storage(Paths(root), "s", url)
    except PipelineError as exc:
        errors.put(str(exc))
        raise SystemExit(1) from None


@pytest.mark.slow
def test_machines_starting_at_once_on_a_new_database_all_get_in(tmp_path: Path, postgres: str) -> None:
    """Workers opening a database no study has used yet race to make Optuna's tables and types.
    The race is made certain: each worker finds none, then another makes them before it can; every
    worker still gets in."""
    import multiprocessing

    import sqlalchemy
    from optuna.storages._rdb.models import BaseModel

    url, workers_n = postgres.rsplit("/", 1)[0] + "/fresh", 3
    psql(postgres, "CREATE DATABASE fresh")
    fork = multiprocessing.get_context("fork")  # optuna and the driver already imported
    checked, made, errors = fork.Barrier(workers_n + 1), fork.Event(), fork.Queue()
    workers = [fork.Process(target=open_storage, args=(tmp_path, url, checked, made, errors),
                            daemon=True) for _ in range(workers_n)]  # none outlives a failure
    for w in workers:
        w.start()
    checked.wait(timeout=120)
    engine = sqlalchemy.create_engine(url)
    BaseModel.metadata.create_all(engine)
    engine.dispose()
    made.set()
    for w in workers:
        w.join(timeout=120)
    said = [errors.get() for _ in range(errors.qsize())]
    assert [w.exitcode for w in workers] == [0] * workers_n, said


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["tune", "tune-status"])
def test_a_study_name_that_would_leave_the_project_is_refused(project: Path, stage: str) -> None:
    result = run_cli(project, stage, "--study", "../../x", check=False)
    assert result.returncode == 1 and "STUDY='../../x': not a run name" in result.stderr
    assert not (project.parent / "x").exists() and not (project / "runs" / "tune").exists()


@pytest.mark.slow
def test_a_failing_trial_says_why_and_the_study_goes_on(project: Path) -> None:
    (project / "space.toml").write_text("[batch]\nchoices = [5000]\n")  # larger than a fold
    result = run_tune(project, "--trials", "1", "--drop-last")
    assert "failed: BATCH=5000 is larger than the" in result.stdout and "Traceback" not in result.stderr
    assert "no complete trial yet" in result.stdout and states(study(project)) == ["FAIL"]


@pytest.mark.slow
def test_tune_status_shows_the_libraries_warnings_only_when_asked(tmp_path: Path) -> None:
    """A database storage makes Optuna warn that heartbeats and retries are experimental: nothing a
    user can act on, so shown only with VERBOSE=1 (--verbose)."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    optuna.create_study(study_name="s", storage=url)
    args = ("tune-status", "--study", "s", "--storage", url)
    quiet = run_cli(tmp_path, *args, env={"PYTHONWARNINGS": ""})
    assert "study s: 0 complete" in quiet.stdout and quiet.stderr == "", quiet.stderr
    verbose = run_cli(tmp_path, *args, "--verbose", env={"PYTHONWARNINGS": ""})
    assert "study s: 0 complete" in verbose.stdout and "ExperimentalWarning" in verbose.stderr


def test_a_study_of_distilled_runs_is_refused_before_any_trial(tmp_path: Path) -> None:
    base = replace(Settings(), folds=2, epochs=2, teacher="blend-abc123")
    with pytest.raises(PipelineError, match=r"TEACHER=blend-abc123: a study's trials are not distilled"):
        study_of(tmp_path, base=base)
    assert not (tmp_path / "runs" / "tune").exists()
