"""Runs side by side, blend, forget, the two_run_project lock, names from the user, and the stage-by-stage
defects found by running one stage at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, TINY, copy_project, run_cli, snapshot, start_cli, the_run

from pipeline.config import Paths
from pipeline.errors import PipelineError
from pipeline.stages import blend
from pipeline.store.artifacts import check_name, latest

# -- blend on synthetic probabilities, where the right answer is known -----------------------------


def one_hot(labels: np.ndarray, sure: float) -> np.ndarray:
    probs = np.full((len(labels), 10), (1 - sure) / 9)
    probs[np.arange(len(labels)), labels] = sure
    return probs


def test_a_run_of_pure_noise_gets_no_weight() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 600)
    good = one_hot(labels, 0.7)
    wrong = rng.random(600) < 0.2  # the good run is wrong on a fifth of the rows
    good[wrong] = one_hot((labels[wrong] + 1) % 10, 0.7)
    noise = rng.dirichlet(np.ones(10), 600)
    counts = blend.select(np.stack([noise, good]), labels)
    assert counts[0] == 0 and counts[1] >= 1


def test_two_complementary_runs_beat_either() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 800)
    a, b = one_hot(labels, 0.6), one_hot(labels, 0.6)
    half = np.arange(800) < 400
    a[half] = one_hot((labels[half] + 1) % 10, 0.4)  # a is unsure and wrong on the first half
    b[~half] = one_hot((labels[~half] + 2) % 10, 0.4)  # b on the second
    probs = np.stack([a, b])
    counts = blend.select(probs, labels)
    assert counts[0] >= 1 and counts[1] >= 1
    blended = blend.combine(probs, counts, "prob").argmax(1)
    accuracy = [(p.argmax(1) == labels).mean() for p in probs]
    assert (blended == labels).mean() > max(accuracy)


def test_the_honest_estimate_does_not_flatter() -> None:
    """Many runs of noise: the in-sample selection overfits them, the honest estimate does not."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, 400)
    probs = rng.dirichlet(np.ones(10), (25, 400))
    fold_of = np.arange(400) % 4
    counts = blend.select(probs, labels)
    in_sample = (blend.combine(probs, counts, "prob").argmax(1) == labels).mean()
    honest = blend.honest_accuracy(probs, labels, fold_of, "prob")
    assert honest <= in_sample


# -- runs, blend and forget through the command line ---------------------------------------------


