"""Devices and the batched inference every stage shares."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Settings
from pipeline.engine.augment import augment
from pipeline.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU. An explicit device must exist."""
    if name == "auto":
        mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PipelineError(f"DEVICE={name!r}: unknown device; use auto, cpu, cuda, cuda:N or mps") \
            from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"DEVICE={name}: PyTorch sees no CUDA GPU here (DEVICE=auto falls back "
                            "to the CPU)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PipelineError(f"DEVICE={name}: only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(f"DEVICE={name}: Apple MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise PipelineError(f"DEVICE={name!r}: not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def describe(device: torch.device, threads: int | None = None) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({threads or torch.get_num_threads()} threads)"
    return device.type


def autocast(device: torch.device, enabled: bool, cache: bool = True) -> torch.autocast:
    # bfloat16 needs no loss scaling, so mixed precision adds no host synchronisation. PyTorch's
    # autocast rule for cuDNN RNNs casts the recurrent layer to float16 whatever dtype is asked for.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=enabled and device.type == "cuda", cache_enabled=cache)


@torch.no_grad()
def predict_log_proba(model: nn.Module, images: torch.Tensor, cfg: Settings,
                      tta: int = 0, seed: int = 0) -> torch.Tensor:
    """Class log-probabilities of (N, 28, 28) images, averaged over tta extra augmented passes."""
    model.eval()
    device = images.device
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    for start in range(0, len(images), cfg.eval_batch):
        batch = images[start:start + cfg.eval_batch].float()
        with autocast(device, cfg.amp):
            if tta == 0:
                chunks.append(model(batch).float().log_softmax(1))
                continue
            probs = model(batch).float().softmax(1)
            for _ in range(tta):
                moved = augment(batch, generator, cfg)
                probs += model(moved).float().softmax(1)
        chunks.append((probs / (tta + 1)).log())
    return torch.cat(chunks)
