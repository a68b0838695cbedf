"""Project paths and the training configuration.

Every path is anchored at a project root (the repository by default), so any stage runs from any
working directory. The training configuration is one dataclass; a preset, a TOML/JSON config file
and command-line options merge over its defaults in that order.
"""

from __future__ import annotations

import hashlib
import json
import tomllib  # Python 3.11+
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
COMPETITION = "digit-recognizer"


@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes, relative to one root."""

    root: Path = ROOT

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def train_csv(self) -> Path:
        return self.input / "train.csv"

    @property
    def test_csv(self) -> Path:
        return self.input / "test.csv"

    @property
    def source_json(self) -> Path:
        return self.input / "source.json"

    @property
    def prepared(self) -> Path:
        return self.input / "prepared"

    @property
    def folds_csv(self) -> Path:
        return self.input / "folds.csv"

    @property
    def folds_json(self) -> Path:
        return self.input / "folds.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def preds(self) -> Path:
        return self.root / "preds"

    @property
    def submissions(self) -> Path:
        return self.root / "submissions"

    @property
    def submission_csv(self) -> Path:
        return self.submissions / "submission.csv"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def fold_model(self, fold: int) -> Path:
        return self.models / f"fold_{fold}.pt"

    def fold_state(self, fold: int) -> Path:
        """The resumable end-of-epoch state of a fold still in training."""
        return self.models / f"fold_{fold}.last.pt"

    def fold_log(self, fold: int) -> Path:
        return self.logs / f"fold_{fold}.csv"

    def oof_preds(self, fold: int) -> Path:
        return self.preds / f"oof_fold_{fold}.csv"

    def test_preds(self, fold: int) -> Path:
        return self.preds / f"test_fold_{fold}.csv"


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters. The defaults are the tuned recipe for the vanilla RNN (see README)."""

    # -- model ---------------------------------------------------------------------------------
    model: str = "rnn"  # recurrent cell: rnn (vanilla, tanh), gru or lstm; rows are time steps
    hidden: int = 128  # hidden units per direction; 128 trains fast and beats 150 of the tutorial
    layers: int = 1  # stacked recurrent layers
    bidirectional: bool = False  # also read the rows bottom-up and join both final states
    dropout: float = 0.0  # dropout between stacked layers (needs layers > 1)
    orthogonal_init: bool = True  # orthogonal recurrent weights: stable gradients over 28 steps
    # -- cross-validation -----------------------------------------------------------------------
    folds: int = 5  # stratified folds; one model per fold, averaged for the submission
    seed: int = 42  # fixes folds, initialisation, shuffling and augmentation
    # -- optimisation ---------------------------------------------------------------------------
    epochs: int = 30  # passes over the training rows of a fold
    batch: int = 128  # training batch size; any size works, the last short batch included
    drop_last: bool = False  # drop the last short batch of an epoch (the tutorial did)
    optimizer: str = "adamw"  # adamw (decoupled weight decay) or adam
    lr: float = 3e-3  # peak learning rate (the one-cycle schedule warms up to it)
    weight_decay: float = 1e-4  # AdamW weight decay
    schedule: str = "onecycle"  # onecycle, cosine or none (constant learning rate)
    clip: float = 1.0  # gradient-norm clipping; vanilla RNNs explode without it (0 = off)
    label_smoothing: float = 0.1  # softens the targets; helps calibration of the ensemble
    # -- input ----------------------------------------------------------------------------------
    normalize: bool = True  # standardise pixels with the MNIST mean/std instead of plain /255
    augment: bool = True  # random rotation, scale and shift of each training image, on device
    rotate: float = 10.0  # augmentation: largest rotation in degrees
    scale: float = 0.1  # augmentation: largest relative zoom in or out
    shift: float = 2.0  # augmentation: largest shift in pixels
    # -- prediction and hardware -----------------------------------------------------------------
    tta: int = 0  # test-time augmentation: extra augmented passes averaged per model (0 = off)
    device: str = "auto"  # auto (CUDA, then Apple MPS, then CPU), cuda, cuda:N, mps or cpu
    jobs: int = 0  # folds trained at once (processes); 0 = auto: all on a GPU, one at a time on CPU
    amp: bool = False  # CUDA autocast: bfloat16, the cuDNN recurrent layer float16; ignored elsewhere
    cuda_graph: bool = True  # replay each training step from a CUDA graph (checked); ignored off CUDA
    eval_batch: int = 4096  # batch size for validation and prediction

    def key(self, *names: str) -> str:
        """A short fingerprint of the named fields (all fields when none are named)."""
        values = asdict(self)
        chosen = {n: values[n] for n in (names or sorted(values))}
        return fingerprint(chosen)


