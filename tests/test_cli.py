"""The command line: options and their environment variables, stage chaining and skipping, the
project lock, and make."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, TINY, fresh_clone, run_cli, run_make, snapshot, start_cli, the_run, write_project
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main, parse
from pipeline.config import Paths, Settings
from pipeline.errors import PipelineError
from pipeline.options import OPTIONS as DECLARED_OPTIONS
from pipeline.options import make_names
from pipeline.store.lock import project_lock
from pipeline.store.submission import validate_file

OPTION = re.compile(r"\b[A-Z_]{3,}=")


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny data sets: 60 balanced rows, and 40 rows where digit 7 has only 3."""
    balanced = tmp_path_factory.mktemp("balanced")
    write_project(balanced, [i % 10 for i in range(60)], 7)
    rare = tmp_path_factory.mktemp("rare")
    write_project(rare, [i % 10 if i % 10 != 7 else 1 for i in range(37)] + [7, 7, 7], 5, seed=1)
    return {"balanced": balanced, "rare": rare}


# Every setting with choices and every switch, from their declarations (a new one is searched as it is
# declared); numbers in ranges that keep each example quick.
CHOSEN = {"--" + f.name.replace("_", "-"): st.sampled_from(f.metadata["choices"]) for f in fields(Settings)
          if f.metadata["choices"]}
OPTIONS = st.fixed_dictionaries({
    **CHOSEN,
    "--hidden": st.integers(1, 12),
    "--layers": st.integers(1, 2),
    "--dropout": st.floats(0, 0.9),
    "--folds": st.integers(2, 8),
    "--epochs": st.integers(1, 3),
    "--batch": st.integers(1, 80),
    "--lr": st.floats(1e-6, 10),
    "--clip": st.floats(0, 5),
    "--ema": st.floats(0, 1),
    "--label-smoothing": st.floats(0, 0.99),
    "--rotate": st.floats(0, 180),
    "--scale": st.floats(0, 0.99),
    "--shift": st.floats(0, 28),
    "--elastic": st.floats(0, 200),
    "--elastic-sigma": st.floats(0.5, 14),
    "--fold-seed": st.integers(0, 2**32 - 1),
    "--seed": st.integers(0, 2**32 - 1),
    "--tta": st.integers(0, 2),
}, optional={"--" + ("no-" if f.default else "") + f.name.replace("_", "-"): st.just(None)
             for f in fields(Settings) if isinstance(f.default, bool)})


