"""A run's folder (pipeline/store/run.py): the ensemble's files, one writer for predict and blend,
one reader for everyone; its typed records; one log loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import log_loss as sklearn_log_loss

from pipeline.errors import PipelineError
from pipeline.store.run import FoldRecord, RunDir, RunRecord, log_loss, scores


def record(**changes: object) -> RunRecord:
    values = dict(kind="run", model="rnn", oof_acc=0.9, oof_loss=0.3, fold_min=0.89, fold_max=0.91,
                  seconds=3.0, finished=1.7e9, data="d", n_folds=2, fold_seed=42, key="k")
    return RunRecord(**{**values, **changes})  # type: ignore[arg-type]


@given(rows=st.integers(1, 40), seed=st.integers(0, 2**16), scale=st.floats(0.01, 100))
def test_log_loss_is_scikit_learns(rows: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(10), rows) * scale  # rows that do not sum to 1 are renormalised
    labels = rng.integers(0, 10, rows)
    probs[0, labels[0]] = 0.0  # a zero probability of the true class is clipped, not infinite
    expected = sklearn_log_loss(labels, probs / probs.sum(1, keepdims=True), labels=list(range(10)))
    assert log_loss(probs, labels) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_the_writer_makes_files_the_readers_accept(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(12) % 10
    fold_of = np.arange(12) % 3
    oof, test = rng.dirichlet(np.ones(10), 12), rng.dirichlet(np.ones(10), 7)
    out = RunDir(tmp_path / "runs" / "r")
    facts = [FoldRecord(fold=k, best_epoch=k + 1, valid_loss=0.3, valid_acc=0.9, seconds=1.5, device="cpu",
                        trained_at=1.7e9) for k in range(3)]
    cv = out.write(oof, test, labels, fold_of, facts)
    back_oof, back_test = out.probabilities(12, 7)
    np.testing.assert_allclose(back_oof, oof, rtol=1e-5)
    np.testing.assert_allclose(back_test, test, rtol=1e-5)
    table = out.cv_table(3)
    assert list(table["fold"]) == ["0", "1", "2", "all"] and list(cv["best_epoch"][:3]) == [1, 2, 3]
    per_fold = [(oof[fold_of == k].argmax(1) == labels[fold_of == k]).mean() for k in range(3)]
    assert list(table["valid_acc"][:3]) == pytest.approx(per_fold)
    assert table["valid_loss"].iloc[-1] == pytest.approx(log_loss(oof, labels), rel=1e-6)
    assert scores(cv) == pytest.approx({
        "oof_acc": (oof.argmax(1) == labels).mean(), "oof_loss": log_loss(oof, labels),
        "fold_min": min(per_fold), "fold_max": max(per_fold)})
    assert list(cv.columns) == ["fold", "best_epoch", "valid_loss", "valid_acc", "rows", "seconds"]
    assert list(cv["seconds"]) == [1.5, 1.5, 1.5, 4.5]
    submission = out.submission.read_text().splitlines()
    assert submission[0] == "ImageId,Label" and len(submission) == 8
    assert submission[1] == f"1,{test[0].argmax()}"


def test_a_record_round_trips_ignores_keys_it_does_not_know_and_names_a_bad_date(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for path in (run.oof, run.test, run.submission):
        path.write_text("x\n")
    made = run.finish(run.ensemble({"a": 1}, 0, 0), record(weights={}, config={"hidden": 8}))
    assert made.key and made.inputs == {"a": 1}
    assert run.completed() == made
    on_disk = json.loads(run.record.read_text())
    run.record.write_text(json.dumps({**on_disk, "from_a_newer_version": [1]}))
    assert run.read() == made
    del on_disk["fold_seed"]  # records from before FOLD_SEED: their seed drew the folds
    run.record.write_text(json.dumps({**on_disk, "seed": 7}))
    assert run.read().fold_seed == 7
    for finished in (1e300, -1e20):  # no date can be made of it: damaged
        with pytest.raises(PipelineError, match="finished"):
            RunRecord.parse({**made.dump(), "finished": finished}, run.record)
    blend = record(kind="blend", model="blend", oof_acc=0.99, oof_acc_honest=0.95, weights={"a": 2, "b": 1})
    assert blend.accuracy == 0.95 and blend.members() == "a x2, b x1" and record().accuracy == 0.9
    assert RunDir(Path("runs/blend-abc123")).is_blend and not RunDir(Path("runs/rnn-h8-e1-abc123")).is_blend


# Values no field accepts (None is fine only for the optional numbers, which are left out here).
INVALID = st.one_of(st.none(), st.just(float("nan")), st.booleans(), st.lists(st.integers(), max_size=2))


@given(field=st.sampled_from(["oof_acc", "oof_loss", "fold_min", "fold_max", "seconds", "finished",
                              "key", "folds", "kind", "config", "weights", "device", "source"]),
       value=INVALID)
def test_a_damaged_record_names_its_folder_file_and_field(field: str, value: object) -> None:
    made = {"complete": True, **record().dump()}
    made[field] = value
    if field in ("device", "source", "config", "weights") and value is None:
        made[field] = 5  # a present field of the wrong type (None is not written for these)
    with pytest.raises(PipelineError, match=rf"^x/run\.json: missing or not valid: .*\b{field}\b"):
        RunRecord.parse(made, Path("runs/x/run.json"))


def test_records_written_by_the_previous_version_load() -> None:
    """run.json files as the earlier predict and blend wrote them (tests/data/old_*.json)."""
    data = Path(__file__).parent / "data"
    run = RunRecord.parse(json.loads((data / "old_run.json").read_text()), data / "old_run.json")
    assert (run.kind, run.model, run.n_folds, run.fold_seed, run.oof_acc_tta) == ("run", "rnn", 5, 42, None)
    assert run.accuracy == run.oof_acc == pytest.approx(0.98345, abs=1e-5) and run.config["hidden"] == 128
    assert run.kept.endswith(".csv") and run.inputs["tta"] == 0 and run.key
    blend = RunRecord.parse(json.loads((data / "old_blend.json").read_text()), data / "old_blend.json")
    assert blend.kind == "blend" and len(blend.weights) == 4 and blend.mean == "logprob"
    assert blend.accuracy == blend.oof_acc_honest == pytest.approx(0.9896, abs=1e-4)


def test_rewriting_an_ensemble_unmarks_it_until_its_record_is_written(tmp_path: Path) -> None:
    """An interrupted rewrite (new files, the old run.json) must never pass as current."""
    rng = np.random.default_rng(1)
    labels, fold_of = np.arange(6) % 3, np.arange(6) % 2
    out = RunDir(tmp_path / "r")
    out.write(rng.dirichlet(np.ones(10), 6), rng.dirichlet(np.ones(10), 3), labels, fold_of)
    out.finish(out.ensemble({"tta": 0}, 6, 3), record())
    assert out.completed() is not None
    out.write(rng.dirichlet(np.ones(10), 6), rng.dirichlet(np.ones(10), 3), labels, fold_of)
    assert out.completed() is None and not out.record.exists()


def test_a_cv_table_is_checked_row_by_row(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "rnn-x")
    path = run.cv
    path.parent.mkdir()
    good = "fold,best_epoch,valid_loss,valid_acc\n0,1,0.3,0.9\n1,2,0.3,0.9\nall,,0.3,0.9\n"
    path.write_text(good)
    assert len(run.cv_table(2)) == 3
    for damaged in (good[:60], good.replace("0.9\n1", "x\n1"), "\x00\x01", "a,b\n1,2\n",
                    good.replace("all", "2")):
        path.write_text(damaged)
        with pytest.raises(PipelineError, match=r"cv\.csv: .*make predict RUN=rnn-x FORCE=1"):
            run.cv_table(2)
