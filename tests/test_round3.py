"""Hardening, round 3 (issue 21): studies that continue and recover as the README says, and run
folders that fail in words. Fast: fake run folders and fake stages, no training."""

from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
from conftest import fake_run
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cli import build_parser, main
from pipeline.config import Paths, Settings, resolve, validate
from pipeline.stages import runs, tune
from pipeline.store.artifacts import all_runs

REPO = Path(__file__).resolve().parent.parent


# -- item 11: the README's MEAN default ---------------------------------------------------------

def test_the_readme_calls_only_the_real_mean_the_default() -> None:
    _, stages = build_parser()
    default = stages["blend"].parse_args([]).mean
    text = (REPO / "README.md").read_text(encoding="utf-8")
    claimed = re.findall(r"`MEAN=(\w+)` \(the default\)", text)
    assert claimed and set(claimed) == {default}


# -- item 6: passwords ---------------------------------------------------------------------------

SECRET = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=4, max_size=20)
PLAIN = st.from_regex(r"[a-z][a-z0-9]{2,8}", fullmatch=True)


@given(user=PLAIN, password=SECRET, host=PLAIN, db=PLAIN)
def test_no_part_of_a_password_is_ever_shown(user: str, password: str, host: str, db: str) -> None:
    url = f"postgresql://{user}:{password}@{host}.example:5432/{db}"
    assert tune.hide_password(url) == f"postgresql://{user}:***@{host}.example:5432/{db}"
    said = tune.hide_password(url, f"could not connect to {url} (password {password!r} rejected)")
    assert password not in said and "***" in said


def test_a_password_with_an_at_sign_is_hidden_whole() -> None:
    url = "postgresql://user:p@ss@127.0.0.1:1/db"
    assert tune.hide_password(url) == "postgresql://user:***@127.0.0.1:1/db"
    assert tune.hide_password("postgresql://tune@host/db") == "postgresql://tune@host/db"


# -- item 7: runs/tune is not a run --------------------------------------------------------------

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


# -- item 8: a report never trains ---------------------------------------------------------------

@pytest.mark.parametrize("latest", [None, "garbage/\n", "rnn-h32-e2-gone00"])
def test_report_without_a_usable_latest_names_the_runs_and_trains_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], latest: str | None) -> None:
    fake_run(tmp_path, "rnn-h32-e2-aaaaaa")
    fake_run(tmp_path, "gru-h32-e2-bbbbbb")
    if latest is not None:
        (tmp_path / "runs" / "latest").write_text(latest)
    assert main(["--root", str(tmp_path), "report"]) == 1
    err = capsys.readouterr().err
    assert "make report RUN=<id>" in err and "rnn-h32-e2-aaaaaa" in err and "gru-h32-e2-bbbbbb" in err
    assert "RUN=rnn-h32-e2-gone00:" not in err  # never a RUN= the user did not give
    assert not (tmp_path / "input").exists() and not (tmp_path / "reports").exists()


def test_report_with_no_run_at_all_says_how_to_make_one(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path), "report"]) == 1
    assert "make submit" in capsys.readouterr().err and not (tmp_path / "input").exists()


# -- item 10: wrong types in SPACE= and CONFIG= --------------------------------------------------

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


SCALARS = st.one_of(st.integers(-10, 300), st.floats(allow_nan=True), st.booleans(),
                    st.sampled_from(["rnn", "gru", "8", "1e-3", "", "true"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(
    st.sampled_from(["a", "low"]), SCALARS, max_size=2))
SPACE_NAMES = ["hidden", "lr", "model", "augment", "dropout", "label_smoothing", "folds", "fold_seed",
               "seed", "device", "epochs"]


@given(name=st.sampled_from(SPACE_NAMES), entry=st.dictionaries(
    st.sampled_from(["choices", "low", "high", "log", "step"]), VALUES, max_size=4))
def test_any_space_entry_is_accepted_and_samplable_or_refused_in_words(
        tmp_path_factory: pytest.TempPathFactory, name: str, entry: dict[str, Any]) -> None:
    import optuna

    from pipeline.errors import PipelineError

    path = tmp_path_factory.mktemp("space") / "space.toml"
    path.write_text(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in entry.items()))
    try:
        space = tune.load_space(path)
    except PipelineError as exc:
        assert str(path) in str(exc) and f"[{name}]" in str(exc)
        return
    assert name not in ("folds", "fold_seed", "device")  # fold settings and non-learned ones: refused
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for _ in range(3):
        params = tune.suggest(optuna.create_study().ask(), space)
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
    from pipeline.errors import PipelineError

    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=re.escape(words)) as caught:
        tune.load_space(path)
    assert str(path) in str(caught.value)


