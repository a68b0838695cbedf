"""The training step, eager and graph-replayed: the bookkeeping around capture, checked on a CPU.

A CUDA graph cannot be captured without a GPU, so these tests drive TrainStep with a stand-in that
has a graph's semantics: capture records the step without running it; replay runs it again on the
static buffers, and the backward overwrites the gradients. What they check is everything the
pipeline does around the graph: warm-up leaves no trace, batches reach the static buffers, a short
batch runs eagerly without moving the gradients, a failed capture falls back, and the result equals
the eager step's. benchmarks/gpu_check.sh compares the two paths on a real GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.engine import step as step_module
from pipeline.engine.models import build_model
from pipeline.engine.step import WARMUP_STEPS, TrainStep, graph_wanted
from pipeline.stages import train

CPU = torch.device("cpu")
CFG = TrainConfig(hidden=12, batch=16, epochs=2, augment=True, clip=0.5)
ROWS = 40  # two full batches and a short one of 8


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a new process would: no earlier failed capture."""
    monkeypatch.setattr(step_module.CudaGraph, "failed", False)


class ReplayGraph:
    """A CPU stand-in for step.CudaGraph with a graph's semantics (see the module docstring).

    fail: capture raises as a real one can; stale: replays add to the last gradients instead of
    overwriting them (a graph captured wrongly).
    """

    def __init__(self, model: torch.nn.Module, fail: bool = False, stale: bool = False) -> None:
        self.model, self.fail, self.stale = model, fail, stale
        self.fn: Callable[[], None] | None = None
        self.warmups = self.captures = self.replays = 0

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        self.warmups += 1
        yield

    def capture(self, fn: Callable[[], None]) -> None:
        if self.fail:  # as torch.cuda.graph fails: the cause, then capture_end's own error
            try:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
            except RuntimeError:
                raise RuntimeError("CUDA error: operation failed due to a previous error during "
                                   "capture") from None
        assert all(p.grad is None for p in self.model.parameters()), "captured with stale gradients"
        self.fn = fn
        self.captures += 1

    def replay(self) -> None:
        for p in self.model.parameters():  # a replayed backward writes its gradients afresh
            if p.grad is not None and not self.stale:
                p.grad.zero_()
            elif p.grad is None and self.stale:
                p.grad = torch.ones_like(p)
        self.replays += 1
        self.fn()


