"""The pieces: folds, models, the training recipe, the ensemble, config and submission checks."""

from __future__ import annotations

import io
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import PRESETS, TrainConfig, resolve
from pipeline.engine.augment import random_affine
from pipeline.engine.models import MODELS, build_model
from pipeline.engine.runtime import predict_log_proba, resolve_device
from pipeline.engine.step import TrainStep
from pipeline.errors import PipelineError
from pipeline.stages import train
from pipeline.stages.folds import assign
from pipeline.stages.predict import average_probabilities
from pipeline.store.submission import validate_frame

# -- folds -----------------------------------------------------------------------------------------


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


# -- models ----------------------------------------------------------------------------------------

FAMILY = [dict(model=m) for m in MODELS] + [
    dict(model="rnn", layers=2, dropout=0.2), dict(model="gru", bidirectional=True),
    dict(model="lstm", layers=2, bidirectional=True),
]


@pytest.mark.parametrize("settings", FAMILY, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_any_batch_size_gives_class_scores(settings: dict, batch: int) -> None:
    model = build_model(TrainConfig(hidden=16, **settings)).eval()
    images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        scores = model(images)
    assert scores.shape == (batch, 10) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    # uint8 and float input of the same pixels give the same answer.
    with torch.no_grad():
        torch.testing.assert_close(model(images.float()), scores)


def test_rows_are_time_steps() -> None:
    model = build_model(TrainConfig(hidden=8, normalize=False)).eval()
    seen = []
    model.rnn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    model(torch.zeros(3, 28, 28))
    assert seen == [torch.Size([3, 28, 28])]  # batch-first: (batch, 28 steps, 28 pixels)


@pytest.mark.parametrize("settings", FAMILY, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_every_family_member_trains_a_step_and_predicts(settings: dict) -> None:
    cfg = TrainConfig(hidden=16, batch=16, epochs=1, **settings)
    torch.manual_seed(0)
    model = build_model(cfg)
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = train.make_optimizer(cfg, model)
    scheduler = train.make_scheduler(cfg, optimizer, train.steps_per_epoch(cfg, 40))
    step = TrainStep(model, optimizer, scheduler, cfg, torch.device("cpu"))
    loss, acc = train.train_epoch(step, images, labels, torch.arange(40), cfg,
                                  torch.Generator().manual_seed(0))
    assert math.isfinite(loss) and 0 <= acc <= 1
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    log_probs = predict_log_proba(model, images, cfg)
    assert log_probs.shape == (40, 10)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(40))


def test_model_runs_on_the_device_it_is_on() -> None:
    device = resolve_device("auto")
    model = build_model(TrainConfig(hidden=8)).to(device)
    out = model(torch.zeros(2, 28, 28, dtype=torch.uint8, device=device))
    assert out.device.type == device.type


def test_explicit_missing_device_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PipelineError, match="no CUDA"):
        resolve_device("cuda")


# -- the training recipe --------------------------------------------------------------------------


def test_augmentation_keeps_shape_dtype_and_range() -> None:
    images = torch.randint(0, 256, (32, 28, 28)).float()
    moved = random_affine(images, torch.Generator().manual_seed(0), rotate=15, scale=0.1, shift=3)
    assert moved.shape == images.shape and moved.dtype == images.dtype
    assert moved.min() >= 0 and moved.max() <= 255
    assert not torch.equal(moved, images)
    still = random_affine(images, torch.Generator().manual_seed(0), rotate=0, scale=0, shift=0)
    torch.testing.assert_close(still, images, atol=1e-3, rtol=0)


def test_augmentation_is_seeded_and_per_sample() -> None:
    images = torch.zeros(4, 28, 28)
    images[:, 10:18, 12:16] = 255
    a = random_affine(images, torch.Generator().manual_seed(5), 10, 0.1, 2)
    b = random_affine(images, torch.Generator().manual_seed(5), 10, 0.1, 2)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[0], a[1])


def test_no_augmentation_at_evaluation() -> None:
    cfg = TrainConfig(hidden=8, augment=True)
    model = build_model(cfg)
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    first = predict_log_proba(model, images, cfg, seed=1)
    second = predict_log_proba(model, images, cfg, seed=2)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(first, model(images).log_softmax(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "none"])
def test_schedule_runs_to_its_end(schedule: str) -> None:
    cfg = TrainConfig(schedule=schedule, epochs=3, lr=0.01)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = train.make_scheduler(cfg, optimizer, steps_per_epoch=7)
    lrs = []
    for _ in range(3 * 7):  # OneCycleLR raises if stepped past its total
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    if schedule == "none":
        assert lrs == [0.01] * 21
    else:
        assert lrs[-1] < 1e-4 and max(lrs) <= 0.01 + 1e-12


def test_clipping_bounds_the_gradient_norm() -> None:
    cfg = TrainConfig(hidden=16, batch=20, clip=0.05, augment=False, lr=1e-3)
    model = build_model(cfg)
    optimizer = train.make_optimizer(cfg, model)
    scheduler = train.make_scheduler(cfg, optimizer, 2)
    norms = []

    def record(opt: torch.optim.Optimizer, *_: object) -> None:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    optimizer.register_step_pre_hook(record)
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    step = TrainStep(model, optimizer, scheduler, cfg, torch.device("cpu"))
    train.train_epoch(step, images, labels, torch.arange(40), cfg, torch.Generator().manual_seed(0))
    assert len(norms) == 2 and max(norms) <= 0.05 * (1 + 1e-4)


def test_short_last_batch_is_used_unless_dropped() -> None:
    cfg = TrainConfig(batch=64)
    assert train.steps_per_epoch(cfg, 130) == 3
    assert train.steps_per_epoch(replace(cfg, drop_last=True), 130) == 2
    with pytest.raises(PipelineError, match="larger than"):
        train.steps_per_epoch(replace(cfg, drop_last=True), 50)


