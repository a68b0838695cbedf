"""The options that are not settings (RUN, RUNS, MEAN, STUDY, FORCE, SOURCE, ...), declared once.

The command line's parser (pipeline/cli.py), `make help` and the README's option table all come
from OPTIONS here and from the settings in pipeline/config.py; a test compares the README with
markdown(). Standard library only: `make help` runs before the virtual environment exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.config import PRESETS, ROOT, Settings, allowed

MEANS = ("prob", "logprob")
# Kaggle's name of the machine `make kaggle-run` asks for by default: two T4 GPUs.
T4 = "NvidiaTeslaT4"

# The stages that build the data first (download -> prepare), and those that take settings.
DATA_STAGES = ("download", "prepare", "folds", "train", "predict", "submit", "distill", "blend",
               "report", "tune", "kaggle-run")
SETTINGS_STAGES = ("folds", "train", "predict", "submit", "distill", "blend", "report", "tune", "kaggle-run")
EVERY = "every command"  # an option of the command line itself, before the stage
# Every stage, in the order `python -m pipeline --help` lists them (pipeline/cli.py's STAGES).
ALL_STAGES = ("download", "prepare", "folds", "train", "predict", "submit", "distill", "blend", "report",
              "tune", "tune-status", "runs", "forget", "upload", "lb", "kaggle-run", "quota")


@dataclass(frozen=True)
class Option:
    """One option: its help, the stages that take it (each with its own words, or "" for the
    help as it is), its default, type and allowed values. Its make variable is NAME.upper()."""

    name: str
    help: str
    stages: dict[str, str]
    default: Any = None
    type: type = str
    choices: tuple[str, ...] | None = None
    flag: bool = False  # given or not: --force, FORCE=1
    make: bool = True  # also a make variable (NAME=value); False: the command line's only
    # A stage whose default differs (report: STUDY draws a study only when given).
    stage_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_in(self, stage: str) -> Any:
        return self.stage_defaults.get(stage, self.default)


def _each(stages: tuple[str, ...]) -> dict[str, str]:
    return dict.fromkeys(stages, "")


OPTIONS: tuple[Option, ...] = (
    Option("source", "where the CSVs come from when input/ has none", _each(DATA_STAGES),
           default="auto", choices=("auto", "kaggle", "dir", "sample")),
    Option("dir", "the folder holding train.csv and test.csv (with SOURCE=dir)", _each(DATA_STAGES),
           type=Path),
    Option("timeout", "seconds to wait for Kaggle before giving up",
           {**_each((*DATA_STAGES, "upload", "lb", "quota")),
            "kaggle-run": "seconds to wait for each answer from Kaggle before giving up"},
           default=300.0, type=float),
    Option("force", "do it again even if current", {
        "download": "fetch again even if the files exist",
        "prepare": "rebuild the cache even if current",
        "train": "retrain even the folds that are current (an interrupted retrain resumes)",
        "predict": "predict again even if current",
        "submit": "download the CSVs again even if present",
        "blend": "blend again even if current"}, flag=True),
    Option("config", "a TOML or JSON file of settings (a run's runs/<id>/config.json works)",
           _each(SETTINGS_STAGES), type=Path),
    Option("preset", "a named recipe: 'best' is the most accurate vanilla RNN measured (both sweeps, "
           "relu), 'tutorial' reproduces the tutorial's settings, 'tuned' is the best one-way vanilla RNN "
           "`make tune` found on 5,999 digits", _each(SETTINGS_STAGES), choices=tuple(PRESETS)),
    Option("fold", "train only this fold (0-based)", {"train": ""}, type=int),
    Option("run", "a run, by id (`make runs` lists them)", {
        "train": "the run to train (its settings)",
        "predict": "the run to predict with",
        "distill": "the distilled run to finish",
        "report": "the run to draw (default: the latest)",
        "forget": "the run to delete (required)"}),
    Option("runs", "the runs to blend, by id, separated by spaces (default: every completed run on "
           "the current data and folds)", {"blend": ""}),
    Option("mean", "average log-probabilities (logprob: it blended better out of fold) or "
           "probabilities (prob)", {"blend": ""}, default="logprob", choices=MEANS),
    Option("study", "the tuning study's name (report: none, so it draws a run)", {
        "tune": "", "tune-status": "", "report": "draw this tuning study instead of a run"},
           default="rnn", stage_defaults={"report": None}),
    Option("storage", "an Optuna database URL shared by several machines, e.g. "
           "postgresql://user:pass@host/db, an '@' in the password written %40 (default: a journal in "
           "runs/tune/<study>/)", _each(("tune", "tune-status", "report"))),
    Option("trials", "run until the study has this many finished trials", {"tune": ""}, default=20, type=int),
    Option("workers", "trial processes on this machine", {"tune": ""}, default=1, type=int),
    Option("space", "the search space (default: tune.toml)", {"tune": ""}, type=Path),
    Option("tune_folds", "score trials on their first k folds only (0: all folds)", {"tune": ""},
           default=0, type=int),
    Option("pruner", "how hopeless trials are stopped", {"tune": ""}, default="median",
           choices=("median", "wilcoxon", "none")),
    Option("sort", "best OOF accuracy first (acc) or newest first (time)", {"runs": ""},
           default="acc", choices=("acc", "time")),
    Option("format", "a table, or csv for a spreadsheet", _each(("runs", "lb")), default="table",
           choices=("table", "csv")),
    Option("message", "the submission's description on Kaggle, as typed ($ and quotes included)",
           {"upload": ""}, default=""),
    Option("wait", "seconds to wait for Kaggle to score the submission, 0 to not wait (`make lb` "
           "shows a score that comes later)", {"upload": ""}, default=120.0, type=float),
    Option("verbose", "also show the warnings of the libraries underneath (Optuna, PyTorch, pandas...), "
           "hidden by default: they speak of code a user does not call", _each(ALL_STAGES), flag=True),
    Option("accelerator", f"the Kaggle machine to train on: {T4} (GPU T4 x2) or none (its CPU); "
           "not a P100, which Kaggle's PyTorch no longer runs on", {"kaggle-run": ""}, default=T4),
    Option("deadline", "seconds to wait for the run on Kaggle (its session's limit too); the kernel is "
           "then deleted", {"kaggle-run": ""}, default=7200.0, type=float),
    Option("keep", "keep the kernel on Kaggle when the command ends (by default it is deleted, whatever "
           "the end)", {"kaggle-run": ""}, flag=True),
    Option("nowait", "when another command holds the project, stop at once instead of waiting",
           {EVERY: ""}, flag=True),
    Option("root", "the project folder holding input/, runs/, submissions/ (default: this repository)",
           {EVERY: ""}, default=ROOT, type=Path, make=False),
)
ARGS = "any other option of a stage, e.g. ARGS=\"--fold 2\" (python -m pipeline <stage> --help lists them)"

# The README's option tables: which settings and options share a row (each exactly once).
SETTING_ROWS: tuple[tuple[str, ...], ...] = (("model", "view"), ("rows_per_step", "readout", "nonlinearity"),
                ("hidden", "layers", "bidirectional"), ("dropout", "orthogonal_init"),
                ("folds", "fold_seed", "seed"), ("epochs", "batch", "drop_last"),
                ("optimizer", "weight_decay"), ("lr", "schedule"), ("clip", "label_smoothing", "ema"),
                ("normalize", "augment"), ("rotate", "scale", "shift"), ("elastic", "elastic_sigma"),
                ("teacher", "distill_temperature", "distill_threshold"), ("tta", "eval_batch"),
                ("device", "jobs"), ("cuda_graph", "amp"))
OPTION_ROWS: tuple[tuple[str, ...], ...] = (
    ("preset", "config"), ("run", "fold", "force"), ("runs", "mean"), ("source", "dir"),
    ("timeout", "message", "wait"), ("accelerator", "deadline", "keep"),
    ("trials", "workers", "tune_folds", "pruner"), ("study", "storage", "space"), ("sort", "format"),
    ("nowait", "verbose", "root"))


def default(name: str) -> Any:
    """An option's declared default, for the stage functions' own parameters."""
    return next(o.default for o in OPTIONS if o.name == name)


def for_stage(stage: str) -> list[Option]:
    return [o for o in OPTIONS if stage in o.stages]


def shown(value: Any, table: bool = False) -> str:
    """A default as help shows it, or (table) as the README's tables quote it: names in backticks."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None or (table and isinstance(value, Path)):
        return ""
    return f"`{value}`" if table and isinstance(value, str) and value else str(value)


