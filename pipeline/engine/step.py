"""One training step (forward, loss, backward, clipping, update, schedule), eager or from a CUDA graph.

A small RNN's step is dozens of tiny kernels whose launches, not their work, take a GPU's time. With
``cuda_graph`` on CUDA, the forward, loss, backward and clipping of a full batch are captured once
and replayed: one launch per step. The optimizer and the schedule stay outside the graph, so both
paths run the same kernels on the same numbers. The graph needs fixed addresses (a static input
buffer; gradients never set to None), fixed shapes (a short last batch runs eagerly) and no
randomness inside the step (dropout between stacked layers trains eagerly), so that the first replay
can be checked against the last eager warm-up pass: if it differs, or capture fails, the fold says
why and trains without the graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.config import Settings
from pipeline.engine.runtime import autocast

WARMUP_STEPS = 3  # eager passes on the capture stream before capture (cuDNN plans, workspaces)
Outputs = tuple[torch.Tensor, torch.Tensor]  # a step's summed loss and count of right answers


class CudaGraph:
    """The CUDA side of capture: a side stream for warm-up and capture, then replay."""

    # After a failed capture or check, later folds in the same process train without a graph (and
    # say so) rather than pay for, and risk, another attempt.
    failed = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.stream = torch.cuda.Stream(device)
        self.graph = torch.cuda.CUDAGraph()
        self.pool = torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        # Warm-up runs on the capturing stream, so the per-stream library handles and workspaces
        # (cuBLAS's, for the linear head) exist before capture, which may not create them.
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                yield
        finally:
            current.wait_stream(self.stream)

    def capture(self, fn: Callable[[], Outputs]) -> Outputs:
        """Capture fn; returns its outputs, tensors each replay writes anew."""
        current = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.device(self.device), torch.cuda.graph(self.graph, pool=self.pool,
                                                                  stream=self.stream):
                return fn()
        except BaseException:
            # A failed capture_end skips torch.cuda.graph's own clean-up: put the stream back and
            # end the allocator's capture into the graph's pool, as torch.cuda.use_mem_pool does.
            torch.cuda.set_stream(current)
            with contextlib.suppress(Exception):
                torch._C._cuda_endAllocateToPool(self.index, self.pool)
                torch._C._cuda_releasePool(self.index, self.pool)
            raise

    def replay(self) -> None:
        self.graph.replay()


def graph_wanted(cfg: Settings, device: torch.device) -> bool:
    """Whether the step is captured: asked for, on CUDA, and with nothing random inside the step."""
    return cfg.cuda_graph and device.type == "cuda" and not (cfg.dropout > 0 and cfg.layers > 1)


class TrainStep:
    """One training step per call. make_graph: builds the capture backend (CudaGraph on CUDA; the
    tests pass stand-ins that fail, to check on a CPU that the eager step takes over)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: Settings,
                 device: torch.device, make_graph: Callable[[torch.device], CudaGraph] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.model, self.optimizer, self.scheduler, self.cfg = model, optimizer, scheduler, cfg
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if make_graph is None and graph_wanted(cfg, device):
            if CudaGraph.failed:
                log("CUDA graph not used: it failed earlier in this process")
            else:
                make_graph = CudaGraph
        self.make_graph = make_graph
        self.graph: CudaGraph | None = None
        self.static_x = self.static_y = torch.empty(0)
        self.static_out: Outputs = (torch.empty(0), torch.empty(0))
        self.log = log
        # Weight averaging (EMA=): an exponential moving average of the weights after every step.
        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema),
                                     use_buffers=True) if cfg.ema > 0 else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Outputs:
        """A step on the batch; returns its summed loss and its count of right answers, on the
        device (from a replay, the graph's own tensors: add them up before the next step)."""
        full = len(x) == self.cfg.batch
        if full and self.graph is None and self.make_graph is not None:
            self._capture(x, y)
        if full and self.graph is not None:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
            out = self.static_out
        else:
            # Once a graph owns the gradient tensors they must keep their addresses.
            self.optimizer.zero_grad(set_to_none=self.graph is None)
            out = self._forward_backward(x, y)
        self.optimizer.step()
        self.scheduler.step()
        if self.average is not None:
            self.average.update_parameters(self.model)
        return out

    @property
    def trained(self) -> torch.nn.Module:
        """The model to evaluate and keep: the weight average when there is one."""
        return self.model if self.average is None else self.average.module

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> Outputs:
        # Autocast's weight cache would hold tensors from outside the graph's memory: off in graphs.
        with autocast(self.device, self.cfg.amp, cache=self.make_graph is None):
            logits = self.model(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        loss.backward()
        if self.cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip)
        # y: class indices, or class probabilities (distillation's soft targets).
        right = (logits.detach().argmax(1) == (y if y.ndim == 1 else y.argmax(1))).sum()
        return loss.detach() * len(y), right

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Warm up, capture and check on the first full batch; on any failure, carry on eagerly."""
        assert self.make_graph is not None
        graph = self.make_graph(self.device)
        self.static_x, self.static_y = x.clone(), y.clone()
        step = lambda: self._forward_backward(self.static_x, self.static_y)  # noqa: E731
        try:
            with graph.warmup():
                for _ in range(WARMUP_STEPS):
                    self.optimizer.zero_grad(set_to_none=True)
                    step()
                expected = [_grad(p).clone() for p in self.params]
            # Captured with no gradients, the backward writes fresh ones (in the graph's memory)
            # on every replay instead of adding to the last step's.
            self.optimizer.zero_grad(set_to_none=True)
            self.static_out = graph.capture(step)
            graph.replay()
            problem = _differs(self.params, expected)
        except RuntimeError as exc:
            # The error that ends a capture is often "capture invalidated"; the cause comes first.
            cause = exc.__context__ if isinstance(exc.__context__, Exception) else exc
            problem = f"capture failed ({str(cause).splitlines()[0]})"
        if problem:
            CudaGraph.failed = True
            self.log(f"CUDA graph {problem}; training without it")
            self.make_graph = None
            self.optimizer.zero_grad(set_to_none=True)  # before the graph (and its memory) goes
        else:
            self.graph = graph


def _grad(param: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient after a backward (every trainable parameter has one then)."""
    assert param.grad is not None
    return param.grad.detach()


def _differs(params: Sequence[torch.Tensor], expected: list[torch.Tensor]) -> str:
    """Why a replay's gradients are not the eager pass's on the same batch and weights, or ''."""
    for p, want in zip(params, expected, strict=True):
        if p.grad is None or p.grad.shape != want.shape:
            return "replay left no gradient"
        # Same kernels on the same numbers; cuDNN's weight gradients may add in another order.
        if not torch.allclose(p.grad, want, rtol=1e-3, atol=1e-6):
            gap = (p.grad - want).abs().max().item()
            return f"replay differs from the eager step (gradient off by up to {gap:.3g})"
    return ""
