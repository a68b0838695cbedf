"""Save, load and resume: a fold's finished model and the state of a fold still in training.

A finished model (`fold_<k>.pt`) holds the best epoch's weights and the settings that built them,
so predict rebuilds each model from its file alone. The resumable state (`fold_<k>.state.pt`)
holds everything an interrupted fold needs to carry on exactly where it stopped, including the best
weights so far: the finished model is replaced only when a new one is finished. Every load uses
`weights_only=True` (tensors and plain data only).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Settings, resolve
from pipeline.engine.models import build_model
from pipeline.errors import PipelineError
from pipeline.store.io import atomic_path


def save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: Path) -> dict[str, Any]:
    """A finished model written by this pipeline, loaded safely."""
    if not path.is_file():
        raise PipelineError(f"{path}: not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(f"{path}: corrupt or not a checkpoint of this pipeline (torch.load failed: "
                            f"{type(exc).__name__})") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise PipelineError(f"{path}: not a checkpoint of this pipeline")
    return payload


def finished(model: nn.Module, cfg: Settings, best: dict[str, Any]) -> dict[str, Any]:
    """The payload of a finished model: weights (on the CPU), settings and the best epoch."""
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": asdict(cfg), **best}


def config_of(path: Path, payload: dict[str, Any]) -> Settings:
    try:
        return resolve(overrides=payload["config"])
    except PipelineError as exc:
        raise PipelineError(f"{path}: its settings are not valid here ({exc})") from exc


def model_from(path: Path) -> tuple[nn.Module, Settings]:
    """Rebuild the model a checkpoint describes and load its weights."""
    payload = load(path)
    cfg = config_of(path, payload)
    model = build_model(cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise PipelineError(f"{path}: weights do not fit the model its settings describe "
                            f"({cfg.model}, hidden {cfg.hidden})") from exc
    return model, cfg


# -- the resumable state of a fold in training ----------------------------------------------------

def save_state(path: Path, key: str, step: Any, generator: torch.Generator,
               history: list[dict[str, Any]], best: dict[str, Any], best_weights: dict[str, Any],
               elapsed: float) -> None:
    device = step.device
    save(path, {
        "key": key, "model": step.model.state_dict(), "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(), "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(), "history": history, "best": best,
        "best_weights": best_weights, "elapsed": elapsed, "device_type": device.type,
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "average": step.average.state_dict() if step.average is not None else None,
    })


def load_state(path: Path, key: str, device: torch.device) -> dict[str, Any] | None:
    """The resumable state of this very training run, or None (a stale one is ignored)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        print(f"{path}: unreadable training state; starting the fold again")
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        return None
    if state.get("device_type", "cpu") != device.type:
        # Random-number states of one device type do not fit another.
        print(f"{path}: saved on {state.get('device_type')}, now on {device.type}; "
              "starting the fold again")
        return None
    return state


def resume(state: dict[str, Any], step: Any, generator: torch.Generator) -> None:
    """Load a saved state into the model, optimizer, schedule and random generators."""
    step.model.load_state_dict(state["model"])
    step.optimizer.load_state_dict(state["optimizer"])
    step.scheduler.load_state_dict(state["scheduler"])
    if step.average is not None and state.get("average") is not None:
        step.average.load_state_dict(state["average"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if step.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], step.device)
