"""Command line: ``python -m pipeline <stage> [options]``, one subcommand per stage, each building
what it needs upstream (download -> prepare -> folds -> train -> predict), skipping what is current.

With ``--make NAMES`` (what the Makefile passes), the options given on make's command line are read
from the variables DIGITS_OPT_<NAME> (the text as typed): ``make train EPOCHS=5`` is ``--epochs 5``.
Nothing else of the environment is read: a shell's SEED, MODEL or DEVICE changes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import fields, replace
from functools import cached_property
from typing import Any, Literal

import numpy as np

from pipeline.config import FALSE, TRUE, Paths, Settings, resolve
from pipeline.errors import Interrupted, PipelineError
from pipeline.kaggle import notebook
from pipeline.options import EVERY, SETTINGS_STAGES, Option, for_stage
from pipeline.options import shown as shown_value
from pipeline.store.data import Prepared
from pipeline.store.lock import project_lock
from pipeline.store.run import (
    Plan,
    RunDir,
    RunRecord,
    check_name,
    complete,
    latest,
    newest,
    run_dir,
    run_id,
    studies_dir,
)

WRITERS = ("download", "prepare", "folds", "train", "predict", "submit", "distill", "blend", "forget",
           "tune", "kaggle-run")


def load_stage(name: str) -> Any:
    """A stage's module, imported when its command runs: a command starts without the others'."""
    return importlib.import_module(f"pipeline.stages.{name.replace('-', '_')}")


class Command:
    """What a command works on, each part made (or found current) when first asked for, in the order
    of the stages: the data (download, prepare), its settings, the folds, the plan of its run."""

    def __init__(self, args: argparse.Namespace, paths: Paths) -> None:
        self.args, self.paths = args, paths
        if args.stage in ("train", "predict", "distill") and args.run:
            named_run(args, paths)  # before any data is made for it

    def forced(self, *stages: str) -> bool:
        """FORCE=1 redoes the named stages' work when the command is one of them."""
        return self.args.force and self.args.stage in stages

    def download(self) -> None:
        a = self.args
        load_stage("download").run(self.paths, a.source, a.dir, self.forced("download", "submit"), a.timeout)

    @cached_property
    def data(self) -> Prepared:
        self.download()
        return load_stage("prepare").run(self.paths, force=self.forced("prepare"))

    @cached_property
    def cfg(self) -> Settings:
        return settings(self.args, self.paths, self.data)

    @cached_property
    def fold_of(self) -> np.ndarray:
        return load_stage("folds").run(self.cfg, self.paths, self.data)

    @cached_property
    def plan(self) -> Plan:
        """The run of these settings on this data; distilled, with its teacher's rows."""
        plan = self.plan_of()
        if not self.cfg.teacher:
            return plan
        pseudo = load_stage("distill").pseudo_rows(self.paths, self.cfg, self.data, student=plan.run)
        return replace(plan, pseudo=pseudo)

    def plan_of(self) -> Plan:
        """The run of these settings on this data, without a teacher's rows."""
        return Plan(self.cfg, self.paths, run_dir(self.paths, run_id(self.cfg, self.data.data_key)),
                    self.data, self.fold_of)


# -- what each command does ------------------------------------------------------------------------

def settings(args: argparse.Namespace, paths: Paths, data: Prepared) -> Settings:
    """The settings of the command line, or of the run RUN= names (then only settings that do not
    change what a model learns may be given beside it)."""
    given = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name) is not None}
    if not getattr(args, "run", None):
        return resolve(preset=args.preset, file=args.config, overrides=given)
    run = named_run(args, paths)
    learned = sorted(k for k in given if Settings.__dataclass_fields__[k].metadata["learns"])
    if learned or args.preset or args.config:
        shown = ", ".join(k.upper() for k in learned) or "PRESET/CONFIG"
        raise PipelineError(f"RUN={args.run} fixes what its models learn, so {shown} cannot be given "
                            "with it; leave RUN= out to train those settings as a run of their own")
    cfg = resolve(file=run.config, overrides=given)
    if run_id(cfg, data.data_key) != run.id:
        raise PipelineError(_not_this_run(args.run, run, cfg, data, paths))
    return cfg


