"""blend: selection on synthetic probabilities where the right answer is known, and blends of real runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import JSON, RECORD_FIELDS, REPO, SAMPLE, TINY, fake_run, run_cli, the_run, tiny_data
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cli import build_parser
from pipeline.config import Paths
from pipeline.errors import PipelineError
from pipeline.options import MEANS
from pipeline.stages import blend
from pipeline.store.run import RunDir, all_runs, write_probabilities


@pytest.mark.slow
def test_seeds_of_one_recipe_share_folds_and_blend(run_copy: Path) -> None:
    # run_copy: a finished `submit` of TINY on the sample
    folds_before = (run_copy / "input" / "folds.csv").read_bytes()
    run_cli(run_copy, "submit", *TINY, "--seed", "7")
    assert (run_copy / "input" / "folds.csv").read_bytes() == folds_before
    out = run_cli(run_copy, "blend", "--folds", "2").stdout
    assert "blend: skipped" not in out and "blend: OOF accuracy" in out
    run_cli(run_copy, "folds", *TINY, "--fold-seed", "3")
    assert (run_copy / "input" / "folds.csv").read_bytes() != folds_before


def test_the_readme_calls_only_the_real_mean_the_default() -> None:
    _, stages = build_parser()
    default = stages["blend"].parse_args([]).mean
    text = "".join(p.read_text(encoding="utf-8") for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")])
    claimed = re.findall(r"`MEAN=(\w+)` \(the default\)", text)
    assert claimed and set(claimed) == {default}


def test_a_one_run_blend_is_that_run_once() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    logits = rng.normal(size=(200, 10))
    logits[np.arange(200), labels] += 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs * 0.999, 6)  # as read back from a CSV: rows need not sum to 1
    for mean in MEANS:
        assert blend.select(probs[None], labels, mean).tolist() == [1.0]


@given(runs=st.integers(1, 4), rows=st.integers(1, 5), seed=st.integers(0, 2**16),
       weights=st.lists(st.integers(0, 5), min_size=4, max_size=4))
def test_each_mean_is_the_weighted_mean_it_is_named_for(runs: int, rows: int, seed: int,
                                                        weights: list[int]) -> None:
    """prob: the weighted arithmetic mean; logprob: the weighted geometric mean, renormalised."""
    w = np.array(weights[:runs], float)
    w[0] += w.sum() == 0  # a blend picks some run
    probs = np.random.default_rng(seed).dirichlet(np.ones(10), size=(runs, rows))
    share = (w / w.sum())[:, None, None]
    geometric = np.prod(probs ** share, axis=0)
    np.testing.assert_allclose(blend.combine(probs, w, "prob"), (share * probs).sum(0), rtol=1e-9)
    np.testing.assert_allclose(blend.combine(probs, w, "logprob"),
                               geometric / geometric.sum(1, keepdims=True), rtol=1e-6)


BLEND_FIELDS = [*RECORD_FIELDS, "key", "data", "folds", "seed"]


@given(drop=st.sets(st.sampled_from(BLEND_FIELDS)),
       change=st.dictionaries(st.sampled_from(BLEND_FIELDS), JSON, max_size=3))
def test_blend_skips_a_damaged_run_in_words_and_keeps_the_good_one(
        tmp_path_factory: pytest.TempPathFactory, drop: set[str], change: dict[str, Any]) -> None:
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
    counts = blend.select(np.stack([noise, good]), labels, "prob")
    assert counts[0] == 0 and counts[1] >= 1


def test_two_complementary_runs_beat_either() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 800)
    a, b = one_hot(labels, 0.6), one_hot(labels, 0.6)
    half = np.arange(800) < 400
    a[half] = one_hot((labels[half] + 1) % 10, 0.4)  # a is unsure and wrong on the first half
    b[~half] = one_hot((labels[~half] + 2) % 10, 0.4)  # b on the second
    probs = np.stack([a, b])
    counts = blend.select(probs, labels, "prob")
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
    counts = blend.select(probs, labels, "prob")
    in_sample = (blend.combine(probs, counts, "prob").argmax(1) == labels).mean()
    honest = blend.honest_accuracy(probs, labels, fold_of, "prob")
    assert honest <= in_sample


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
def test_blend_with_every_run_on_other_folds_lists_them_and_trains_nothing(two_run_project: Path) -> None:
    """FOLDS forgotten (the default 5; the runs are on 2): the runs skipped are listed with their
    folds and the command says which settings blend them; it trains no run unasked."""
    before = {r.id for r in all_runs(Paths(two_run_project))}
    result = run_cli(two_run_project, "blend", "--epochs", "1", "--hidden", "8", check=False)
    assert result.returncode == 1, result.stdout
    for name in before:
        assert f"blend: skipped {name}: on other folds (2 folds, FOLD_SEED 42)" in result.stdout
    assert "`make blend FOLDS=2 FOLD_SEED=42` blends those" in result.stderr, result.stderr
    assert "making the run" not in result.stdout and "train:" not in result.stdout
    assert {r.id for r in all_runs(Paths(two_run_project))} == before


@pytest.mark.slow
def test_blend_runs_names_are_checked(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "blend", "--runs", "ok ../../etc", check=False)
    assert result.returncode == 1 and "RUNS='../../etc': not a run name" in result.stderr
    assert not (tmp_path / "input").exists()


def test_a_damaged_blend_folder_is_left_out_unsaid(tmp_path: Path) -> None:
    """Blends are never members; a damaged one is no run to remake with `make predict`."""

    data, _ = tiny_data()
    good = RunDir(fake_run(tmp_path, "rnn-h32-e2-good00"))
    write_probabilities(good.oof, np.full((20, 10), 0.1), {"row": np.arange(20)})
    write_probabilities(good.test, np.full((4, 10), 0.1), {"ImageId": np.arange(1, 5)})
    damaged = RunDir(fake_run(tmp_path, "blend-abc123", kind="blend", weights={"a": 1}))  # no honest acc
    damaged.blend.write_text("{}")
    chosen, skipped = blend.candidates(Paths(tmp_path), data, 2, 42, None)
    assert [m.run.id for m in chosen] == ["rnn-h32-e2-good00"] and skipped == []
    with pytest.raises(PipelineError, match="blend-abc123 cannot be blended: a blend itself"):
        blend.candidates(Paths(tmp_path), data, 2, 42, ["blend-abc123"])


@pytest.mark.slow
def test_blend_on_a_fresh_project_makes_the_run_first(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "blend", *SAMPLE, *TINY)
    assert "blend: no completed run on these folds yet: making the run of these settings first" \
        in result.stdout
    blends = [r for r in all_runs(Paths(tmp_path)) if r.id.startswith("blend-")]
    assert len(blends) == 1 and blends[0].read().weights == {the_run(tmp_path).id: 1}
    again = run_cli(tmp_path, "blend", *SAMPLE, *TINY)  # now there is a run: nothing is made
    assert "making the run" not in again.stdout and f"{blends[0].id} skipped" in again.stdout


def test_blend_names_a_truncated_record_as_damaged(tmp_path: Path) -> None:
    data, _ = tiny_data()
    record = fake_run(tmp_path, "rnn-h32-e2-bad000") / "run.json"
    record.write_bytes(record.read_bytes()[:40])
    _, skipped = blend.candidates(Paths(tmp_path), data, 2, 42, None)
    assert len(skipped) == 1 and skipped[0].startswith("rnn-h32-e2-bad000: damaged: "), skipped
    assert "run.json: not valid JSON" in skipped[0]
    assert "make predict RUN=rnn-h32-e2-bad000 FORCE=1" in skipped[0]
