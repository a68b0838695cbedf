"""engine: the models, the training step (eager and graph-replayed), augmentation, runtime and checkpoints."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import FAMILY

from pipeline.config import Settings
from pipeline.engine import step as step_module
from pipeline.engine.augment import elastic_field, random_affine
from pipeline.engine.checkpoint import FoldState
from pipeline.engine.models import CELLS, build_model
from pipeline.engine.runtime import predict_log_proba, resolve_device
from pipeline.engine.step import TrainStep, graph_wanted
from pipeline.errors import PipelineError
from pipeline.stages import train


def test_elastic_field_is_smooth_and_scaled() -> None:
    gen = torch.Generator().manual_seed(0)
    weak = elastic_field(64, 28, 28, alpha=1.0, sigma=4.0, generator=gen, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    strong = elastic_field(64, 28, 28, alpha=30.0, sigma=4.0, generator=gen, device=torch.device("cpu"))
    assert weak.shape == (64, 28, 28, 2)
    torch.testing.assert_close(strong, weak * 30)
    rough = torch.rand(64, 28, 28, 2) * 2 - 1
    # Neighbouring displacements move together (smoothed), unlike raw noise.
    step = lambda f: (f[:, 1:] - f[:, :-1]).abs().mean() / f.abs().mean()  # noqa: E731
    assert step(weak) < 0.3 < step(rough)


@pytest.mark.parametrize("move", [(15, 0.1, 3, 0.0, 4.0), (0, 0, 0, 34.0, 4.0)], ids=["affine", "elastic"])
def test_augmentation_is_seeded_per_sample_and_keeps_shape_dtype_and_range(move: tuple[float, ...]) -> None:
    images = torch.zeros(8, 28, 28)
    images[:, 8:20, 12:16] = 255.0
    moved = random_affine(images, torch.Generator().manual_seed(1), *move)
    torch.testing.assert_close(moved, random_affine(images, torch.Generator().manual_seed(1), *move))
    assert moved.shape == images.shape and moved.dtype == images.dtype
    assert moved.min() >= 0 and moved.max() <= 255 + 1e-3
    assert (moved - images).abs().mean() > 5 and not torch.equal(moved[0], moved[1])
    still = random_affine(images, torch.Generator().manual_seed(1), 0, 0, 0, 0.0, 4.0)
    torch.testing.assert_close(still, images, atol=1e-3, rtol=0)


CPU = torch.device("cpu")
CFG = Settings(hidden=12, batch=16, epochs=2, augment=True, clip=0.5)
ROWS = 40  # two full batches and a short one of 8


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a new process would: no earlier failed capture."""
    monkeypatch.setattr(step_module.CudaGraph, "failed", False)


