"""Project paths and the training settings.

Every path is anchored at a project root (the repository by default), so any stage runs from any
working directory. Each setting is declared once, as a field of `Settings`; the command line, the
Make variables, `make help`, validation, the run id and `make runs` derive from that declaration.
Defaults, a preset, a TOML/JSON config file and command-line options merge in that order.

This module needs only the standard library, so `make help` can list the options before set-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tomllib  # Python 3.11+
from dataclasses import Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parent.parent
# The words a yes/no value takes from the environment or a file (NOWAIT=1, AUGMENT=off, ...).
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
COMPETITION = "digit-recognizer"


class Paths:
    """Where every stage reads and writes, relative to one root. also_submit: another folder the
    current submission.csv is copied to (a Kaggle notebook's /kaggle/working, where its output and
    "Submit" look; the command line sets it in a notebook)."""

    def __init__(self, root: Path = ROOT, also_submit: Path | None = None) -> None:
        self.root, self.also_submit = root, also_submit
        self.input, self.runs, self.reports = root / "input", root / "runs", root / "reports"
        self.train_csv, self.test_csv = self.input / "train.csv", self.input / "test.csv"
        self.source_json, self.prepared = self.input / "source.json", self.input / "prepared"
        self.folds_csv, self.folds_json = self.input / "folds.csv", self.input / "folds.json"
        self.submissions, self.submission_csv = root / "submissions", root / "submissions" / "submission.csv"


NO_LEGACY = object()  # a setting every run has recorded since the first release


def setting(default: Any, help: str, *, choices: tuple[Any, ...] | None = None,
            low: float | None = None, high: float | None = None, below: float | None = None,
            learns: bool = True, legacy: Any = NO_LEGACY) -> Any:
    """A settings field: default, help, allowed values ([low, high], or [low, below)) and whether it
    changes what a model learns (part of the run id). legacy: for a setting added after runs were
    made without it, the value those runs were trained with; the id leaves the setting out while it
    holds that value, and a saved config without it reads as that value (older runs keep their ids)."""
    return field(default=default, metadata=dict(help=help, choices=choices, low=low, high=high, below=below,
                                                learns=learns, legacy=legacy))


@dataclass(frozen=True)
class Settings:
    """Every setting of a run. The defaults are the tuned recipe for the vanilla RNN (see README)."""

    # -- model ---------------------------------------------------------------------------------
    model: str = setting("rnn", "recurrent cell: rnn (vanilla, tanh), gru or lstm",
                         choices=("rnn", "gru", "lstm"))
    view: str = setting("rows", "what a time step reads: rows (top to bottom), cols (left to right), "
                        "or both: a row sweep and a column sweep in one model, their features joined",
                        choices=("rows", "cols", "both"))
    rows_per_step: int = setting(2, "pixel rows (columns, for cols) one time step reads: 2 reads "
                                 "14 steps of 56 pixels, as accurate as 1 and twice as fast",
                                 choices=(1, 2, 4, 7, 14), legacy=1)
    readout: str = setting("pool", "what the classifier sees: the last states (last), or pool: them "
                           "with the mean and the max of every step's output", choices=("last", "pool"),
                           legacy="last")
    nonlinearity: str = setting("tanh", "the vanilla RNN's activation (tanh or relu; not for gru/lstm)",
                                choices=("tanh", "relu"), legacy="tanh")
    hidden: int = setting(128, "hidden units per direction; 128 trains fast and beats the tutorial's 150",
                          low=1, high=4096)
    layers: int = setting(1, "stacked recurrent layers", low=1, high=8)
    bidirectional: bool = setting(True, "also read the sequence backwards and join both final states: "
                                  "on 42,000 digits +0.8 points of accuracy for 2x the time")
    dropout: float = setting(0.0, "dropout between stacked layers (needs layers > 1)", low=0, below=1)
    orthogonal_init: bool = setting(True, "orthogonal recurrent weights: stable gradients over 28 steps")
    # -- cross-validation -----------------------------------------------------------------------
    folds: int = setting(5, "stratified folds; one model per fold, averaged for the submission",
                         low=2, high=100)
    fold_seed: int = setting(42, "fixes the fold assignment (input/folds.csv); runs that share it "
                             "can be blended", low=0, high=2**32 - 1)
    seed: int = setting(42, "fixes initialisation, shuffling and augmentation: runs of one recipe "
                        "with other seeds blend on the same folds", low=0, high=2**32 - 1)
    # -- optimisation ---------------------------------------------------------------------------
    epochs: int = setting(30, "passes over the training rows of a fold", low=1, high=10_000)
    batch: int = setting(128, "training batch size; any size works, the last short batch included",
                         low=1, high=1_000_000)
    drop_last: bool = setting(False, "drop the last short batch of an epoch (the tutorial did)")
    optimizer: str = setting("adamw", "adamw (decoupled weight decay) or adam", choices=("adamw", "adam"))
    lr: float = setting(3e-3, "peak learning rate (the one-cycle schedule warms up to it)",
                        low=1e-8, high=1e30)
    weight_decay: float = setting(1e-4, "AdamW weight decay", low=0, high=1.0)
    schedule: str = setting("onecycle", "learning-rate schedule: onecycle, cosine or none (constant)",
                            choices=("onecycle", "cosine", "none"))
    clip: float = setting(1.0, "gradient-norm clipping; vanilla RNNs explode without it (0 = off)",
                          low=0, high=1e6)
    ema: float = setting(0.0, "weight averaging: the decay of an exponential moving average of the "
                         "weights, updated every step; the averaged model is evaluated and kept (0 = off)",
                         low=0, below=1, legacy=0.0)
    label_smoothing: float = setting(0.1, "softens the targets; helps calibration of the ensemble",
                                     low=0, below=1)
    # -- input ----------------------------------------------------------------------------------
    normalize: bool = setting(True, "standardise pixels with the MNIST mean/std instead of plain /255")
    augment: bool = setting(True, "random rotation, scale and shift of each training image, on device")
    rotate: float = setting(10.0, "augmentation: largest rotation in degrees", low=0, high=180)
    scale: float = setting(0.1, "augmentation: largest relative zoom in or out", low=0, below=1)
    shift: float = setting(2.0, "augmentation: largest shift in pixels", low=0, high=28)
    elastic: float = setting(0.0, "augmentation: elastic distortion strength (Simard's alpha, in "
                             "pixels; 0 = off)", low=0, high=200)
    elastic_sigma: float = setting(4.0, "augmentation: smoothness of the elastic distortion (Gaussian "
                                   "std in pixels)", low=0.5, high=14)
    # -- distillation (make distill) ------------------------------------------------------------
    teacher: str = setting("", "a run or blend whose averaged test probabilities become extra "
                           "training rows (its id; empty = off)")
    distill_temperature: float = setting(1.0, "distillation: softens (>1) or sharpens (<1) the "
                                         "teacher's probabilities", low=0.05, high=20)
    distill_threshold: float = setting(0.0, "distillation: keep only test rows whose teacher "
                                       "confidence is at least this", low=0, high=1)
    amp: bool = setting(False, "CUDA autocast: bfloat16, the cuDNN recurrent layer float16; "
                        "ignored elsewhere")
    # -- prediction and hardware (where and how fast; not part of the run id) --------------------
    tta: int = setting(0, "test-time augmentation: extra augmented passes averaged per model (0 = off)",
                       low=0, high=64, learns=False)
    device: str = setting("auto", "auto (CUDA, then Apple MPS, then CPU), cuda, cuda:N, mps or cpu",
                          learns=False)
    jobs: int = setting(0, "folds trained at once (processes); 0 = auto: all on a GPU, one on a CPU",
                        low=0, high=256, learns=False)
    cuda_graph: bool = setting(True, "replay each training step from a CUDA graph (checked); "
                               "ignored off CUDA", learns=False)
    eval_batch: int = setting(4096, "batch size for validation and prediction", low=1,
                              high=1_000_000, learns=False)

    def learned(self) -> dict[str, Any]:
        """The settings that change what a model learns: what a run's id is made of. A setting
        added later is left out while it holds its legacy value (older runs never recorded it)."""
        values = asdict(self)
        return {f.name: values[f.name] for f in fields(self) if f.metadata["learns"]
                and values[f.name] != f.metadata["legacy"]}


# The settings that decide which rows each fold holds (folds.csv): part of every run's id, and never
# searched inside one study, whose trials must all be scored on the same folds.
FOLD_SETTINGS = ("folds", "fold_seed")

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The recipe of the tutorial this project grew from, for comparison on your own data.
    "tutorial": {"model": "rnn", "hidden": 150, "layers": 1, "bidirectional": False, "dropout": 0.0,
                 "orthogonal_init": False, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
                 "schedule": "none", "clip": 0.0, "label_smoothing": 0.0, "batch": 64, "drop_last": True,
                 "epochs": 10, "normalize": False, "augment": False},
    # The most accurate single vanilla RNN measured on 42,000 digits (docs/results.md): both sweeps,
    # two rows a step, pooled, relu; 0.9938 out of fold against the default's 0.9912, for 2x its time.
    "best": {"view": "both", "nonlinearity": "relu", "epochs": 30},
    # The best vanilla RNN of a 30-trial `make tune` study on 5,999 real digits (see README):
    # +1.0 point of OOF accuracy over the one-way default of then, for about 2.2x its training time.
    "tuned": {"model": "rnn", "bidirectional": False, "hidden": 192, "epochs": 60, "lr": 1.43e-3,
              "weight_decay": 7.0e-4, "label_smoothing": 0.16, "clip": 1.76, "rotate": 1.0, "scale": 0.04,
              "shift": 1.95},
}


def allowed(f: Field[Any]) -> str:
    """A field's allowed values in words, as messages and help show them."""
    meta = f.metadata
    if meta["choices"]:
        return "one of " + ", ".join(map(str, meta["choices"]))
    if isinstance(f.default, bool):
        return "1 or 0 (true or false)"
    if isinstance(f.default, str):
        return "a name"
    kind = "a whole number" if isinstance(f.default, int) else "a number"
    if meta["below"] is not None:
        return f"{kind} from {meta['low']:g} up to (not including) {meta['below']:g}"
    if meta["low"] is not None:
        return f"{kind} from {meta['low']:g} to {meta['high']:g}"
    return kind


def fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def validate(cfg: Settings, origin: str = "config") -> Settings:
    """Range checks derived from each field's declaration; messages name the option and the range."""
    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        bad = (meta["choices"] and value not in meta["choices"]) or (
            meta["low"] is not None and not value >= meta["low"]) or (
            meta["high"] is not None and not value <= meta["high"]) or (
            meta["below"] is not None and not value < meta["below"])
        if bad:
            raise PipelineError(f"{origin}: {f.name.upper()}={value!r} is out of range; "
                                f"{f.name} must be {allowed(f)}")
    return cfg


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML or JSON file of settings (a run's config.json works as is)."""
    if path.suffix not in (".toml", ".json"):
        raise PipelineError(f"{path}: a config file is TOML (.toml) or JSON (.json), "
                            f"not {path.suffix or 'a file without an extension'}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read config file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not a text file in UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except ValueError as exc:  # JSON's and TOML's decode errors
        raise PipelineError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a table of settings")
    return data


def resolve(preset: str | None = None, file: Path | None = None,
            overrides: dict[str, Any] | None = None) -> Settings:
    """Defaults, then the preset, then the config file, then command-line overrides."""
    known = {f.name: f for f in fields(Settings)}
    file_values = load_config_file(file) if file else {}
    from_file = file_values.pop("preset", None)
    if from_file is not None and not isinstance(from_file, str):
        raise PipelineError(f"{file}: preset must be one of {', '.join(PRESETS)} (a string), "
                            f"got {from_file!r}")
    preset = preset or from_file or "default"
    if preset not in PRESETS:
        raise PipelineError(f"{file if from_file and preset == from_file else 'config'}: unknown "
                            f"preset {preset!r}; choose from {', '.join(PRESETS)}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    layers = [(f"preset {preset}", PRESETS[preset]), (str(file), with_legacy(file_values)),
              ("command line", with_legacy(given))]
    cfg = Settings()
    for origin, values in layers:
        if unknown := sorted(set(values) - set(known)):
            raise PipelineError(f"{origin}: unknown setting(s) {', '.join(unknown)}; "
                                f"known: {', '.join(known)}")
        cfg = replace(cfg, **{k: coerce(known[k], v, origin) for k, v in values.items()})
        validate(cfg, origin)
    return cfg


def with_legacy(values: dict[str, Any]) -> dict[str, Any]:
    """A run's record of its settings (config.json, a checkpoint, run.json's) made before a setting
    existed takes that setting's legacy value, the one the run was trained with; other values (a
    config file of a few settings, options) are left as they are."""
    declared = fields(Settings)
    if not {f.name for f in declared
            if f.metadata["learns"] and f.metadata["legacy"] is NO_LEGACY} <= set(values):
        return values
    return {**{f.name: f.metadata["legacy"] for f in declared
               if f.metadata["legacy"] is not NO_LEGACY}, **values}


def coerce(f: Field[Any], value: Any, origin: str) -> Any:
    """A value of the field's type, from what a file or the command line gave."""
    kind: Any = type(f.default)
    if kind is bool and (isinstance(value, bool) or str(value).lower() in TRUE + FALSE):
        return value if isinstance(value, bool) else str(value).lower() in TRUE
    if kind is str and isinstance(value, str):
        return value
    if kind in (int, float) and not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            converted = kind(value)
            # int(2.5) would drop the half; NaN compares false with every bound
            if converted == converted and not (isinstance(value, float) and converted != value):
                return converted
    raise PipelineError(f"{origin}: {f.name} must be {allowed(f)}, got {value!r}")


def changed_settings(config: dict[str, Any] | Settings, preset: str = "default") -> dict[str, Any]:
    """The settings that change what a model learns and differ from the preset's (the defaults)."""
    values = asdict(config) if isinstance(config, Settings) else with_legacy(dict(config))
    base = asdict(replace(Settings(), **PRESETS[preset]))
    return {f.name: values[f.name] for f in fields(Settings)
            if f.name in values and f.metadata["learns"] and values[f.name] != base[f.name]}


def describe_changes(config: dict[str, Any] | Settings) -> str:
    """`preset=tutorial hidden=64`: the preset the run is closest to (if not the defaults), then
    the settings that differ from it."""
    name, rest = min(((p, changed_settings(config, p)) for p in PRESETS), key=lambda found: len(found[1]))
    words = [f"preset={name}"] if name != "default" else []
    return " ".join(words + [f"{k}={v}" for k, v in rest.items()])
