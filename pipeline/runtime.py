"""Devices, checkpoints and the batched inference every stage shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.augment import random_affine
from pipeline.config import TrainConfig, resolve
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.models import build_model


def resolve_device(name: str) -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU. An explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PipelineError(f"device: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") \
            from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device: cuda asked for, but PyTorch sees no CUDA GPU (DEVICE=auto "
                            "falls back to the CPU)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PipelineError(f"device: {name} asked for, but only {torch.cuda.device_count()} "
                            "CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError("device: mps asked for, but Apple MPS is not available")
    return device


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by this pipeline, loaded safely (tensors and plain data only)."""
    if not path.is_file():
        raise PipelineError(f"{path}: not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(f"{path}: corrupt or not a checkpoint of this pipeline (torch.load failed: "
                            f"{type(exc).__name__}); delete it and retrain that fold") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise PipelineError(f"{path}: not a checkpoint of this pipeline; delete it and retrain")
    return payload


def config_of(path: Path, payload: dict[str, Any]) -> TrainConfig:
    """The training config a checkpoint carries."""
    try:
        return resolve(overrides=payload["config"])
    except PipelineError as exc:
        raise PipelineError(f"{path}: its config is not valid here ({exc})") from exc


def model_from_checkpoint(path: Path, payload: dict[str, Any]) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model a checkpoint describes and load its weights."""
    cfg = config_of(path, payload)
    model = build_model(cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise PipelineError(f"{path}: weights do not fit the model its config describes "
                            f"({cfg.model}, hidden {cfg.hidden}); delete it and retrain") from exc
    return model, cfg


def autocast(device: torch.device, enabled: bool, cache: bool = True) -> torch.autocast:
    # bfloat16 needs no loss scaling, so mixed precision adds no host synchronisation. PyTorch's
    # autocast rule for cuDNN RNNs casts the recurrent layer to float16 whatever dtype is asked for.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=enabled and device.type == "cuda", cache_enabled=cache)


@torch.no_grad()
def predict_log_proba(model: nn.Module, images: torch.Tensor, cfg: TrainConfig,
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
                moved = random_affine(batch, generator, cfg.rotate, cfg.scale, cfg.shift)
                probs += model(moved).float().softmax(1)
        chunks.append((probs / (tta + 1)).log())
    return torch.cat(chunks)