CONFIG_NAMES = ["preset", "hidden", "lr", "model", "augment", "device", "view", "seed"]


@given(values=st.dictionaries(st.sampled_from(CONFIG_NAMES), VALUES, min_size=1, max_size=3))
def test_any_config_file_gives_typed_settings_or_names_the_file(
        tmp_path_factory: pytest.TempPathFactory, values: dict[str, Any]) -> None:
    from pipeline.errors import PipelineError

    path = tmp_path_factory.mktemp("config") / "settings.json"
    path.write_text(json.dumps(values))
    try:
        cfg = resolve(file=path)
    except PipelineError as exc:
        assert str(path) in str(exc)
        return
    for f in fields(Settings):
        assert type(getattr(cfg, f.name)) is type(f.default), f.name


def test_a_preset_that_is_not_a_string_is_named(tmp_path: Path) -> None:
    from pipeline.errors import PipelineError

    path = tmp_path / "c.toml"
    path.write_text('preset = ["tuned"]\n')
    with pytest.raises(PipelineError, match=r"c\.toml: preset must be one of default, tutorial, tuned"):
        resolve(file=path)


# -- item 9: damaged records are named and skipped, never a traceback -----------------------------

RECORD_FIELDS = ["complete", "kind", "config", "oof_acc", "oof_loss", "fold_min", "fold_max",
                 "seconds", "finished", "oof_acc_tta", "weights", "oof_acc_honest"]
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(),
                              st.text(max_size=4)),
                    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
                        st.text(max_size=3), inner, max_size=2), max_leaves=4)


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


def test_make_runs_names_the_damaged_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_run(tmp_path, "rnn-h32-e2-good00")
    bad = fake_run(tmp_path, "rnn-h32-e2-bad000")
    record = json.loads((bad / "run.json").read_text())
    del record["fold_min"]
    (bad / "run.json").write_text(json.dumps(record))
    (tmp_path / "runs" / "rnn-h32-e2-good00" / "config.json").write_text("[1, 2]")
    assert main(["--root", str(tmp_path), "runs"]) == 0
    out, err = capsys.readouterr()
    assert "rnn-h32-e2-bad000: damaged record (missing 'fold_min')" in err
    assert "rnn-h32-e2-good00: damaged record (config.json is not a table of settings)" in err
    assert "(damaged record)" in out and "2 run(s)" in out


def test_a_cv_table_is_checked_row_by_row(tmp_path: Path) -> None:
    from pipeline.errors import PipelineError
    from pipeline.store.artifacts import check_cv

    path = tmp_path / "rnn-x" / "cv.csv"
    path.parent.mkdir()
    good = "fold,best_epoch,valid_loss,valid_acc\n0,1,0.3,0.9\n1,2,0.3,0.9\nall,,0.3,0.9\n"
    path.write_text(good)
    assert len(check_cv(path, 2)) == 3
    for damaged in (good[:60], good.replace("0.9\n1", "x\n1"), "\x00\x01", "a,b\n1,2\n",
                    good.replace("all", "2")):
        path.write_text(damaged)
        with pytest.raises(PipelineError, match=r"cv\.csv: .*make predict RUN=rnn-x FORCE=1"):
            check_cv(path, 2)


