"""distill: a run that also learns from the test rows labelled by a teacher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SAMPLE, TINY, fake_run, run_cli, the_run, tiny_data

from pipeline.cli import main
from pipeline.config import Paths, resolve
from pipeline.errors import PipelineError
from pipeline.stages import distill
from pipeline.store.data import PIXELS, Pseudo, load_prepared
from pipeline.store.run import RunDir, all_runs, latest, write_probabilities

# A student that can memorise 200 noise images: wide enough, no augmentation, no smoothing.
MEMORISE = ("--folds", "2", "--epochs", "12", "--hidden", "96", "--batch", "25", "--lr", "0.005",
            "--no-augment", "--label-smoothing", "0", "--weight-decay", "0")


def noise_project(root: Path, rows: int = 200, test_rows: int = 100) -> None:
    """Random pixels with random (balanced) labels: nothing to learn that generalises, so an honest
    out-of-fold estimate is chance (about 0.1), whatever the student memorises."""
    rng = np.random.default_rng(0)
    source = root / "csv"
    source.mkdir(parents=True)
    labels = np.tile(np.arange(10), rows // 10)
    rng.shuffle(labels)
    train = pd.DataFrame(rng.integers(0, 256, (rows, 784)), columns=PIXELS)
    train.insert(0, "label", labels)
    train.to_csv(source / "train.csv", index=False)
    pd.DataFrame(rng.integers(0, 256, (test_rows, 784)), columns=PIXELS).to_csv(source / "test.csv",
                                                                                 index=False)
    assert main(["--root", str(root), "download", "--source", "dir", "--dir", str(source)]) == 0


def oof_accuracy(root: Path) -> float:
    name = latest(Paths(root))
    return float(json.loads((root / "runs" / str(name) / "run.json").read_text())["oof_acc"])


@pytest.mark.slow
def test_the_distilled_estimate_stays_honest_where_a_leak_would_show(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A teacher whose out-of-fold file holds every train row's true label (what a design that
    trains on the teacher's OOF probabilities would copy into each fold's held-out rows): the
    distilled student, trained on the teacher's test rows only, stays at chance on noise; the same
    student fed those OOF rows (the leaking design) scores far higher."""
    root = tmp_path / "p"
    noise_project(root)
    assert main(["--root", str(root), "submit", "--folds", "2", "--epochs", "1", "--hidden", "8"]) == 0
    paths = Paths(root)
    teacher = str(latest(paths))
    labels = load_prepared(paths).train_y.astype(np.int64)
    write_probabilities(paths.runs / teacher / "oof.csv", np.eye(10)[labels],
                        {"row": np.arange(len(labels)), "label": labels})

    assert main(["--root", str(root), "distill", "--teacher", teacher, *MEMORISE]) == 0
    honest = oof_accuracy(root)

    honest_rows = distill.pseudo_rows

    def leaking(paths: Paths, cfg, data, student=None) -> Pseudo:
        test = honest_rows(paths, cfg, data, student)
        oof = pd.read_csv(paths.runs / cfg.teacher / "oof.csv")
        probs = oof[[f"p{c}" for c in range(10)]].to_numpy(np.float32)
        return Pseudo(np.concatenate([test.images, data.train_x]),
                      np.concatenate([test.targets, probs]), test.key + "-leak")

    monkeypatch.setattr(distill, "pseudo_rows", leaking)
    assert main(["--root", str(root), "distill", "--teacher", teacher, *MEMORISE, "--seed", "1"]) == 0
    leaked = oof_accuracy(root)
    assert honest < 0.25, honest
    assert leaked > honest + 0.3, (honest, leaked)


def test_pseudo_rows_are_the_teachers_test_rows_tempered_and_thresholded(tmp_path: Path) -> None:
    root = tmp_path / "p"
    noise_project(root, rows=40, test_rows=30)
    assert main(["--root", str(root), "submit", "--folds", "2", "--epochs", "1", "--hidden", "8"]) == 0
    paths = Paths(root)
    teacher = str(latest(paths))
    data = load_prepared(paths)
    probs = np.full((30, 10), 0.02)
    probs[:, 0] = 0.82
    probs[::3] = 0.1  # every third row: no confidence at all
    write_probabilities(paths.runs / teacher / "test.csv", probs, {"ImageId": np.arange(1, 31)})
    cfg = resolve(overrides={"teacher": teacher, "distill_threshold": 0.5, "distill_temperature": 2.0})
    rows = distill.pseudo_rows(paths, cfg, data)
    keep = np.arange(30) % 3 != 0
    assert np.array_equal(rows.images, data.test_x[keep])
    assert rows.key == RunDir(paths.runs / teacher).read().key
    soft = np.sqrt(probs[keep])
    np.testing.assert_allclose(rows.targets, soft / soft.sum(1, keepdims=True), rtol=1e-5)
    assert rows.targets[:, 0].max() < 0.82  # T = 2 softens


@pytest.mark.parametrize("args, words", [
    (("--teacher", "nope"), "TEACHER=nope: no completed run or blend"),
    (("--teacher", "../x"), "TEACHER='../x': not a run name"),
])
def test_a_missing_teacher_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    args: tuple[str, ...], words: str) -> None:
    code = main(["--root", str(tmp_path), "distill", *SAMPLE, *TINY, *args])
    err = capsys.readouterr().err
    assert code == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any(p.name.endswith("-kd") or "-kd-" in p.name
                                                       for p in (tmp_path / "runs").iterdir())