# -- ensemble, config, submission ----------------------------------------------------------------


def test_ensemble_averages_fold_probabilities() -> None:
    a = np.array([[0.6, 0.4], [0.1, 0.9]])
    b = np.array([[0.2, 0.8], [0.3, 0.7]])
    np.testing.assert_allclose(average_probabilities([a, b]), [[0.4, 0.6], [0.2, 0.8]])
    with pytest.raises(PipelineError):
        average_probabilities([])


def test_tutorial_preset_is_the_tutorial_recipe() -> None:
    cfg = resolve(preset="tutorial")
    assert (cfg.model, cfg.hidden, cfg.layers, cfg.optimizer, cfg.lr, cfg.batch, cfg.epochs) == \
        ("rnn", 150, 1, "adam", 1e-3, 64, 10)
    assert cfg.drop_last and not cfg.normalize and not cfg.augment
    assert cfg.schedule == "none" and cfg.clip == 0 and cfg.label_smoothing == 0
    assert set(PRESETS["tutorial"]) <= set(TrainConfig().learned())


def test_config_layers_merge_in_order(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text('preset = "tutorial"\nepochs = 4\nhidden = 64\n')
    cfg = resolve(file=file, overrides={"hidden": 32, "lr": None})
    assert (cfg.epochs, cfg.hidden, cfg.lr, cfg.batch) == (4, 32, 1e-3, 64)
    saved = tmp_path / "config.json"
    saved.write_text(pd.Series(vars(cfg)).to_json())
    assert resolve(file=saved) == cfg


@pytest.mark.parametrize("overrides, message", [
    ({"model": "cnn"}, "model must be one of"),
    ({"epochs": 0}, "EPOCHS=0 is out of range; epochs must be a whole number from 1"),
    ({"dropout": 1.5}, "dropout must be a number from 0 up to"), ({"folds": 1}, "FOLDS=1 is out of range"),
    ({"hidden": "big"}, "hidden must be a whole number"), ({"bogus": 1}, "unknown setting"),
])
def test_bad_config_values_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        resolve(overrides=overrides)


def _submission(labels: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"ImageId": range(1, len(labels) + 1), "Label": labels})


def test_valid_submission_passes(tmp_path: Path) -> None:
    from pipeline.store.submission import validate_file

    assert validate_frame(_submission([0, 9, 3]), expected_rows=3, where="s.csv") is None
    _submission([0, 9, 3]).to_csv(tmp_path / "s.csv", index=False)
    frame = validate_file(tmp_path / "s.csv", expected_rows=3)
    assert list(frame["ImageId"]) == [1, 2, 3] and list(frame["Label"]) == [0, 9, 3]


@pytest.mark.parametrize("frame, message", [
    (_submission([1, 2]).rename(columns={"Label": "label"}), "header"),
    (_submission([1, 2, 3]), "3 rows; expected 2"),
    (_submission([1, 10]), "line 3, column Label"),
    (_submission([1, -1]), "line 3, column Label"),
    (pd.DataFrame({"ImageId": [1, 3], "Label": [0, 0]}), "line 3, column ImageId"),
    (pd.DataFrame({"ImageId": [1, 2], "Label": [0, 1.5]}), "not a whole number"),
])
def test_invalid_submissions_are_named(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        validate_frame(frame, expected_rows=2, where="s.csv")


def test_test_time_augmentation_averages_seeded_passes() -> None:
    cfg = TrainConfig(hidden=8)
    model = build_model(cfg)
    images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8)
    plain = predict_log_proba(model, images, cfg)
    tta = predict_log_proba(model, images, cfg, tta=3, seed=1)
    torch.testing.assert_close(tta.exp().sum(1), torch.ones(12))
    assert not torch.allclose(tta, plain)
    torch.testing.assert_close(tta, predict_log_proba(model, images, cfg, tta=3, seed=1))


def test_fast_sampling_grid_equals_affine_grid() -> None:
    import torch.nn.functional as F

    images = torch.rand(16, 28, 28) * 255
    fast = random_affine(images, torch.Generator().manual_seed(3), rotate=15, scale=0.1, shift=2)
    # The same draws, through PyTorch's own affine_grid.
    u = torch.rand(16, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    angle, zoom = u[:, 0] * math.radians(15), 1 + u[:, 1] * 0.1
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tx, ty = u[:, 2] * 2 * 2 / 28, u[:, 3] * 2 * 2 / 28
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [16, 1, 28, 28], align_corners=False)
    plain = F.grid_sample(images.unsqueeze(1), grid, align_corners=False).squeeze(1)
    torch.testing.assert_close(fast, plain, atol=1e-2, rtol=0)


def test_fused_normalisation_equals_the_formula() -> None:
    from pipeline.engine.models import PIXEL_MEAN, PIXEL_STD

    model = build_model(TrainConfig(hidden=8)).eval()
    seen = []
    model.rnn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    model(images)
    torch.testing.assert_close(seen[0], (images.float() / 255 - PIXEL_MEAN) / PIXEL_STD)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


ROW = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "valid_loss": 0.4, "valid_acc": 0.9123,
       "lr": 0.001, "seconds": 0.5, "samples_per_s": 1000.0}


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = train.Progress(fold=3, epochs=10, start=0)
    bar.update(ROW)
    bar.close()
    assert "fold 3" in terminal.getvalue() and "valid_acc=0.9123" in terminal.getvalue()
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    plain = train.Progress(fold=3, epochs=10, start=0)
    plain.update(ROW)
    plain.close()
    out = capsys.readouterr().out
    assert "fold 3 epoch   1/10" in out and "valid_acc 0.9123" in out
