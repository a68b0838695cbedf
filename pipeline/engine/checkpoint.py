"""A fold's finished model (`fold_<k>.pt`: the best weights and the settings that built them, so
predict rebuilds it from its file alone) and the resumable state of a fold in training
(`fold_<k>.state.pt`). Every load uses `weights_only=True` (tensors and plain data only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Settings, resolve
from pipeline.engine.models import build_model
from pipeline.engine.step import TrainStep
from pipeline.errors import PipelineError
from pipeline.store.io import atomic_path


def save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def save_finished(path: Path, model: nn.Module, cfg: Settings, best: dict[str, Any]) -> None:
    """A finished model: its weights (on the CPU), its settings and its best epoch."""
    save(path, {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "config": asdict(cfg), **best})


def model_from(path: Path) -> tuple[nn.Module, Settings]:
    """Rebuild the model a finished checkpoint describes (loaded safely) and load its weights."""
    if not path.is_file():
        raise PipelineError(f"{path}: not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(f"{path}: corrupt or not a checkpoint of this pipeline (torch.load failed: "
                            f"{type(exc).__name__})") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise PipelineError(f"{path}: not a checkpoint of this pipeline")
    try:
        cfg = resolve(overrides=payload["config"])
    except PipelineError as exc:
        raise PipelineError(f"{path}: its settings are not valid here ({exc})") from exc
    model = build_model(cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise PipelineError(f"{path}: weights do not fit the model its settings describe "
                            f"({cfg.model}, hidden {cfg.hidden})") from exc
    return model, cfg


# -- the resumable state of a fold in training ----------------------------------------------------

@dataclass
class FoldState:
    """A fold in training, whole (step, generator, log, best epoch and its weights, time spent): saved
    after every epoch and restored whole, so a resumed fold ends where an uninterrupted one would."""

    step: TrainStep
    generator: torch.Generator
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)  # epoch, valid_acc, valid_loss
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def epoch(self) -> int:  # the epochs done
        return len(self.history)

    def end_epoch(self, row: dict[str, Any], seconds: float) -> None:
        """Log the epoch, and keep its weights when it is the best so far (accuracy, then loss)."""
        self.history.append(row)
        self.elapsed += seconds
        if not self.best or (row["valid_acc"], -row["valid_loss"]) > (self.best["valid_acc"],
                                                                      -self.best["valid_loss"]):
            self.best = {k: row[k] for k in ("epoch", "valid_acc", "valid_loss")}
            weights = self.step.trained.state_dict()
            self.best_weights = {k: v.detach().cpu().clone() for k, v in weights.items()}

    def save(self, path: Path, key: str) -> None:
        step, device = self.step, self.step.device
        save(path, {
            "key": key, "model": step.model.state_dict(), "optimizer": step.optimizer.state_dict(),
            "scheduler": step.scheduler.state_dict(), "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(), "history": self.history, "best": self.best,
            "best_weights": self.best_weights, "elapsed": self.elapsed, "device_type": device.type,
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "average": step.average.state_dict() if step.average is not None else None,
        })

    def restore(self, path: Path, key: str) -> bool:
        """Load the saved state of this very fold, if there is one; whether there was."""
        saved, step = load_state(path, key, self.step.device), self.step
        if saved is None:
            return False
        for part in ("model", "optimizer", "scheduler"):
            getattr(step, part).load_state_dict(saved[part])
        if step.average is not None and saved.get("average") is not None:
            step.average.load_state_dict(saved["average"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        if step.device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], step.device)
        self.history, self.best = saved["history"], saved["best"]
        self.best_weights, self.elapsed = saved["best_weights"], saved["elapsed"]
        return True


def load_state(path: Path, key: str, device: torch.device) -> dict[str, Any] | None:
    """The saved state of this very training run, or None (a stale one is ignored)."""
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