@pytest.mark.slow
def test_truncated_predictions_are_rebuilt_and_never_blended(run_copy: Path) -> None:
    from conftest import SAMPLE, TINY, run_cli, the_run

    run = the_run(run_copy)
    run.oof.write_text("".join(run.oof.read_text().splitlines(keepends=True)[:40]))
    refused = run_cli(run_copy, "blend", "--runs", run.id, *SAMPLE, *TINY, check=False)
    assert refused.returncode == 1 and f"make predict RUN={run.id} FORCE=1" in refused.stderr
    assert "Traceback" not in refused.stderr
    again = run_cli(run_copy, "predict", *SAMPLE, *TINY)
    assert f"predict: {run.id} reruns: damaged" in again.stdout
    assert len(run.oof.read_text().splitlines()) == 1498  # the header and every sample row
    run_cli(run_copy, "blend", *SAMPLE, *TINY)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_cv_table_stops_the_report_in_words(run_copy: Path, damage: str) -> None:
    from conftest import run_cli, the_run

    run = the_run(run_copy)
    text = run.cv.read_text()
    run.cv.write_text("fold,valid\nx,\x01\n" if damage == "garbage" else text.splitlines()[0] + "\n"
                      + text.splitlines()[1] + "\n")
    result = run_cli(run_copy, "report", "--run", run.id, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cv.csv" in result.stderr and f"make predict RUN={run.id} FORCE=1" in result.stderr


# -- items 1, 2, 4, 5: studies that continue, recover and refuse as the README says ------------

class FakeStages:
    """train.run and predict.run stand-ins: a score from the settings, no training. interrupt_at:
    the call (counted from 0, one per fold) that raises KeyboardInterrupt, as a Ctrl-C would."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.runs: list[str] = []
        self.interrupt_at = interrupt_at

    def train(self, cfg: Settings, paths: Paths, run: Any, data: Any, fold_of: Any,
              folds: list[int], on_epoch: Any = None) -> list[dict[str, Any]]:
        if len(self.runs) == self.interrupt_at:
            self.runs.append(run.id)
            raise KeyboardInterrupt
        self.runs.append(run.id)
        return [{"fold": f, "valid_acc": 1 - abs(cfg.lr - 3e-3)} for f in folds]

    def predict(self, cfg: Settings, paths: Paths, run: Any, data: Any, fold_of: Any,
                records: list[dict[str, Any]], publish: bool = True) -> dict[str, Any]:
        return {"oof_acc": records[0]["valid_acc"]}


def tiny_data() -> tuple[Any, Any]:
    import numpy as np

    from pipeline.store.artifacts import Prepared

    labels = np.arange(20, dtype=np.uint8) % 10
    return (Prepared(np.zeros((20, 28, 28), np.uint8), labels, np.zeros((4, 28, 28), np.uint8), "d"),
            np.arange(20) % 2)


def study_of(root: Path, **options: Any) -> Any:
    """Run a study of the fake stages in root; returns (the summary, the stages)."""
    root.mkdir(parents=True, exist_ok=True)
    space = root / "space.toml"
    if not space.exists():
        space.write_text("[lr]\nlow = 1e-4\nhigh = 1e-2\nlog = true\n")
    data, fold_of = tiny_data()
    stages = options.pop("stages", FakeStages())
    base = options.pop("base", replace(Settings(), folds=2, epochs=2))
    summary = tune.run(Paths(root), base, data, fold_of, (stages.train, stages.predict),
                       study="s", space_path=space, **{"trials": 3, **options})
    return summary, stages


def trials_of(root: Path) -> list[Any]:
    return tune.load(Paths(root), "s", None).get_trials(deepcopy=False)


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


def test_a_killed_trial_is_queued_once_and_its_run_comes_next(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    study_of(tmp_path, trials=1)
    made = tune.load(Paths(tmp_path), "s", None)
    killed = made.ask()  # as a SIGKILLed worker leaves it: running, never told
    killed.suggest_float("lr", 1e-4, 1e-2, log=True)
    killed.set_user_attr("run", "rnn-h128-e2-killed")
    assert tune.requeue_stopped(made, journal=True) == 1
    assert "1 waiting" in tune.status(Paths(tmp_path), "s", None)
    assert tune.requeue_stopped(made, journal=True) == 0  # queued once, however often asked
    _, stages = study_of(tmp_path, trials=2)
    from pipeline.store.artifacts import run_id

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
    from pipeline.errors import PipelineError

    study_of(tmp_path, trials=1, tune_folds=1)
    with pytest.raises(PipelineError, match=r"STUDY=s scores its trials with TUNE_FOLDS=1, "
                                            r"PRUNER=median; this command asks"):
        study_of(tmp_path, trials=2, **other)
    study_of(tmp_path, trials=2, tune_folds=1)  # the same scoring continues
    assert len(trials_of(tmp_path)) == 2


@pytest.mark.slow
def test_sigint_to_a_two_worker_study_stops_every_worker(tmp_path: Path) -> None:
    import signal
    import time

    from conftest import SAMPLE, run_cli, start_cli

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
    made = tune.load(Paths(tmp_path), "rnn", None)
    states = [t.state.name for t in made.get_trials(deepcopy=False)]
    assert "RUNNING" not in states and states.count("FAIL") == 2, states
    assert all(t.user_attrs.get("outcome") == "interrupted" for t in made.get_trials()
               if t.state.name == "FAIL")


# -- item 3: a run is trained on the folds of its own settings ----------------------------------

def test_the_fold_settings_are_in_every_run_id_and_in_the_folds_record() -> None:
    from pipeline.config import FOLD_SETTINGS
    from pipeline.store.artifacts import folds_inputs, run_id

    base = Settings()
    for name in FOLD_SETTINGS:
        assert Settings.__dataclass_fields__[name].metadata["learns"], name
        other = replace(base, **{name: getattr(base, name) + 1})
        assert run_id(other, "d") != run_id(base, "d")
        assert folds_inputs("d", other) != folds_inputs("d", base)
    assert set(folds_inputs("d", base)) == {"data", *FOLD_SETTINGS}


@pytest.mark.slow
def test_models_trained_on_other_folds_are_never_current(run_copy: Path) -> None:
    from conftest import the_run

    from pipeline.errors import PipelineError
    from pipeline.stages import folds, train
    from pipeline.store.artifacts import load_prepared, read_folds

    paths, run = Paths(run_copy), the_run(run_copy)
    labels = load_prepared(paths).train_y.astype("int64")
    assert train.fold_stale(run, 0, read_folds(paths)) == ""
    other = folds.assign(labels, 2, 7)  # seed 7's folds, not the run's seed 42
    assert "trained on other folds" in train.fold_stale(run, 0, other)
    with pytest.raises(PipelineError, match=r"FOLDS=3, but the folds given hold 2"):
        train.check_settings(replace(Settings(), folds=3), read_folds(paths))


# -- item 12: blends shown as they are, and fold lines that never mix ----------------------------

def test_a_one_run_blend_is_that_run_once() -> None:
    import numpy as np

    from pipeline.stages import blend

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    logits = rng.normal(size=(200, 10))
    logits[np.arange(200), labels] += 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs * 0.999, 6)  # as read back from a CSV: rows need not sum to 1
    for mean in blend.MEANS:
        assert blend.select(probs[None], labels, mean).tolist() == [1.0]


def test_train_of_a_blend_says_it_is_a_blend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = fake_run(tmp_path, "blend-abc123", kind="blend", weights={"rnn-a": 1})
    (folder / "blend.json").write_text('{"weights": {"rnn-a": 1}}')
    (folder / "config.json").unlink()
    for stage in ("train", "predict"):
        assert main(["--root", str(tmp_path), stage, "--run", "blend-abc123"]) == 1
        err = capsys.readouterr().err
        assert "RUN=blend-abc123 is a blend of other runs" in err and "no such run" not in err
    assert not (tmp_path / "input").exists()


def test_a_blend_report_headlines_the_honest_accuracy() -> None:
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from pipeline.stages import report

    cv = pd.DataFrame({"fold": ["0", "1", "all"], "valid_acc": [0.9, 0.9, 0.95]})
    run = SimpleNamespace(cv=cv, name="blend-x", train_y=np.zeros(4), source="sample", ensemble={
        "kind": "blend", "oof_acc_honest": 0.91, "weights": {"a": 1, "b": 2}, "model": "blend"})
    text = report._summary(run, Paths())
    assert "<b>OOF accuracy:</b> 0.9100 honest" in text and "in-sample 0.9500" in text


def test_folds_trained_at_once_write_whole_lines_never_bars(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from pipeline.stages import train

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = train.Progress(1, 3, 0, position=1)
    assert progress.bar is None
    progress.update({"epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "valid_loss": 0.4,
                     "valid_acc": 0.85, "seconds": 1.0, "samples_per_s": 100.0})
    out = capsys.readouterr().out
    assert out.startswith("fold 1 epoch   1/3") and out.endswith("samples/s\n") and out.count("\n") == 1


BLEND_FIELDS = [*RECORD_FIELDS, "key", "data", "folds", "seed"]


@given(drop=st.sets(st.sampled_from(BLEND_FIELDS)),
       change=st.dictionaries(st.sampled_from(BLEND_FIELDS), JSON, max_size=3))
def test_blend_skips_a_damaged_run_in_words_and_keeps_the_good_one(
        tmp_path_factory: pytest.TempPathFactory, drop: set[str], change: dict[str, Any]) -> None:
    import numpy as np

    from pipeline.errors import PipelineError
    from pipeline.stages import blend
    from pipeline.store.artifacts import RunDir, write_probabilities

    root = tmp_path_factory.mktemp("blend")
    data, _ = tiny_data()
    for name in ("rnn-h32-e2-good00", "rnn-h32-e2-bad000"):
        run = RunDir(fake_run(root, name))
        write_probabilities(run.oof, np.full((20, 10), 0.1), {"row": np.arange(20)})
        write_probabilities(run.test, np.full((4, 10), 0.1), {"ImageId": np.arange(1, 5)})
    bad = root / "runs" / "rnn-h32-e2-bad000" / "run.json"
    record = {k: v for k, v in json.loads(bad.read_text()).items() if k not in drop} | change
    bad.write_text(json.dumps(record))
    chosen, skipped = blend.candidates(Paths(root), data, 2, 42, None)
    assert "rnn-h32-e2-good00" in [m.run.id for m in chosen]
    if "rnn-h32-e2-bad000" not in [m.run.id for m in chosen]:
        assert any(line.startswith("rnn-h32-e2-bad000: ") for line in skipped) or \
            record.get("kind") == "blend"
        with pytest.raises(PipelineError, match="rnn-h32-e2-bad000 cannot be blended"):
            blend.candidates(Paths(root), data, 2, 42, ["rnn-h32-e2-bad000"])


@pytest.mark.slow
def test_a_run_json_missing_a_field_is_rebuilt_by_predict(run_copy: Path) -> None:
    from conftest import SAMPLE, TINY, run_cli, the_run

    run = the_run(run_copy)
    record = json.loads(run.record.read_text())
    del record["fold_min"]
    run.record.write_text(json.dumps(record))
    again = run_cli(run_copy, "submit", *SAMPLE, *TINY)
    assert f"predict: {run.id} reruns: damaged (run.json lacks fold_min)" in again.stdout
    assert "fold_min" in json.loads(run.record.read_text())


def test_a_second_worker_waits_for_the_run_another_trial_trains(tmp_path: Path) -> None:
    import threading

    from filelock import FileLock

    from pipeline.store.artifacts import run_id

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


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_config_or_space_file_that_is_not_text_is_named(tmp_path: Path, suffix: str) -> None:
    from pipeline.errors import PipelineError

    path = tmp_path / f"binary{suffix}"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PipelineError, match=re.escape(str(path))):
        resolve(file=path)
    with pytest.raises(PipelineError, match=re.escape(str(path))):
        tune.load_space(path)