@pytest.fixture(scope="module")
def two_runs(sample_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample with two finished runs on the same folds: rows (the session's run) and columns."""
    root = copy_project(sample_run, tmp_path_factory.mktemp("two") / "p")
    run_cli(root, "submit", *TINY, "--view", "cols")
    return root


@pytest.fixture
def two_run_project(two_runs: Path, tmp_path: Path) -> Path:
    return copy_project(two_runs, tmp_path / "p")


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
def test_blend_refuses_runs_on_other_folds(two_run_project: Path) -> None:
    run_cli(two_run_project, "submit", "--folds", "3", "--epochs", "1", "--hidden", "16")
    other = the_run(two_run_project, "rnn-h16")
    everything = run_cli(two_run_project, "blend", "--folds", "2")
    assert f"blend: skipped {other.id}: on other folds (3 folds, FOLD_SEED 42)" in everything.stdout
    named = run_cli(two_run_project, "blend", "--folds", "2", "--runs", f"{other.id} "
                    f"{the_run(two_run_project, 'rnn-cols').id}", check=False)
    assert named.returncode == 1 and f"{other.id} cannot be blended: on other folds" in named.stderr


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


@pytest.mark.slow
def test_blend_runs_names_are_checked(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "blend", "--runs", "ok ../../etc", check=False)
    assert result.returncode == 1 and "RUNS='../../etc': not a run name" in result.stderr
    assert not (tmp_path / "input").exists()


# -- one command at a time -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_command_waits_or_stops_with_nowait(tmp_path: Path) -> None:
    from pipeline.store.lock import project_lock

    paths = Paths(tmp_path)
    with project_lock(paths, "make submit"):
        result = run_cli(tmp_path, "--nowait", "prepare", check=False, process=True)
        assert result.returncode == 1
        assert "`make submit` (pid" in result.stderr and "NOWAIT=1" in result.stderr
        waiting = start_cli(tmp_path, "download", output=True)
        time.sleep(3)
        assert waiting.poll() is None  # still waiting for the lock
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and "waiting: `make submit`" in err and "wrote the sample" in out
    assert run_cli(tmp_path, "runs").returncode == 0  # reading needs no lock


@pytest.mark.slow
def test_a_killed_holder_never_blocks(tmp_path: Path) -> None:
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


# -- found by running the stages one at a time -----------------------------------------------------


@pytest.mark.slow
def test_new_data_is_never_predicted_with_the_old(two_run_project: Path, tmp_path: Path) -> None:
    """Issue case 1: new CSVs from another folder; the stages use them, not the old cache."""
    paths = Paths(two_run_project)
    folder = tmp_path / "new"
    folder.mkdir()
    train = paths.train_csv.read_text().splitlines()
    test = paths.test_csv.read_text().splitlines()
    (folder / "train.csv").write_text("\n".join(train[:301]) + "\n")
    (folder / "test.csv").write_text("\n".join(test[:101]) + "\n")
    run_cli(two_run_project, "download", "--source", "dir", "--dir", str(folder), "--force")
    result = run_cli(two_run_project, "predict", *TINY, "--force")
    assert "prepare: reruns: train.csv changed" in result.stdout or \
        "prepare: reruns: test.csv, train.csv changed" in result.stdout
    submission = pd.read_csv(paths.submission_csv)
    assert len(submission) == 100
    record = json.loads((paths.runs / str(latest(paths)) / "run.json").read_text())
    assert record["source"] == "dir"


@pytest.mark.slow
def test_a_failed_command_writes_nothing_about_a_run(two_run_project: Path) -> None:
    """Issue case 3: DEVICE=cuda on a machine without CUDA changes no run's record."""
    before = snapshot(two_run_project / "runs", skip=(".lock", ".lock.json"), folders=False)
    result = run_cli(two_run_project, "train", "--device", "cuda", "--epochs", "7", "--hidden", "64",
                     check=False)
    assert result.returncode == 1 and "DEVICE=cuda" in result.stderr
    after = snapshot(two_run_project / "runs", skip=(".lock", ".lock.json"), folders=False)
    assert after == before


@pytest.mark.slow
def test_one_class_gets_a_warning(tmp_path: Path) -> None:
    """Issue case 5: a train.csv of digit 3 only says so; 2 folds is not told to use fewer."""
    folder = tmp_path / "threes"
    folder.mkdir()
    pixels = ",".join(["0"] * 784)
    (folder / "train.csv").write_text("label," + ",".join(f"pixel{k}" for k in range(784)) + "\n"
                                      + "".join(f"3,{pixels}\n" for _ in range(12)))
    (folder / "test.csv").write_text(",".join(f"pixel{k}" for k in range(784)) + "\n" + pixels + "\n")
    result = run_cli(tmp_path, "prepare", "--source", "dir", "--dir", str(folder))
    assert "WARNING: train.csv has no rows of digit(s) 0, 1, 2, 4, 5, 6, 7, 8, 9" in result.stdout
    rare = run_cli(tmp_path, "folds", "--folds", "20", check=False)
    assert rare.returncode == 1 and "use fewer folds" in rare.stderr
    from pipeline.stages.folds import assign

    with pytest.raises(PipelineError) as error:
        assign(np.array([3] * 12 + [5]), 2, 0)
    assert "use fewer folds" not in str(error.value) and "add rows of digit 5" in str(error.value)


@pytest.mark.slow
def test_missing_dir_is_an_error(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "download", "--source", "dir", "--dir", str(tmp_path / "nope"),
                     check=False)
    assert result.returncode == 1 and "no such folder" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("name", "text", "words"), [
    ("x.yaml", "epochs: 3\n", ["TOML (.toml) or JSON (.json)", "x.yaml"]),
    ("x.toml", "epochs = 'many'\n", ["x.toml: epochs must be a whole number", "'many'"]),
    ("x.toml", "hiden = 3\n", ["x.toml: unknown setting(s) hiden"]),
    ("x.json", '{"lr": -1}', ["x.json: LR=-1.0 is out of range", "lr must be a number from"]),
    ("x.toml", "model = [", ["x.toml: not valid TOML"]),
])
def test_config_file_errors_name_file_key_and_range(tmp_path: Path, name: str, text: str,
                                                   words: list[str]) -> None:
    (tmp_path / name).write_text(text)
    result = run_cli(tmp_path, "folds", "--config", str(tmp_path / name), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.slow
def test_few_steps_onecycle_and_preset_in_runs(two_run_project: Path) -> None:
    """2 epochs x 2 steps: OneCycleLR would divide by zero; PRESET=tutorial shows as such."""
    small = run_cli(two_run_project, "train", "--folds", "2", "--epochs", "2", "--batch", "700",
                    "--hidden", "8")
    assert "fold 1: best epoch" in small.stdout
    run_cli(two_run_project, "submit", "--preset", "tutorial", "--folds", "2", "--epochs", "1",
            "--hidden", "16")
    assert "preset=tutorial hidden=16 folds=2 epochs=1" in run_cli(two_run_project, "runs").stdout