def named_run(args: argparse.Namespace, paths: Paths) -> RunDir:
    """The trained run RUN= names, with its settings (config.json); else a PipelineError saying what
    the folder is (`make runs` lists every folder, so RUN= names each the way it does)."""
    run = run_dir(paths, args.run)
    if run.is_blend:
        raise PipelineError(f"RUN={args.run} is a blend of other runs, not a trained run: "
                            f"`make {args.stage}` takes a run; `make blend` remakes a blend and "
                            f"`make report RUN={args.run}` draws it")
    if run.config.is_file():
        return run
    if run.path.is_dir() and not run.path.is_symlink():
        raise PipelineError(f"RUN={args.run}: runs/{args.run}/ holds a run stopped before its settings "
                            "were recorded (it has no config.json): rerun the command that started it, "
                            f"which resumes it, or `make forget RUN={args.run}` deletes it")
    raise PipelineError(f"RUN={args.run}: no such run in {paths.runs}; `make runs` lists them")


def _not_this_run(name: str, run: RunDir, cfg: Settings, data: Prepared, paths: Paths) -> str:
    """Why config.json and input/ no longer give RUN='s id: as exactly as its record can tell."""
    config = run.config.relative_to(paths.root)
    record = complete(run)
    if record is not None and record.data == data.data_key:
        edited = [f"{k.upper()}={v} (the run: {record.config.get(k)})" for k, v in cfg.learned().items()
                  if k in record.config and record.config[k] != v]
        return (f"RUN={name}: {config} no longer holds the settings the run was made with "
                f"({', '.join(edited) or 'edited by hand'}); put them back, or `make train "
                f"CONFIG={config}` trains the edited settings as a run of their own")
    why = ("was made from other data than input/*.csv now hold" if record is not None else
           f"is not what {config} and input/*.csv give any more (settings edited, or the data changed)")
    return f"RUN={name} {why}; `make train CONFIG={config}` trains its settings on this data"


def _train(c: Command) -> None:
    load_stage("train").run(c.plan, None if c.args.fold is None else [c.args.fold], force=c.forced("train"))
    print(f"train: done: {c.plan.run.path.relative_to(c.paths.root)}")


def _predict(c: Command) -> RunRecord:
    records = load_stage("train").run(c.plan, force=c.forced("train"))
    return load_stage("predict").run(c.plan, records, force=c.forced("predict"))


def _submit(c: Command) -> None:
    started = time.perf_counter()
    _predict(c)
    print(f"submit: done in {time.perf_counter() - started:.1f}s -> {c.paths.submission_csv} "
          f"(run {c.plan.run.id})")


def _distill(c: Command) -> None:
    if not c.args.teacher and not c.args.run:
        c.args.teacher, said = default_teacher(c.paths)
        print(f"distill: TEACHER={c.args.teacher} ({said}; TEACHER= picks another)")
    _submit(c)


def default_teacher(paths: Paths) -> tuple[str, str]:
    """The latest run or blend, else (forgotten, unfinished or damaged) the newest complete one, with
    the words that say which; a PipelineError when there is none."""
    name = latest(paths)
    try:
        if name is not None and run_dir(paths, name).completed() is not None:
            return name, "the latest run or blend"
        why = "runs/latest names none" if name is None else f"runs/latest names {name}, not a complete run"
    except PipelineError:
        why = f"runs/latest names {name}, whose record is damaged"
    if (found := newest(paths)) is None:
        raise PipelineError("distill learns from a teacher's test predictions: make a run or a "
                            "blend first (`make submit`, `make blend`), or name one with TEACHER=")
    return found.id, f"the newest complete run or blend: {why}"


def _blend(c: Command) -> None:
    names = [check_name(n, "RUNS") for n in (c.args.runs or "").split()] or None
    load_stage("blend").run(c.paths, c.data, c.fold_of, c.cfg.fold_seed, names, mean=c.args.mean,
                       force=c.args.force, make_first=lambda: _predict(c))