def test_distill_without_any_run_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--root", str(tmp_path), "distill", *SAMPLE, *TINY])
    assert code == 1 and "make a run or a blend first" in capsys.readouterr().err


@pytest.mark.slow
def test_make_distill_is_a_run_like_any_other(run_copy: Path) -> None:
    """The latest run teaches by default; the student is kept, current on a rerun, resumable by
    RUN=, listed, and blends with its teacher on the same folds."""
    # run_copy: a finished `submit` of TINY on the sample, the teacher
    teacher = the_run(run_copy).id
    first = run_cli(run_copy, "distill", *TINY)
    assert f"distill: TEACHER={teacher} (the latest run or blend" in first.stdout
    student = the_run(run_copy, "rnn-h32-e2-kd-")
    assert json.loads(student.config.read_text())["teacher"] == teacher
    again = run_cli(run_copy, "distill", "--teacher", teacher, *TINY)
    assert "train: fold 0 skipped: its model is current" in again.stdout
    assert "skipped" in run_cli(run_copy, "train", "--run", student.id).stdout
    assert student.id in run_cli(run_copy, "runs").stdout
    blended = run_cli(run_copy, "blend", "--folds", "2", "--runs", f"{teacher} {student.id}")
    assert "honest" in blended.stdout
    # Its teacher forgotten, the student's trained folds still predict; a fold to train cannot.
    run_cli(run_copy, "forget", "--run", teacher)
    alone = run_cli(run_copy, "predict", "--run", student.id)
    assert f"TEACHER={teacher} is gone" in alone.stdout and "train: fold 1 skipped" in alone.stdout
    assert student.id in alone.stdout and "OOF accuracy" in alone.stdout
    student.model(1).unlink()
    stuck = run_cli(run_copy, "predict", "--run", student.id, check=False)
    assert stuck.returncode == 1 and f"TEACHER={teacher}" in stuck.stderr and "[1]" in stuck.stderr
    assert not student.model(1).exists()


def test_a_teacher_with_a_truncated_record_is_named_damaged(tmp_path: Path) -> None:
    record = fake_run(tmp_path, "rnn-h32-e2-bad000") / "run.json"
    record.write_bytes(record.read_bytes()[:40])
    cfg = resolve(overrides={"teacher": "rnn-h32-e2-bad000"})
    with pytest.raises(PipelineError, match=r"TEACHER=rnn-h32-e2-bad000: its record is damaged "
                                            r"\(rnn-h32-e2-bad000/run.json: not valid JSON"):
        distill.pseudo_rows(Paths(tmp_path), cfg, tiny_data()[0])


@pytest.mark.slow
@pytest.mark.parametrize(("changed", "said", "unsaid"), [
    ("train", ["another input/train.csv", "input/test.csv is the same"], "other digits"),
    ("test", ["another input/test.csv: its test predictions are of other digits"], "train.csv")])
def test_a_teacher_of_another_csv_is_refused_for_what_differs(run_copy: Path, changed: str, said: list[str],
                                                              unsaid: str) -> None:
    """The teacher learned from another train.csv (test.csv byte for byte the same, so its test
    predictions are of these very digits), or predicted another test.csv: what differs is named,
    nothing is trained."""
    teacher = the_run(run_copy).id
    csv = Paths(run_copy).train_csv if changed == "train" else Paths(run_copy).test_csv
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:-1]))
    result = run_cli(run_copy, "distill", "--teacher", teacher, *TINY, check=False)
    assert result.returncode == 1 and unsaid not in result.stderr, result.stderr
    assert all(words in result.stderr for words in said), result.stderr
    assert not [r for r in all_runs(Paths(run_copy)) if "-kd-" in r.id]


def test_a_threshold_that_keeps_no_test_row_stops_before_training(run_copy: Path) -> None:
    teacher = the_run(run_copy)
    n = len(pd.read_csv(teacher.test))
    probs = np.full((n, 10), 0.02)
    probs[:, 0] = 0.82
    probs[::3] = 0.1  # every third row: no confidence at all
    write_probabilities(teacher.test, probs, {"ImageId": np.arange(1, n + 1)})
    result = run_cli(run_copy, "distill", "--teacher", teacher.id, *TINY, "--distill-threshold", "0.9",
                     check=False)
    assert result.returncode == 1, result.stdout
    assert f"DISTILL_THRESHOLD=0.9 keeps 0 of {n} test rows" in result.stderr
    assert "most confident row has 0.82" in result.stderr
    assert f"DISTILL_THRESHOLD=0.82 keeps {n - len(probs[::3])}" in result.stderr
    assert not [r for r in all_runs(Paths(run_copy)) if "-kd-" in r.id]


@pytest.mark.slow
def test_distill_after_the_latest_run_is_forgotten_picks_the_newest_left(two_run_project: Path) -> None:
    paths = Paths(two_run_project)
    rows, cols = the_run(two_run_project, "rnn-h32"), the_run(two_run_project, "rnn-cols")
    assert latest(paths) == cols.id
    run_cli(two_run_project, "forget", "--run", cols.id)
    # A threshold no row reaches stops before training: what is looked at is the teacher picked.
    result = run_cli(two_run_project, "distill", *TINY, "--distill-threshold", "1", check=False)
    assert f"distill: TEACHER={rows.id} (the newest complete run or blend" in result.stdout, result.stdout
    assert "make a run or a blend first" not in result.stderr