def fit(cfg: TrainConfig, epochs: int, graph: Callable[[torch.nn.Module], ReplayGraph] | None = None,
        logs: list[str] | None = None) -> tuple[torch.nn.Module, list[tuple[float, float]], TrainStep]:
    torch.manual_seed(0)
    model = build_model(cfg)
    images = torch.randint(0, 256, (ROWS, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (ROWS,), generator=torch.Generator().manual_seed(2))
    optimizer = train.make_optimizer(cfg, model)
    scheduler = train.make_scheduler(cfg, optimizer, train.steps_per_epoch(cfg, ROWS))
    made: list[ReplayGraph] = []

    def make_graph(device: torch.device) -> ReplayGraph:
        made.append(graph(model))
        return made[-1]

    step = TrainStep(model, optimizer, scheduler, cfg, CPU, make_graph=make_graph if graph else None,
                     log=(logs.append if logs is not None else print))
    step.made = made  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(3)
    history = [train.train_epoch(step, images, labels, torch.arange(ROWS), cfg, generator)
               for _ in range(epochs)]
    return model, history, step


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_replayed_step_learns_exactly_what_the_eager_step_learns() -> None:
    eager, eager_history, _ = fit(CFG, epochs=2)
    graphed, graph_history, step = fit(CFG, epochs=2, graph=ReplayGraph)
    assert_same_model(eager, graphed)
    assert graph_history == eager_history
    (g,) = step.made
    # One capture for the whole run, after one warm-up, checked by one replay; then every full
    # batch replays and short ones don't.
    assert (g.warmups, g.captures, g.replays) == (1, 1, 1 + 2 * 2)


def test_warmup_passes_leave_no_trace_in_sums_or_weights() -> None:
    forwards: list[int] = []

    def counting(model: torch.nn.Module) -> ReplayGraph:  # made at the first full batch
        model.register_forward_hook(lambda *_: forwards.append(1))
        return ReplayGraph(model)

    graphed, history, _ = fit(replace(CFG, augment=False, epochs=1), epochs=1, graph=counting)
    eager, eager_history, _ = fit(replace(CFG, augment=False, epochs=1), epochs=1)
    # Warm-up, the check's replay, two full batches replayed and the short one run eagerly...
    assert len(forwards) == WARMUP_STEPS + 1 + 2 + 1
    # ...yet neither the weights nor the sums saw the extra passes.
    assert history == eager_history
    assert_same_model(eager, graphed)


def test_gradients_keep_their_storage_once_captured() -> None:
    _, _, step = fit(replace(CFG, epochs=3), epochs=1, graph=ReplayGraph)  # room for two more steps
    pointers = [p.grad.data_ptr() for p in step.params]
    # A short batch (eager) and then a full one (replayed): no gradient may be reallocated.
    step(torch.rand(5, 28, 28) * 255, torch.randint(0, 10, (5,)))
    step(torch.rand(16, 28, 28) * 255, torch.randint(0, 10, (16,)))
    assert [p.grad.data_ptr() for p in step.params] == pointers


def test_batches_reach_the_static_buffers() -> None:
    _, _, step = fit(replace(CFG, epochs=3), epochs=1, graph=ReplayGraph)
    x, y = torch.rand(16, 28, 28) * 255, torch.randint(0, 10, (16,))
    step(x, y)
    torch.testing.assert_close(step.static_x, x, rtol=0, atol=0)
    assert torch.equal(step.static_y, y)


def test_failed_capture_falls_back_to_the_eager_step() -> None:
    logs: list[str] = []
    eager, eager_history, _ = fit(CFG, epochs=2)
    fell_back, history, step = fit(CFG, epochs=2, graph=lambda m: ReplayGraph(m, fail=True), logs=logs)
    assert_same_model(eager, fell_back)
    assert history == eager_history
    assert len(step.made) == 1  # tried once, not on every batch
    assert len(logs) == 1 and "capture failed (CUDA error: operation not permitted" in logs[0]
    assert "more" not in logs[0]


def test_a_replay_that_differs_from_the_eager_step_is_not_used() -> None:
    logs: list[str] = []
    eager, eager_history, _ = fit(CFG, epochs=2)
    checked, history, step = fit(CFG, epochs=2, graph=lambda m: ReplayGraph(m, stale=True), logs=logs)
    assert step.graph is None and step.made[0].replays == 1  # the check, and never again
    assert len(logs) == 1 and "replay differs from the eager step" in logs[0]
    assert_same_model(eager, checked)
    assert history == eager_history


def test_a_failure_stops_later_folds_of_the_process_from_trying(monkeypatch: pytest.MonkeyPatch) -> None:
    logs: list[str] = []
    fit(CFG, epochs=1, graph=lambda m: ReplayGraph(m, fail=True), logs=logs)
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
    assert graph_wanted(TrainConfig(cuda_graph=True), cuda)
    assert not graph_wanted(TrainConfig(cuda_graph=False), cuda)
    assert not graph_wanted(TrainConfig(cuda_graph=True), CPU)  # ignored off CUDA
    # A replayed graph would reuse one dropout mask for ever.
    assert not graph_wanted(TrainConfig(cuda_graph=True, layers=2, dropout=0.2), cuda)
    assert graph_wanted(TrainConfig(cuda_graph=True, layers=2, dropout=0.0), cuda)


def test_cuda_graph_is_ignored_on_a_cpu() -> None:
    plain, plain_history, _ = fit(replace(CFG, cuda_graph=False), epochs=1)
    asked, asked_history, step = fit(replace(CFG, cuda_graph=True), epochs=1)
    assert step.graph is None and step.make_graph is None
    assert_same_model(plain, asked)
    assert asked_history == plain_history


@pytest.mark.parametrize("model", ["gru", "lstm"])
def test_replay_matches_eager_for_every_cell(model: str) -> None:
    cfg = replace(CFG, model=model, epochs=1)
    eager, eager_history, _ = fit(cfg, epochs=1)
    graphed, history, _ = fit(cfg, epochs=1, graph=ReplayGraph)
    assert_same_model(eager, graphed)
    assert history == eager_history