def _stages_text(option: Option) -> str:
    if option.stages.keys() == {EVERY}:
        return EVERY
    if set(option.stages) == set(ALL_STAGES):
        return "every stage"
    names = list(option.stages)
    if set(DATA_STAGES) <= set(names):
        return "every stage that reads the data" + "".join(f", {n}" for n in names if n not in DATA_STAGES)
    if set(SETTINGS_STAGES) <= set(names):
        return "every stage that takes settings"
    return ", ".join(names)


def help_text() -> str:
    """`make help`'s list: the settings, then the other options, one line each."""
    lines = ["settings (part of a run's id unless marked; e.g. make submit MODEL=gru EPOCHS=40):"]
    for f in fields(Settings):
        default = int(f.default) if isinstance(f.default, bool) else "none" if f.default == "" else f.default
        mark = "" if f.metadata["learns"] else "; not in the run id"
        lines.append(f"  {f.name.upper():<20} {f.metadata['help']} (default {default}; {allowed(f)}{mark})")
    lines += ["", "other options (make <target> NAME=value; a yes/no option takes 1 or 0):"]
    for o in (o for o in OPTIONS if o.make):
        default = "" if o.default in (None, "") or o.flag else f"; default {shown(o.default)}"
        choices = f"; {'|'.join(o.choices)}" if o.choices else ""
        lines.append(f"  {o.name.upper():<20} {o.help} ({_stages_text(o)}{default}{choices})")
    lines.append(f"  {'ARGS':<20} {ARGS}")
    return "\n".join(lines)


