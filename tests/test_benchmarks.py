"""The benchmark scripts run end to end at a tiny size (their figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=True)


@pytest.mark.slow
def test_speed_benchmark_runs_tiny(tmp_path: Path) -> None:
    result = bench("benchmarks/speed.py", "--rows", "256", "--repeats", "1", "--test-rows", "300",
                   "--skip-prepare", "--out", str(tmp_path))
    assert "pipeline / raw bound (training)" in result.stdout
    saved = json.loads((tmp_path / "results.json").read_text())
    cases = {r["case"] for r in saved["results"]}
    assert {"raw bound: nn.RNN step, resident tensors", "pipeline ensemble of 5 folds"} <= cases
    assert all(value > 0 for value in saved["ratios"].values())


@pytest.mark.slow
def test_accuracy_benchmark_runs_tiny(sample_run: Path, tmp_path: Path) -> None:
    """Every fold of each variant, their blends, and a given test.csv each run predicts and keeps."""
    out, project, test = tmp_path / "accuracy.csv", tmp_path / "kept", sample_run / "input" / "test.csv"
    result = bench("benchmarks/accuracy.py", "--train", str(sample_run / "input" / "train.csv"),
                   "--folds", "2", "--test", str(test), "--out", str(out), "--project", str(project),
                   "--variants", "tutorial:epochs=1,default:epochs=1+hidden=16+view=cols", "--blend")
    assert "error_reduction" in result.stdout
    kept = list((project / "work" / "submissions").glob("*-rnn-cv*.csv"))
    assert len(kept) == 2 and all(len(pd.read_csv(k)) == len(pd.read_csv(test)) for k in kept)
    table = pd.read_csv(out)
    assert list(table["variant"]) == ["tutorial[epochs=1]", "default[epochs=1+hidden=16+view=cols]",
                                      "blend (prob)", "blend (logprob)"]
    assert table["oof_acc"].between(0, 1).all()
    # The honest estimate of a blend never beats its in-sample one on these runs by more than noise.
    blends = table[table["variant"].str.startswith("blend")]
    assert (blends["in_sample"] >= blends["oof_acc"] - 0.02).all()


@pytest.mark.slow
def test_accuracy_benchmark_screens_one_fold(sample_run: Path, tmp_path: Path) -> None:
    out, project = tmp_path / "screen.csv", tmp_path / "kept"
    bench("benchmarks/accuracy.py", "--train", str(sample_run / "input" / "train.csv"), "--folds", "3",
          "--screen", "--screen-epochs", "1", "--variants", "default:hidden=8,default:hidden=8+elastic=20",
          "--project", str(project), "--out", str(out))
    table = pd.read_csv(out)
    assert list(table["best_epoch"]) == [1, 1] and table["oof_acc"].between(0, 1).all()
    runs = [p for p in (project / "work" / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 2 and all(sorted(q.name for q in r.glob("fold_*.pt")) == ["fold_0.pt"]
                                  for r in runs)


@pytest.mark.slow
def test_accuracy_benchmark_says_when_its_data_is_missing(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--train",
                             str(tmp_path / "nope.csv")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "not found" in result.stderr


@pytest.mark.slow
def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=REPO, check=True)