CHOICES: dict[str, tuple[str, ...]] = {
    "model": ("rnn", "gru", "lstm"),
    "optimizer": ("adamw", "adam"),
    "schedule": ("onecycle", "cosine", "none"),
}

# The settings that change what a fold's model learns; the rest (device, jobs, tta...) do not.
MODEL_FIELDS = (
    "model", "hidden", "layers", "bidirectional", "dropout", "orthogonal_init", "epochs", "batch",
    "drop_last",
    "optimizer", "lr", "weight_decay", "schedule", "clip", "label_smoothing", "normalize",
    "augment", "rotate", "scale", "shift", "amp",
)

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The recipe of the tutorial this project grew from, for comparison on your own data.
    "tutorial": {
        "model": "rnn", "hidden": 150, "layers": 1, "bidirectional": False, "dropout": 0.0,
        "orthogonal_init": False,
        "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "none", "clip": 0.0,
        "label_smoothing": 0.0, "batch": 64, "drop_last": True, "epochs": 10,
        "normalize": False, "augment": False,
    },
}


def fingerprint(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha1(data).hexdigest()[:16]


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range checks with messages that say what was expected."""
    for name, options in CHOICES.items():
        value = getattr(cfg, name)
        if value not in options:
            raise PipelineError(f"config: {name} must be one of {', '.join(options)}, got {value!r}")
    positive = ("hidden", "layers", "epochs", "batch", "eval_batch")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise PipelineError(f"config: {name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.folds < 2:
        raise PipelineError(f"config: folds must be at least 2, got {cfg.folds}")
    if not cfg.lr > 0:
        raise PipelineError(f"config: lr must be positive, got {cfg.lr}")
    for name in ("dropout", "label_smoothing", "scale"):
        if not 0 <= getattr(cfg, name) < 1:
            raise PipelineError(f"config: {name} must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("clip", "weight_decay", "rotate", "shift", "tta", "jobs"):
        if getattr(cfg, name) < 0:
            raise PipelineError(f"config: {name} must not be negative, got {getattr(cfg, name)}")
    return cfg


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML or JSON file of config fields (a saved logs/config.json works as is)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read config file ({exc.strerror})") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise PipelineError(f"{path}: not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a table of config fields")
    return data


def resolve(preset: str | None = None, file: Path | None = None,
            overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the preset, then the config file, then command-line overrides."""
    known = {f.name: f.type for f in fields(TrainConfig)}
    layers: list[tuple[str, dict[str, Any]]] = []
    file_values = load_config_file(file) if file else {}
    preset = preset or file_values.pop("preset", None) or "default"
    file_values.pop("preset", None)
    if preset not in PRESETS:
        raise PipelineError(f"config: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    layers.append((f"preset {preset}", PRESETS[preset]))
    if file:
        layers.append((str(file), file_values))
    layers.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None}))
    cfg = TrainConfig()
    for origin, values in layers:
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise PipelineError(f"{origin}: unknown config field(s) {', '.join(unknown)}; "
                                f"known: {', '.join(known)}")
        cfg = replace(cfg, **{k: _coerce(k, v, origin) for k, v in values.items()})
    return validate(cfg)


def _coerce(name: str, value: Any, origin: str) -> Any:
    default = getattr(TrainConfig(), name)
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
    else:
        try:
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            pass
    raise PipelineError(f"{origin}: {name} must be {kind.__name__}, got {value!r}")