@pytest.mark.slow
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=OPTIONS, data=st.sampled_from(["balanced", "rare"]))
def test_every_accepted_option_runs_or_names_itself(projects: dict[str, Path], options: dict,
                                                    data: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = projects[data]
    words = [w for k, v in options.items() for w in ([k] if v is None else [k, str(v)])]
    code = main(["--root", str(root), "predict", "--eval-batch", "64", *words])
    err = capsys.readouterr().err
    if code == 0:
        n_test = len(pd.read_csv(Paths(root).test_csv))
        assert len(validate_file(Paths(root).submission_csv, n_test)) == n_test
        return
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    loss = "the loss became" in err and "LR=" in err  # a diverging run stops and says what to try
    assert loss or OPTION.search(err), f"the message names no option: {err}"


@pytest.mark.slow
def test_train_on_a_fresh_clone_builds_what_it_needs(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "train", *TINY)
    for line in ("download: source auto -> sample", "prepare: reruns: not made yet",
                 "folds: reruns: not made yet", "train: fold 0 reruns: not made yet"):
        assert line in result.stdout
    run = the_run(tmp_path)
    assert run.model(0).is_file() and run.model(1).is_file() and not run.record.exists()


@pytest.mark.slow
def test_each_stage_says_why_it_reruns_and_predict_trains_the_folds_missing(run_copy: Path) -> None:
    """The one freshness rule on each stage: a missing output, changed input, damaged output; after
    one fold of a run is trained alone, predict trains the rest."""
    paths, run = Paths(run_copy), the_run(run_copy)
    run.oof_fold(1).unlink()
    (paths.prepared / "test_x.npy").write_bytes(b"damaged")
    result = run_cli(run_copy, "predict", *TINY)
    assert "prepare: reruns: damaged" in result.stdout
    assert "train: fold 0 skipped" in result.stdout
    assert "train: fold 1 reruns: oof_1.csv is missing" in result.stdout
    assert f"predict: {run.id} reruns: folds changed" in result.stdout
    paths.train_csv.write_text(paths.train_csv.read_text())  # same bytes, new modification time
    touched = run_cli(run_copy, "prepare")
    assert "prepare: reruns: train.csv changed" in touched.stdout
    result = run_cli(run_copy, "train", "--fold", "0", "--folds", "2", "--epochs", "1", "--hidden", "32")
    run = the_run(run_copy, "rnn-h32-e1")
    assert "folds [0]" in result.stdout and not run.model(1).exists()
    predicted = run_cli(run_copy, "predict", "--folds", "2", "--epochs", "1", "--hidden", "32")
    assert "train: fold 0 skipped" in predicted.stdout and "train: fold 1 reruns" in predicted.stdout
    assert "OOF accuracy" in predicted.stdout and run.record.is_file()


@pytest.mark.slow
def test_a_run_is_named_by_run_and_an_edited_config_or_changed_data_is_said_to_be(run_copy: Path) -> None:
    """RUN= trains and predicts that run; settings that do not change learning retrain nothing. When
    its config.json was edited by hand, the file and the setting are named, not the data; once the
    data changes too, the data is named."""
    run = the_run(run_copy)
    same = run_cli(run_copy, "train", "--fold", "0", *TINY, "--eval-batch", "64", "--jobs", "1")
    assert "train: fold 0 skipped" in same.stdout and len(list((run_copy / "runs").glob("rnn-*"))) == 1
    run.model(1).unlink()
    result = run_cli(run_copy, "train", "--run", run.id, "--fold", "1")
    assert "train: fold 1 reruns: fold_1.pt is missing" in result.stdout and run.model(1).is_file()
    refused = run_cli(run_copy, "predict", "--run", run.id, "--hidden", "64", check=False)
    assert refused.returncode == 1 and "HIDDEN cannot be given" in refused.stderr
    missing = run_cli(run_copy, "predict", "--run", "rnn-nothing", check=False)
    assert missing.returncode == 1 and "no such run" in missing.stderr
    config = json.loads(run.config.read_text())
    run.config.write_text(json.dumps({**config, "hidden": 64}))
    edited = run_cli(run_copy, "predict", "--run", run.id, check=False)
    assert edited.returncode == 1 and "other data" not in edited.stderr, edited.stderr
    assert f"runs/{run.id}/config.json" in edited.stderr and "HIDDEN=64 (the run: 32)" in edited.stderr
    run.config.write_text(json.dumps(config))
    train_csv = Paths(run_copy).train_csv
    train_csv.write_text("".join(train_csv.read_text().splitlines(keepends=True)[:-1]))
    moved = run_cli(run_copy, "predict", "--run", run.id, check=False)
    assert moved.returncode == 1 and "made from other data than input/*.csv now hold" in moved.stderr


@pytest.mark.slow
def test_make_passes_the_options_on_its_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    dry = run_make("-n", "train", "EPOCHS=5", "SETUP=", check=True)
    assert '-m pipeline --make "EPOCHS" train' in dry.stdout
    given = {"FOLD": "2", "EPOCHS": "5", "MODEL": "gru", "HIDDEN": "64", "VIEW": "cols",
             "BIDIRECTIONAL": "1", "CUDA_GRAPH": "1", "AMP": "0", "NOWAIT": "1"}
    for name, value in given.items():
        monkeypatch.setenv("DIGITS_OPT_" + name, value)
        monkeypatch.setenv(name, "garbage")  # the plain name is never read
    args = parse(["--make", " ".join(given), "train", "--clip", "0.5"])
    assert (args.fold, args.epochs, args.model, args.hidden, args.view) == (2, 5, "gru", 64, "cols")
    assert (args.bidirectional, args.cuda_graph, args.amp, args.clip, args.nowait) == \
        (True, True, False, 0.5, True)
    assert parse(["--make", "HIDDEN", "train"]).epochs is None  # only the options named
    # A Python that cannot read the option names stops make, rather than dropping every option given.
    broken = run_make("-n", "train", "EPOCHS=5", "SETUP=", "PYTHON=false")
    assert broken.returncode != 0 and "cannot read the option names with PYTHON=false" in broken.stderr
    monkeypatch.setenv("DIGITS_OPT_RUN", "rnn-h8-e1-abcdef")
    assert parse(["--make", "RUN", "forget"]).run == "rnn-h8-e1-abcdef"  # a stage's own option
    monkeypatch.setenv("DIGITS_OPT_AMP", "maybe")
    with pytest.raises(PipelineError, match="AMP='maybe': must be 1 or 0"):
        parse(["--make", "AMP", "train"])


def other_value(name: str) -> str:
    """A valid value of an option or setting that differs from its default."""
    declared = {f.name.upper(): (f.default, f.metadata["choices"]) for f in fields(Settings)}
    declared.update({o.name.upper(): (o.default, o.choices) for o in DECLARED_OPTIONS})
    default, choices = declared[name]
    if choices:
        return str(next(c for c in choices if c != default))
    if isinstance(default, bool) or default is None:
        return "0" if default else "1"
    return str(default + 1) if isinstance(default, int | float) else "other"


@pytest.mark.slow
def test_options_a_shell_exports_change_nothing(tmp_path: Path) -> None:
    """Every option's plain name exported, with a wrong value and with another valid one: `make
    submit` trains and writes exactly what it writes without them, and `make predict RUN=<id>`
    runs with the run's own values exported too."""
    clone = fresh_clone(tmp_path / "clone")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    names = [*make_names(), "ARGS"]
    wrong = {**clean, **dict.fromkeys(names, "gpt-4")}
    other = {**clean, **{n: other_value(n) for n in make_names()}, "ARGS": "--fold 9",
             "FORCE": "1", "TEACHER": "rnn-h8-e9-000000", "EPOCHS": "3"}
    outputs = []
    for env in (clean, wrong, other):  # after the first, a value read would retrain, or stop it
        made = run_make("submit", "EPOCHS=1", "FOLDS=2", "HIDDEN=8", "SETUP=", f"PY={sys.executable}",
                        cwd=clone, env=env, timeout=300)
        assert made.returncode == 0, made.stdout + made.stderr
        assert (env is clean) != ("train: fold 1 skipped" in made.stdout), made.stdout
        run = the_run(clone)
        outputs.append((run.id, run.oof.read_bytes(), (clone / "submissions/submission.csv").read_bytes()))
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    own = {**wrong, **{k.upper(): str(v) for k, v in json.loads(run.config.read_text()).items()}}
    again = run_make("predict", f"RUN={outputs[0][0]}", "SETUP=", f"PY={sys.executable}", cwd=clone,
                     env=own, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"predict: {outputs[0][0]} skipped" in again.stdout and "train: fold 1 skipped" in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("bad", [["--folds", "1"], ["--model", "cnn"], ["--lr", "-1"],
                                 ["--fold", "7", "--folds", "2"], ["--epochs", "0"]])
def test_bad_options_fail_cleanly(run_copy: Path, bad: list[str]) -> None:
    result = run_cli(run_copy, "train", *bad, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip()


@pytest.mark.slow
def test_a_second_command_waits_or_stops_with_nowait_and_a_killed_holder_never_blocks(tmp_path: Path) -> None:
    with project_lock(Paths(tmp_path), "make submit"):
        result = run_cli(tmp_path, "--nowait", "prepare", check=False, process=True)
        assert result.returncode == 1
        assert "`make submit` (pid" in result.stderr and "NOWAIT=1" in result.stderr
        waiting = start_cli(tmp_path, "download", output=True)
        said, silent = "", threading.Timer(60, waiting.kill)  # one waiting unsaid ends, and fails
        silent.start()
        while "waiting: `make submit`" not in said and (line := waiting.stderr.readline()):
            said += line  # it says it waits before it waits (a process that went on ends the loop)
        silent.cancel()
        assert "waiting: `make submit`" in said and waiting.poll() is None, said
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and "wrote the sample" in out, said + err
    assert run_cli(tmp_path, "runs").returncode == 0  # reading needs no lock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from pipeline.config import Paths;"
        "from pipeline.store.lock import project_lock\n"
        f"with project_lock(Paths(Path({str(tmp_path)!r})), 'make train'):\n"
        "    print('held', flush=True); time.sleep(60)")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    held = run_cli(tmp_path, "--nowait", "download", check=False, process=True)
    assert held.returncode == 1 and "`make train`" in held.stderr
    holder.kill()
    holder.wait()
    assert run_cli(tmp_path, "--nowait", "download").returncode == 0


@pytest.mark.slow
def test_a_failed_command_writes_nothing_about_a_run(two_run_project: Path) -> None:
    """Issue case 3: DEVICE=cuda on a machine without CUDA changes no run's record."""
    before = snapshot(two_run_project / "runs", skip=(".lock", ".lock.json"), folders=False)
    result = run_cli(two_run_project, "train", "--device", "cuda", "--epochs", "7", "--hidden", "64",
                     check=False)
    assert result.returncode == 1 and "DEVICE=cuda" in result.stderr
    after = snapshot(two_run_project / "runs", skip=(".lock", ".lock.json"), folders=False)
    assert after == before