class BrokenGraph:
    """A CPU stand-in for step.CudaGraph that never replays the step: its capture fails as a real
    one can (fail), or its replay writes gradients other than the step's (differ)."""

    def __init__(self, model: torch.nn.Module, fail: bool) -> None:
        self.model, self.fail, self.replays = model, fail, 0

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        yield

    def capture(self, fn: Callable[[], object]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fail:  # as torch.cuda.graph fails: the cause, then capture_end's own error
            try:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
            except RuntimeError:
                raise RuntimeError("CUDA error: operation failed due to a previous error during "
                                   "capture") from None
        return torch.zeros(()), torch.zeros((), dtype=torch.long)

    def replay(self) -> None:
        self.replays += 1
        for p in self.model.parameters():
            p.grad = torch.ones_like(p)


def new_state(cfg: Settings, graph: Callable[[torch.nn.Module], BrokenGraph] | None = None,
              logs: list[str] | None = None) -> FoldState:
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = train.make_optimizer(cfg, model)
    scheduler = train.make_scheduler(cfg, optimizer, train.steps_per_epoch(cfg, ROWS))
    made: list[BrokenGraph] = []

    def make_graph(device: torch.device) -> BrokenGraph:
        made.append(graph(model))  # type: ignore[misc]
        return made[-1]

    step = TrainStep(model, optimizer, scheduler, cfg, CPU, make_graph=make_graph if graph else None,
                     log=(logs.append if logs is not None else print))
    step.made = made  # type: ignore[attr-defined]
    return FoldState(step, torch.Generator().manual_seed(3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randint(0, 256, (ROWS, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    return images, torch.randint(0, 10, (ROWS,), generator=torch.Generator().manual_seed(2))


def fit(cfg: Settings, epochs: int, graph: Callable[[torch.nn.Module], BrokenGraph] | None = None,
        logs: list[str] | None = None) -> tuple[torch.nn.Module, list[tuple[float, float]], TrainStep]:
    state = new_state(cfg, graph, logs)
    history = [train.train_epoch(state, *data(), torch.arange(ROWS), cfg) for _ in range(epochs)]
    return state.step.model, history, state.step


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fail", [True, False], ids=["capture-fails", "replay-differs"])
def test_a_graph_that_fails_or_differs_leaves_the_eager_step_to_learn_alone(fail: bool) -> None:
    """Neither the warm-up passes nor the check leave a trace: the fold learns what the eager step
    learns; the graph is tried once, said once, and never used."""
    logs: list[str] = []
    eager, eager_history, _ = fit(CFG, epochs=2)
    fell_back, history, step = fit(CFG, epochs=2, graph=lambda m: BrokenGraph(m, fail), logs=logs)
    assert_same_model(eager, fell_back)
    assert history == eager_history
    assert len(step.made) == 1 and step.graph is None and step.made[0].replays == (0 if fail else 1)
    assert len(logs) == 1 and "training without it" in logs[0]
    if fail:
        assert "capture failed (CUDA error: operation not permitted" in logs[0] and "more" not in logs[0]
    else:
        assert "replay differs from the eager step" in logs[0]


def test_a_failure_stops_later_folds_of_the_process_from_trying(monkeypatch: pytest.MonkeyPatch) -> None:
    logs: list[str] = []
    fit(CFG, epochs=1, graph=lambda m: BrokenGraph(m, fail=True), logs=logs)
    assert step_module.CudaGraph.failed
    monkeypatch.setattr(step_module, "graph_wanted", lambda cfg, device: True)  # as on a GPU
    model = build_model(CFG)
    optimizer = train.make_optimizer(CFG, model)
    later = TrainStep(model, optimizer, train.make_scheduler(CFG, optimizer, 3), CFG, CPU,
                      log=logs.append)
    assert later.make_graph is None
    assert logs[-1] == "CUDA graph not used: it failed earlier in this process"


def test_graph_only_where_it_is_safe_and_asked_for() -> None:
    cuda = torch.device("cuda")
    assert graph_wanted(Settings(cuda_graph=True), cuda)
    assert not graph_wanted(Settings(cuda_graph=False), cuda)
    assert not graph_wanted(Settings(cuda_graph=True), CPU)  # ignored off CUDA
    # A replayed graph would reuse one dropout mask for ever.
    assert not graph_wanted(Settings(cuda_graph=True, layers=2, dropout=0.2), cuda)
    assert graph_wanted(Settings(cuda_graph=True, layers=2, dropout=0.0), cuda)


def test_cuda_graph_is_ignored_on_a_cpu() -> None:
    plain, plain_history, _ = fit(replace(CFG, cuda_graph=False), epochs=1)
    asked, asked_history, step = fit(replace(CFG, cuda_graph=True), epochs=1)
    assert step.graph is None and step.make_graph is None
    assert_same_model(plain, asked)
    assert asked_history == plain_history


@pytest.mark.parametrize("settings", FAMILY, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_any_batch_size_gives_class_scores(settings: dict, batch: int) -> None:
    model = build_model(Settings(hidden=16, **settings)).eval()
    images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        scores = model(images)
    assert scores.shape == (batch, 10) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    # uint8 and float input of the same pixels give the same answer.
    with torch.no_grad():
        torch.testing.assert_close(model(images.float()), scores)


@pytest.mark.parametrize("view", ["rows", "cols", "both"])
@pytest.mark.parametrize("k", [1, 2, 4, 7, 14])
def test_a_time_step_reads_k_pixel_rows_or_columns(view: str, k: int) -> None:
    model = build_model(Settings(hidden=8, normalize=False, view=view, rows_per_step=k)).eval()
    seen: dict[str, torch.Tensor] = {}
    for name in ("rnn", "rnn_cols"):
        if getattr(model, name) is not None:
            getattr(model, name).register_forward_hook(
                lambda mod, inp, out, name=name: seen.update({name: inp[0]}))
    images = torch.randint(0, 256, (3, 28, 28)).float()
    model(images)
    pixels = images / 255
    # batch-first: (batch, 28/k steps, 28k pixels); step t holds rows (or columns) kt .. kt+k-1.
    by_rows = torch.stack([pixels[:, k * t:k * t + k].flatten(1) for t in range(28 // k)], 1)
    by_cols = torch.stack([pixels.transpose(1, 2)[:, k * t:k * t + k].flatten(1) for t in range(28 // k)], 1)
    wanted = {"rows": {"rnn": by_rows}, "cols": {"rnn": by_cols},
              "both": {"rnn": by_rows, "rnn_cols": by_cols}}[view]
    assert seen.keys() == wanted.keys()
    for name, want in wanted.items():
        torch.testing.assert_close(seen[name], want)


def test_the_pooled_readout_sees_every_step_and_the_last_only_the_final_state() -> None:
    """With readout last, only the final states reach the classifier; pool adds the mean and max of
    every step's output: three times the features per direction and sweep."""
    for view, sweeps in (("rows", 1), ("both", 2)):
        last = build_model(Settings(hidden=8, view=view, readout="last", bidirectional=True))
        pool = build_model(Settings(hidden=8, view=view, readout="pool", bidirectional=True))
        assert last.head.in_features == 8 * 2 * sweeps and pool.head.in_features == 3 * 8 * 2 * sweeps
    model = build_model(Settings(hidden=8, readout="pool", bidirectional=False)).eval()
    features: list[torch.Tensor] = []
    model.head.register_forward_hook(lambda mod, inp, out: features.append(inp[0]))
    outputs: list[torch.Tensor] = []
    model.rnn.register_forward_hook(lambda mod, inp, out: outputs.append(out[0]))
    with torch.no_grad():
        model(torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8))
    steps = outputs[0]
    torch.testing.assert_close(features[0], torch.cat([steps[:, -1], steps.mean(1), steps.amax(1)], 1))


def test_every_cell_settings_name_is_a_model() -> None:
    assert tuple(CELLS) == Settings.__dataclass_fields__["model"].metadata["choices"]


def test_model_runs_on_the_device_it_is_on() -> None:
    device = resolve_device("auto")
    model = build_model(Settings(hidden=8)).to(device)
    out = model(torch.zeros(2, 28, 28, dtype=torch.uint8, device=device))
    assert out.device.type == device.type


def test_explicit_missing_device_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PipelineError, match="no CUDA"):
        resolve_device("cuda")


def test_no_augmentation_at_evaluation_unless_test_time_augmentation_averages_seeded_passes() -> None:
    cfg = Settings(hidden=8, augment=True)
    model = build_model(cfg)
    images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8)
    plain = predict_log_proba(model, images, cfg, seed=1)
    torch.testing.assert_close(plain, predict_log_proba(model, images, cfg, seed=2), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(plain, model(images).log_softmax(1), atol=1e-5, rtol=0)
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

    model = build_model(Settings(hidden=8)).eval()
    seen = []
    model.rnn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    model(images)
    torch.testing.assert_close(seen[0], ((images.float() / 255 - PIXEL_MEAN) / PIXEL_STD).view(4, 14, 56))


def test_weight_averaging_keeps_the_moving_average_of_every_step() -> None:
    """EMA=d: after each step the average becomes d * average + (1 - d) * weights (the first step's
    weights start it); the model evaluated and kept is the average, and training is unchanged."""
    cfg = replace(CFG, ema=0.6, augment=False)
    plain, _, _ = fit(replace(cfg, ema=0.0), epochs=1)
    step, (images, labels) = new_state(cfg).step, data()
    order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(3))
    average: dict[str, torch.Tensor] = {}
    for start in range(0, ROWS, cfg.batch):
        rows = order[start:start + cfg.batch]
        step(images[rows].float(), labels[rows])
        for name, value in step.model.state_dict().items():
            average[name] = value.clone() if name not in average else 0.6 * average[name] + 0.4 * value
    assert_same_model(step.model, plain)  # averaging never changes what the optimizer does
    assert step.trained is not step.model
    for name, value in step.trained.state_dict().items():
        torch.testing.assert_close(value, average[name], msg=name)


def test_a_fold_state_restored_whole_continues_exactly(tmp_path: Path) -> None:
    """The saved state holds everything (weights, optimizer, schedule, generators, the weight
    average, the log and the best weights): a restored fold continues exactly; another key or
    device type starts the fold again."""
    cfg, path = replace(CFG, ema=0.9), tmp_path / "state.pt"

    def epoch(state: FoldState) -> None:  # the training loss stands in for the held-out one
        loss, _ = train.train_epoch(state, *data(), torch.arange(ROWS), cfg)
        state.end_epoch({"epoch": state.epoch + 1, "valid_acc": 0.5, "valid_loss": loss}, 1.0)

    whole, half, resumed = new_state(cfg), new_state(cfg), new_state(replace(cfg, lr=0.1))
    epoch(whole)
    epoch(whole)
    epoch(half)
    half.save(path, "k")
    assert not resumed.restore(path, "other") and resumed.restore(path, "k") and resumed.epoch == 1
    epoch(resumed)
    assert_same_model(resumed.step.trained, whole.step.trained)
    assert (resumed.history, resumed.best, resumed.elapsed) == (whole.history, whole.best, 2.0)
    for name, tensor in whole.best_weights.items():
        assert torch.equal(resumed.best_weights[name], tensor), name
    torch.save({**torch.load(path, weights_only=True), "device_type": "cuda"}, path)
    assert not new_state(cfg).restore(path, "k")  # random states of one device type fit no other