def _make_name(name: str, default: Any, flag: bool = False) -> str:
    if flag or default is False:
        return f"`{name.upper()}=1`"
    return f"`{name.upper()}=0`" if default is True else f"`{name.upper()}`"


def _cli_flag(name: str, default: Any) -> str:
    return f"`--{'no-' if default is True else ''}{name.replace('_', '-')}`"


def _row(names: list[str], flags: list[str], defaults: list[str], text: str) -> str:
    return f"| {', '.join(names)} | {', '.join(flags)} | {', '.join(defaults)} | {text.replace('|', '/')} |"


def markdown(table: str) -> str:
    """The README's table of the settings (table="settings") or of the other options ("options")."""
    rows = ["| Make | CLI | default | what it does |", "|---|---|---|---|"]
    if table == "settings":
        for group in SETTING_ROWS:
            found = [Settings.__dataclass_fields__[n] for n in group]
            rows.append(_row([_make_name(f.name, f.default) for f in found],
                             [_cli_flag(f.name, f.default) for f in found],
                             [shown(f.default, table=True) for f in found],
                             "; ".join(f.metadata["help"] for f in found)))
        return "\n".join(rows)
    by_name = {o.name: o for o in OPTIONS}
    for group in OPTION_ROWS:
        chosen = [by_name[n] for n in group]
        texts = [(f"`make {next(iter(o.stages))}`: " if len(o.stages) == 1 and EVERY not in o.stages
                  else "") + o.help + (f" ({', '.join(o.choices)})" if o.choices else "") for o in chosen]
        rows.append(_row([_make_name(o.name, o.default, o.flag) if o.make else "" for o in chosen],
                         [f"`{o.flag_name}`" for o in chosen],
                         [shown(o.default, table=True) if not o.flag else "off" for o in chosen],
                         "; ".join(texts)))
    rows.append(_row(["`ARGS`"], [""], [""], ARGS))
    return "\n".join(rows)


def make_names() -> list[str]:
    """Every make variable that is an option or a setting (the Makefile passes those given)."""
    return [f.name.upper() for f in fields(Settings)] + [o.name.upper() for o in OPTIONS if o.make]


if __name__ == "__main__":  # `make help` prints this without needing the virtual environment
    import sys

    if sys.argv[1:2] == ["--markdown"]:
        print(markdown(sys.argv[2]))
    else:
        print(" ".join(make_names()) if sys.argv[1:2] == ["--make-names"] else help_text())
