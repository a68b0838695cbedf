"""End to end through the CLI on the built-in sample: runs, skipping, reruns, blend and make."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, TINY, files, run_cli, run_make, the_run

from pipeline.config import Paths
from pipeline.store.artifacts import LOG_COLUMNS, PROB_COLUMNS, RunDir, latest
from pipeline.store.submission import validate_file

pytestmark = pytest.mark.slow


def test_submit_writes_every_artifact(sample_run: Path) -> None:
    paths = Paths(sample_run)
    prepared = {n: np.load(paths.prepared / f"{n}.npy") for n in ("train_x", "train_y", "test_x")}
    assert prepared["train_x"].dtype == np.uint8 and prepared["train_x"].shape[1:] == (28, 28)
    n_train, n_test = len(prepared["train_y"]), len(prepared["test_x"])
    assert json.loads(paths.source_json.read_text())["source"] == "sample"
    folds = pd.read_csv(paths.folds_csv)
    assert list(folds.columns) == ["row", "label", "fold"] and set(folds["fold"]) == {0, 1}

    run = the_run(sample_run)
    assert run.id.startswith("rnn-h32-e2-") and latest(paths) == run.id
    assert json.loads(run.config.read_text())["hidden"] == 32
    for k in range(2):
        ckpt = torch.load(run.model(k), map_location="cpu", weights_only=True)
        assert ckpt["config"]["hidden"] == 32 and 1 <= ckpt["epoch"] <= 2
        assert not run.state(k).exists()
        log = pd.read_csv(run.log(k))
        assert list(log.columns) == LOG_COLUMNS and list(log["epoch"]) == [1, 2]
        oof = pd.read_csv(run.oof_fold(k))
        assert list(oof.columns) == ["row", "label", *PROB_COLUMNS]
        assert set(oof["row"]) == set(folds.loc[folds["fold"] == k, "row"])
        assert list(pd.read_csv(run.test_fold(k))["ImageId"]) == list(range(1, n_test + 1))
    oof = pd.read_csv(run.oof)
    assert list(oof["row"]) == list(range(n_train))
    np.testing.assert_allclose(oof[PROB_COLUMNS].sum(axis=1), 1, atol=1e-4)
    cv = pd.read_csv(run.cv)
    assert list(cv["fold"].astype(str)) == ["0", "1", "all"] and 0 < cv["valid_acc"].iloc[-1] <= 1
    record = json.loads(run.record.read_text())
    assert record["complete"] and record["oof_acc"] == pytest.approx(cv["valid_acc"].iloc[-1])
    submission = validate_file(paths.submission_csv, expected_rows=n_test)
    assert run.submission.read_bytes() == paths.submission_csv.read_bytes()
    kept = list(paths.submissions.glob("*-rnn-cv*.csv"))
    assert [k.name for k in kept] == [record["kept"]]
    assert kept[0].read_bytes() == paths.submission_csv.read_bytes()
    assert submission["Label"].between(0, 9).all()


def test_second_submit_redoes_nothing(run_copy: Path) -> None:
    before = files(run_copy)
    result = run_cli(run_copy, "submit", *TINY)
    for line in ("prepare: skipped: train.csv and test.csv unchanged", "folds: skipped",
                 "train: fold 0 skipped", "train: fold 1 skipped", "skipped: its folds and TTA=0"):
        assert line in result.stdout
    assert files(run_copy) == before


def test_two_runs_are_kept_and_going_back_retrains_nothing(run_copy: Path) -> None:
    paths = Paths(run_copy)
    first = the_run(run_copy)
    first_files = {p.name: p.read_bytes() for p in first.path.iterdir()}
    first_submission = paths.submission_csv.read_bytes()
    run_cli(run_copy, "submit", *TINY, "--model", "gru")
    second = the_run(run_copy, "gru")
    assert second.id.startswith("gru-h32-e2-") and latest(paths) == second.id
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == first_files  # untouched
    assert paths.submission_csv.read_bytes() == second.submission.read_bytes()
    again = run_cli(run_copy, "submit", *TINY)  # the first settings again: nothing retrains
    assert "train: fold 0 skipped" in again.stdout and "fold 0 epoch" not in again.stdout
    assert paths.submission_csv.read_bytes() == first_submission
    assert latest(paths) == first.id
    assert len(list(paths.submissions.glob("*-cv*.csv"))) == 2  # no new kept copy for the old run


def test_train_on_a_fresh_clone_builds_what_it_needs(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "train", *TINY)
    for line in ("download: source auto -> sample", "prepare: reruns: not made yet",
                 "folds: reruns: not made yet", "train: fold 0 reruns: not made yet"):
        assert line in result.stdout
    run = the_run(tmp_path)
    assert run.model(0).is_file() and run.model(1).is_file() and not run.record.exists()


def test_each_stage_says_why_it_reruns(run_copy: Path) -> None:
    """The one freshness rule on each stage: a missing output, changed input, damaged output."""
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


def test_train_one_fold_then_predict_trains_the_rest(run_copy: Path) -> None:
    result = run_cli(run_copy, "train", "--fold", "0", "--folds", "2", "--epochs", "1",
                     "--hidden", "32")
    run = the_run(run_copy, "rnn-h32-e1")
    assert "folds [0]" in result.stdout and not run.model(1).exists()
    predicted = run_cli(run_copy, "predict", "--folds", "2", "--epochs", "1", "--hidden", "32")
    assert "train: fold 0 skipped" in predicted.stdout and "train: fold 1 reruns" in predicted.stdout
    assert "OOF accuracy" in predicted.stdout and run.record.is_file()


def test_a_run_is_named_by_run(run_copy: Path) -> None:
    run = the_run(run_copy)
    run.model(1).unlink()
    result = run_cli(run_copy, "train", "--run", run.id, "--fold", "1")
    assert "train: fold 1 reruns: fold_1.pt is missing" in result.stdout and run.model(1).is_file()
    refused = run_cli(run_copy, "predict", "--run", run.id, "--hidden", "64", check=False)
    assert refused.returncode == 1 and "HIDDEN cannot be given" in refused.stderr
    missing = run_cli(run_copy, "predict", "--run", "rnn-nothing", check=False)
    assert missing.returncode == 1 and "no such run" in missing.stderr


def test_options_exist_on_the_stage_clis() -> None:
    for stage in ("folds", "train", "predict", "submit", "blend"):
        text = run_cli(REPO, stage, "--help").stdout
        for option in ("--model", "--view", "--epochs", "--folds", "--hidden", "--batch", "--lr",
                       "--seed", "--device", "--preset", "--config"):
            assert option in text, (stage, option)


def test_make_help_lists_the_stages_and_every_setting() -> None:
    from dataclasses import fields

    from pipeline.config import Settings

    result = run_make("help", check=True)
    for target in ("submit", "download", "prepare", "folds", "train", "predict", "blend", "test",
                   "test-fast", "upload", "lb", "report", "runs", "forget", "bench"):
        assert f"  {target} " in result.stdout, target
    for f in fields(Settings):
        assert f"  {f.name.upper()} " in result.stdout, f.name
    plain = run_make(check=True)
    assert plain.stdout == result.stdout


def test_make_passes_options_through(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import parse

    dry = run_make("-n", "train", "EPOCHS=5", "SETUP=", check=True)
    assert "-m pipeline --make train" in dry.stdout
    for name, value in {"FOLD": "2", "EPOCHS": "5", "MODEL": "gru", "HIDDEN": "64", "VIEW": "cols",
                        "BIDIRECTIONAL": "1", "CUDA_GRAPH": "1", "AMP": "0", "NOWAIT": "1"}.items():
        monkeypatch.setenv(name, value)
    args = parse(["--make", "train", "--clip", "0.5"])
    assert (args.fold, args.epochs, args.model, args.hidden, args.view) == (2, 5, "gru", 64, "cols")
    assert (args.bidirectional, args.cuda_graph, args.amp, args.clip, args.nowait) == \
        (True, True, False, 0.5, True)
    monkeypatch.setenv("RUN", "rnn-h8-e1-abcdef")
    assert parse(["--make", "forget"]).run == "rnn-h8-e1-abcdef"  # a stage's own option, from RUN=
    monkeypatch.setenv("AMP", "maybe")
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="AMP='maybe': must be 1 or 0"):
        parse(["--make", "train"])


@pytest.mark.parametrize("bad", [["--folds", "1"], ["--model", "cnn"], ["--lr", "-1"],
                                 ["--fold", "7", "--folds", "2"], ["--epochs", "0"]])
def test_bad_options_fail_cleanly(run_copy: Path, bad: list[str]) -> None:
    result = run_cli(run_copy, "train", *bad, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip()


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


def test_explicit_other_source_replaces_only_the_sample(run_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "downloads"
    elsewhere.mkdir()
    for name in ("train.csv", "test.csv"):
        (elsewhere / name).write_bytes((run_copy / "input" / name).read_bytes())
    (elsewhere / "train.csv").write_text(
        "\n".join((elsewhere / "train.csv").read_text().splitlines()[:-10]) + "\n")
    # The built-in sample gives way to an explicitly asked-for source...
    replaced = run_cli(run_copy, "download", "--source", "dir", "--dir", str(elsewhere))
    assert "replacing the built-in sample" in replaced.stdout
    assert json.loads(Paths(run_copy).source_json.read_text())["source"] == "dir"
    assert Paths(run_copy).train_csv.read_bytes() == (elsewhere / "train.csv").read_bytes()
    # ...but real files from one source are kept, with a warning, unless FORCE=1.
    kept = run_cli(run_copy, "download", "--source", "sample")
    assert f"WARNING: input/ holds files from the folder {elsewhere}, not from SOURCE=sample" \
        in kept.stdout and "FORCE=1" in kept.stdout
    assert Paths(run_copy).train_csv.read_bytes() == (elsewhere / "train.csv").read_bytes()
    forced = run_cli(run_copy, "download", "--source", "sample", "--force")
    assert "wrote the sample" in forced.stdout


def test_settings_that_do_not_change_learning_do_not_retrain(run_copy: Path) -> None:
    result = run_cli(run_copy, "train", "--fold", "0", *TINY, "--eval-batch", "64", "--jobs", "1")
    assert "train: fold 0 skipped" in result.stdout
    assert len(list((run_copy / "runs").glob("rnn-*"))) == 1


def test_forced_retraining_of_one_fold_repeats_it_exactly(run_copy: Path) -> None:
    run = the_run(run_copy)
    before = torch.load(run.model(0), weights_only=True)["state_dict"]
    fold1 = run.model(1).read_bytes()
    result = run_cli(run_copy, "train", "--fold", "0", "--force", *TINY)
    assert "train: fold 0 reruns: FORCE=1" in result.stdout and "fold 0 epoch   2/2" in result.stdout
    after = torch.load(run.model(0), weights_only=True)["state_dict"]
    assert all(torch.equal(after[name], before[name]) for name in after)
    assert run.model(1).read_bytes() == fold1


def test_tta_reports_its_own_out_of_fold_accuracy(run_copy: Path) -> None:
    from pipeline.engine import checkpoint
    from pipeline.engine.runtime import predict_log_proba
    from pipeline.store.artifacts import load_prepared

    result = run_cli(run_copy, "predict", "--tta", "2", *TINY)
    run = the_run(run_copy)
    record = json.loads(run.record.read_text())
    assert f"with TTA=2 {record['oof_acc_tta']:.4f}" in result.stdout
    # The kept copy says it is a TTA submission and carries the TTA score.
    assert record["kept"].endswith(f"-cv{record['oof_acc']:.4f}-tta2.csv")
    # Recomputed here from the checkpoints: each fold's model, with the same passes, on its rows.
    paths = Paths(run_copy)
    data = load_prepared(paths)
    fold_of = pd.read_csv(paths.folds_csv).sort_values("row")["fold"].to_numpy()
    correct = 0
    for k in range(2):
        model, cfg = checkpoint.model_from(run.model(k))
        rows = np.flatnonzero(fold_of == k)
        guess = predict_log_proba(model, torch.from_numpy(data.train_x[rows]), cfg, tta=2, seed=42)
        correct += int((guess.argmax(1).numpy() == data.train_y[rows]).sum())
    assert record["oof_acc_tta"] == correct / len(fold_of)
    assert "with TTA=2)" in run_cli(run_copy, "runs").stdout
    again = run_cli(run_copy, "predict", "--tta", "2", *TINY)
    assert "skipped" in again.stdout and f"with TTA=2 {record['oof_acc_tta']:.4f}" in again.stdout
    plain = run_cli(run_copy, "predict", *TINY)  # without TTA there is no such figure
    assert "with TTA" not in plain.stdout
    assert json.loads(run.record.read_text())["oof_acc_tta"] is None