def _report(c: Command) -> None:
    report = load_stage("report")
    if c.args.study:
        report.draw_study(c.paths, c.args.study, c.args.storage)
        return
    report.run(c.paths, report.pick(c.paths, c.args.run))


def _tune(c: Command) -> None:
    from pipeline.stages import predict, train, tune
    from pipeline.tuning.study import Job, Stages

    args = c.args
    job = Job(c.paths.root, c.cfg, Stages(train.run, predict.run), args.study, args.trials,
              args.storage, workers=args.workers, tune_folds=args.tune_folds, pruner=args.pruner)
    tune.run(job, c.paths, c.data, c.fold_of, space=args.space)


def _tune_status(c: Command) -> None:
    from pipeline.tuning.study import status

    print(status(c.paths, c.args.study, c.args.storage))
    if not c.args.storage:  # optuna-dashboard takes the journal file as it is (pip install optuna-dashboard)
        print(f"in a browser: optuna-dashboard {studies_dir(c.paths) / c.args.study / 'journal.log'}")


def _forget(c: Command) -> None:
    if not c.args.run:
        raise PipelineError("forget needs the run to delete: `make forget RUN=<id>` (`make runs` lists them)")
    load_stage("runs").forget(c.paths, c.args.run)


# -- the parser -----------------------------------------------------------------------------------

def add_settings(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("settings (defaults < --preset < --config < options)")
    for field in fields(Settings):
        default, meta = field.default, field.metadata
        kind: dict[str, Any] = {"type": type(default), "choices": meta["choices"]}
        if isinstance(default, bool):
            kind = {"action": argparse.BooleanOptionalAction}
        group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=None,
                           help=f"{meta['help']} (default: {default})", **kind)
    return group


def add_option(parser: Any, option: Option, stage: str) -> None:
    """An option as pipeline/options.py declares it, with the stage's own words if it has some."""
    text = (option.stages.get(stage) or option.help).replace("%", "%%")  # argparse formats help with %
    default = option.default_in(stage)
    if option.flag:
        parser.add_argument(option.flag_name, action="store_true", help=text)
        return
    shown = f" (default: {shown_value(default)})" if default not in (None, "") and "default" not in text \
        else ""
    parser.add_argument(option.flag_name, dest=option.name, type=option.type, default=default,
                        choices=option.choices, help=text + shown)


# What each stage does, in the order `python -m pipeline --help` lists them.
STAGES: dict[str, tuple[Any, str]] = {
    "download": (Command.download, "put train.csv and test.csv into input/"),
    "prepare": (lambda c: c.data, "validate the CSVs and cache them as uint8 arrays"),
    "folds": (lambda c: c.fold_of, "write the stratified folds (input/folds.csv)"),
    "train": (_train, "train the run of these settings (runs/<id>/); resumes"),
    "predict": (_predict, "the run's test predictions and submission (trains what is missing)"),
    "submit": (_submit, "every stage in order, each skipped when current"),
    "distill": (_distill, "submit a run that also learns from the test rows, labelled by a teacher "
                "run or blend (TEACHER=, the latest by default)"),
    "blend": (_blend, "blend completed runs on their out-of-fold predictions"),
    "report": (_report, "draw a run (or a study) into reports/ (the latest run by default)"),
    "tune": (_tune, "search settings with Optuna; every trial is a run"),
    "tune-status": (_tune_status, "a study's trials so far and the best five"),
    "runs": (lambda c: load_stage("runs").run(c.paths, sort=c.args.sort, fmt=c.args.format),
             "every run side by side"),
    "forget": (_forget, "delete one run's folder"),
    "upload": (lambda c: load_stage("upload").run(c.paths, message=c.args.message, timeout=c.args.timeout,
                                             wait=c.args.wait),
               "send submissions/submission.csv to the competition"),
    "lb": (lambda c: load_stage("upload").leaderboard(c.paths, timeout=c.args.timeout, fmt=c.args.format),
           "the competition's submissions: date, description, status, public score and the run that "
           "made each"),
    "kaggle-run": (lambda c: load_stage("kaggle-run").run(c.plan_of(), accelerator=c.args.accelerator,
                                                     deadline=c.args.deadline, timeout=c.args.timeout,
                                                     keep=c.args.keep),
                   "train the run of these settings on a Kaggle GPU and bring it home into runs/<id>/"),
    "quota": (lambda c: load_stage("kaggle-run").quota(timeout=c.args.timeout),
              "Kaggle's GPU hours: used, allowed, left and when they refresh"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="python -m pipeline",
                                     description="Kaggle Digit Recognizer with recurrent networks.")
    parser.add_argument("--make", metavar="NAMES",
                        help="also read the options NAMES lists (upper-case, separated by spaces) from "
                        f"the variables {MAKE_PREFIX}<NAME> (as `make` passes its command line)")
    for option in for_stage(EVERY):
        add_option(parser, option, EVERY)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    stages: dict[str, argparse.ArgumentParser] = {}
    for name, (handler, text) in STAGES.items():
        p = stages[name] = sub.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler, force=False)
        group = add_settings(p) if name in SETTINGS_STAGES else p
        for option in for_stage(name):
            add_option(group if option.name in ("config", "preset") else p, option, name)
    return parser, stages


