"""folds: stratified, seeded, part of every run id, and rebuilt when the data or the fold settings change."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, run_cli

from pipeline.config import Paths, Settings
from pipeline.errors import PipelineError
from pipeline.stages.folds import assign
from pipeline.store.run import RunDir


@pytest.mark.slow
def test_folds_and_runs_follow_the_data_and_seed(run_copy: Path) -> None:
    paths = Paths(run_copy)
    other_seed = run_cli(run_copy, "train", *TINY, "--seed", "7")
    assert "folds: skipped" in other_seed.stdout  # SEED seeds the models, not the folds
    other_folds = run_cli(run_copy, "train", *TINY, "--fold-seed", "7")
    assert "folds: reruns: fold_seed changed" in other_folds.stdout
    assert len({r.id for r in map(RunDir, paths.runs.iterdir()) if r.path.is_dir()}) == 3
    lines = paths.train_csv.read_text().splitlines()
    paths.train_csv.write_text("\n".join(lines[:-20]) + "\n")  # the data changes under the folds
    result = run_cli(run_copy, "train", *TINY)
    assert "prepare: reruns: train.csv changed" in result.stdout
    assert "folds: reruns: data, fold_seed changed" in result.stdout  # fold seed 7 -> 42 too
    assert len(pd.read_csv(paths.folds_csv)) == len(lines) - 21


def test_the_fold_settings_are_in_every_run_id_and_in_the_folds_record() -> None:
    from pipeline.config import FOLD_SETTINGS
    from pipeline.store.data import folds_inputs
    from pipeline.store.run import run_id

    base = Settings()
    for name in FOLD_SETTINGS:
        assert Settings.__dataclass_fields__[name].metadata["learns"], name
        other = replace(base, **{name: getattr(base, name) + 1})
        assert run_id(other, "d") != run_id(base, "d")
        assert folds_inputs("d", other) != folds_inputs("d", base)
    assert set(folds_inputs("d", base)) == {"data", *FOLD_SETTINGS}


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

    with pytest.raises(PipelineError) as error:
        assign(np.array([3] * 12 + [5]), 2, 0)
    assert "use fewer folds" not in str(error.value) and "add rows of digit 5" in str(error.value)


@pytest.fixture
def labels() -> np.ndarray:
    return np.random.default_rng(0).choice(10, size=1003, p=np.linspace(0.05, 0.15, 10))


def test_every_row_in_exactly_one_fold_with_balanced_classes(labels: np.ndarray) -> None:
    fold_of = assign(labels, 5, seed=1)
    assert fold_of.shape == labels.shape and set(fold_of) == set(range(5))
    for c in range(10):
        per_fold = np.bincount(fold_of[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)


def test_same_seed_same_folds_other_seed_other_folds(labels: np.ndarray) -> None:
    np.testing.assert_array_equal(assign(labels, 5, seed=3), assign(labels, 5, seed=3))
    assert (assign(labels, 5, seed=3) != assign(labels, 5, seed=4)).any()


def test_too_many_folds_for_a_rare_class_is_an_error() -> None:
    labels = np.array([0] * 20 + [1] * 2)
    with pytest.raises(PipelineError, match=r"FOLDS=3: digit 1 has 2 row\(s\)"):
        assign(labels, 3, seed=0)