MAKE_PREFIX = "DIGITS_OPT_"  # the variables the Makefile sets for the options on its command line


def from_make(parser: argparse.ArgumentParser, names: list[str], env: dict[str, str]) -> list[str]:
    """The options of a stage given on make's command line (names), as command-line words. An
    option the stage does not take, or given empty, is left out."""
    words: list[str] = []
    for action in parser._actions:
        flag = next((s for s in action.option_strings if s.startswith("--")), None)
        name = action.dest.upper()
        value = env.get(MAKE_PREFIX + name, "").strip() if name in names else ""
        if flag is None or value == "":
            continue
        if action.nargs == 0:  # store_true, or --x/--no-x (BooleanOptionalAction)
            if value.lower() not in TRUE + FALSE:
                raise PipelineError(f"{name}={value!r}: must be 1 or 0")
            if value.lower() in TRUE:
                words.append(flag)
            elif isinstance(action, argparse.BooleanOptionalAction):
                words.append("--no-" + flag[2:])
        else:
            words.append(f"{flag}={value}")  # one word: a value may start with '-'
    return words


def parse(argv: list[str]) -> argparse.Namespace:
    parser, stages = build_parser()
    args = parser.parse_args(argv)
    if args.make is not None:
        names = args.make.split()
        at = argv.index(args.stage)
        top = from_make(parser, names, dict(os.environ))  # NOWAIT: an option of every command
        extra = from_make(stages[args.stage], names, dict(os.environ))
        args = parser.parse_args([*argv[:at], *top, argv[at], *extra, *argv[at + 1:]])
    return args


@contextlib.contextmanager
def library_warnings(verbose: bool) -> Iterator[None]:
    """The libraries' warnings (Optuna's, PyTorch's, pandas') speak of code a user does not call:
    hidden unless VERBOSE=1, in the processes a stage starts too (through PYTHONWARNINGS); a
    PYTHONWARNINGS the user set rules."""
    if os.environ.get("PYTHONWARNINGS"):
        yield
        return
    action: Literal["default", "ignore"] = "default" if verbose else "ignore"
    os.environ["PYTHONWARNINGS"] = action
    try:
        with warnings.catch_warnings(action=action):
            yield
    finally:
        os.environ.pop("PYTHONWARNINGS", None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = ""
    try:
        args = parse(argv)
        stage = args.stage
        paths = Paths(args.root.resolve(), also_submit=notebook.working())
        # Commands that write hold the project, one at a time (see lock.py); the others only read.
        lock = project_lock(paths, f"make {stage}", args.nowait) if stage in WRITERS else None
        with library_warnings(getattr(args, "verbose", False)), lock or contextlib.nullcontext():
            args.handler(Command(args, paths))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"\ninterrupted {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        # What Ctrl-C leaves behind: kaggle-run brings nothing home; every other command resumes.
        said = "nothing was brought home; rerun the same command to push the run again" \
            if stage == "kaggle-run" else "rerun the same command to resume where it stopped"
        print(f"\ninterrupted: {said}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
