"""Command line: ``python -m pipeline <stage> [options]``, one subcommand per stage.

Every stage builds what it needs upstream, skipping what is current, as Make users expect:
download -> prepare -> folds -> train -> predict, then blend. The orchestration lives here; the
stages (pipeline/stages/) only share the layers below them (tuning, kaggle, engine, store, options,
config). The options are declared in pipeline/options.py and the settings in pipeline/config.py.
With ``--make NAMES`` (what the Makefile passes), the options NAMES lists, those given on make's
command line, are read from the variables the Makefile sets for them (DIGITS_OPT_<NAME>, holding the
text as typed), so ``make train EPOCHS=5`` is ``--epochs 5``. Nothing else of the environment is
read: a variable a shell exports under an option's name (SEED, MODEL, DEVICE...) changes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import fields
from typing import Any, Literal

from pipeline.config import FALSE, TRUE, Paths, Settings, resolve
from pipeline.errors import Interrupted, PipelineError
from pipeline.kaggle import notebook
from pipeline.options import EVERY, OPTIONS, SETTINGS_STAGES, Option, for_stage
from pipeline.options import shown as shown_value
from pipeline.store import ensemble
from pipeline.store.artifacts import (
    Prepared,
    RunDir,
    check_name,
    latest,
    run_dir,
    run_id,
    studies_dir,
)
from pipeline.store.ensemble import RunRecord, completed

# Commands that write: one at a time per project (see lock.py). `runs` and `report` only read.
WRITERS = ("download", "prepare", "folds", "train", "predict", "submit", "distill", "blend", "forget",
           "tune", "kaggle-run")


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
    if run.blend.is_file():
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
    try:
        record = completed(run)
    except PipelineError:
        record = None
    if record is not None and record.data == data.data_key:
        edited = [f"{k.upper()}={v} (the run: {record.config.get(k)})" for k, v in cfg.learned().items()
                  if k in record.config and record.config[k] != v]
        return (f"RUN={name}: {config} no longer holds the settings the run was made with "
                f"({', '.join(edited) or 'edited by hand'}); put them back, or `make train "
                f"CONFIG={config}` trains the edited settings as a run of their own")
    if record is not None:
        return (f"RUN={name} was made from other data than input/*.csv now hold; `make train "
                f"CONFIG={config}` trains its settings on this data")
    return (f"RUN={name}: {config} and input/*.csv no longer give this run's id: its settings were "
            f"edited, or the data changed since; `make train CONFIG={config}` trains those settings "
            "on this data as a run of their own")


def build_data(args: argparse.Namespace, paths: Paths) -> Prepared:
    from pipeline.stages import download, prepare

    download.run(paths, source=args.source, src_dir=args.dir, timeout=args.timeout,
                 force=args.force and args.stage in ("download", "submit"))
    return prepare.run(paths, force=args.force and args.stage == "prepare")


def build_run(args: argparse.Namespace, paths: Paths) -> tuple[Settings, RunDir, Prepared, Any, list]:
    """Data, folds and a trained run (each skipped when current)."""
    from pipeline.stages import distill, folds, train

    if getattr(args, "run", None):
        named_run(args, paths)  # before any data is made for it

    data = build_data(args, paths)
    cfg = settings(args, paths, data)
    fold_of = folds.run(cfg, paths, data)
    run = run_dir(paths, run_id(cfg, data.data_key))
    fold = getattr(args, "fold", None)
    pseudo = distill.pseudo_rows(paths, cfg, data, student=run) if cfg.teacher else None
    records = train.run(cfg, paths, run, data, fold_of, folds=None if fold is None else [fold],
                        force=args.force and args.stage == "train", pseudo=pseudo)
    return cfg, run, data, fold_of, records


def build_prediction(args: argparse.Namespace, paths: Paths) -> tuple[RunDir, RunRecord]:
    from pipeline.stages import predict

    cfg, run, data, fold_of, records = build_run(args, paths)
    return run, predict.run(cfg, paths, run, data, fold_of, records,
                            force=args.force and args.stage == "predict")


def _download(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.stages import download

    download.run(paths, source=args.source, src_dir=args.dir, force=args.force, timeout=args.timeout)


def _prepare(args: argparse.Namespace, paths: Paths) -> None:
    build_data(args, paths)


def _folds(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.stages import folds

    data = build_data(args, paths)
    folds.run(settings(args, paths, data), paths, data)


def _train(args: argparse.Namespace, paths: Paths) -> None:
    _, run, *_ = build_run(args, paths)
    print(f"train: done: {run.path.relative_to(paths.root)}")


def _predict(args: argparse.Namespace, paths: Paths) -> None:
    build_prediction(args, paths)


def _submit(args: argparse.Namespace, paths: Paths) -> None:
    started = time.perf_counter()
    run, _ = build_prediction(args, paths)
    print(f"submit: done in {time.perf_counter() - started:.1f}s -> {paths.submission_csv} "
          f"(run {run.id})")


def _distill(args: argparse.Namespace, paths: Paths) -> None:
    if not args.teacher and not args.run:
        args.teacher, said = default_teacher(paths)
        print(f"distill: TEACHER={args.teacher} ({said}; TEACHER= picks another)")
    _submit(args, paths)


def default_teacher(paths: Paths) -> tuple[str, str]:
    """The latest run or blend, else (forgotten, unfinished or damaged) the newest complete one, with
    the words that say which; a PipelineError when there is none."""
    name = latest(paths)
    try:
        if name is not None and completed(run_dir(paths, name)) is not None:
            return name, "the latest run or blend"
        why = "runs/latest names none" if name is None else f"runs/latest names {name}, not a complete run"
    except PipelineError:
        why = f"runs/latest names {name}, whose record is damaged"
    newest = ensemble.newest(paths)
    if newest is None:
        raise PipelineError("distill learns from a teacher's test predictions: make a run or a "
                            "blend first (`make submit`, `make blend`), or name one with TEACHER=")
    return newest.id, f"the newest complete run or blend: {why}"


def _blend(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.stages import blend, folds

    names = [check_name(n, "RUNS") for n in (args.runs or "").split()] or None
    data = build_data(args, paths)
    cfg = settings(args, paths, data)
    fold_of = folds.run(cfg, paths, data)
    blend.run(paths, data, fold_of, cfg.folds, cfg.fold_seed, names, mean=args.mean,
              force=args.force, make_first=lambda: build_prediction(args, paths))


def _report(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.stages import report

    if args.study:
        report.draw_study(paths, args.study, args.storage)
        return
    report.run(paths, report.pick(paths, args.run))


def _tune(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.stages import folds, predict, train, tune
    from pipeline.tuning.trial import Stages

    data = build_data(args, paths)
    cfg = settings(args, paths, data)
    fold_of = folds.run(cfg, paths, data)
    tune.run(paths, cfg, data, fold_of, Stages(train.run, predict.run), study=args.study,
             trials=args.trials, workers=args.workers, url=args.storage, space_path=args.space,
             tune_folds=args.tune_folds, pruner=args.pruner)


def _tune_status(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.tuning.study import status

    print(status(paths, args.study, args.storage))
    journal = studies_dir(paths) / args.study / "journal.log"
    if not args.storage:  # optuna-dashboard takes the journal file as it is (pip install optuna-dashboard)
        print(f"in a browser: optuna-dashboard {journal}")


def _runs(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.stages import runs

    runs.run(paths, sort=args.sort, fmt=args.format)


def _forget(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.stages import runs

    if not args.run:
        raise PipelineError("forget needs the run to delete: `make forget RUN=<id>` (`make runs` "
                            "lists them)")
    runs.forget(paths, args.run)


def _upload(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.stages import upload

    upload.run(paths, message=args.message, timeout=args.timeout, wait=args.wait)


def _kaggle_run(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.stages import folds, kaggle_run

    data = build_data(args, paths)
    cfg = settings(args, paths, data)
    fold_of = folds.run(cfg, paths, data)
    kaggle_run.run(cfg, paths, data, fold_of, accelerator=args.accelerator, deadline=args.deadline,
                   timeout=args.timeout, keep=args.keep)


def _quota(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.stages import kaggle_run

    kaggle_run.quota(timeout=args.timeout)


def _lb(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline.stages import upload

    upload.leaderboard(paths, timeout=args.timeout, fmt=args.format)


# -- the parser -----------------------------------------------------------------------------------

def add_settings(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("settings (defaults < --preset < --config < options)")
    for field in fields(Settings):
        default, meta = field.default, field.metadata
        flag = "--" + field.name.replace("_", "-")
        text = f"{meta['help']} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
        else:
            group.add_argument(flag, dest=field.name, type=type(default), default=None,
                               choices=meta["choices"], help=text)
    return group


def add_option(parser: Any, option: Option, stage: str) -> None:
    """An option as pipeline/options.py declares it, with the stage's own words if it has some."""
    text = option.stages.get(stage) or option.help
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
    "download": (_download, "put train.csv and test.csv into input/"),
    "prepare": (_prepare, "validate the CSVs and cache them as uint8 arrays"),
    "folds": (_folds, "write the stratified folds (input/folds.csv)"),
    "train": (_train, "train the run of these settings (runs/<id>/); resumes"),
    "predict": (_predict, "the run's test predictions and submission (trains what is missing)"),
    "submit": (_submit, "every stage in order, each skipped when current"),
    "distill": (_distill, "submit a run that also learns from the test rows, labelled by a teacher "
                "run or blend (TEACHER=, the latest by default)"),
    "blend": (_blend, "blend completed runs on their out-of-fold predictions"),
    "report": (_report, "draw a run (or a study) into reports/ (the latest run by default)"),
    "tune": (_tune, "search settings with Optuna; every trial is a run"),
    "tune-status": (_tune_status, "a study's trials so far and the best five"),
    "runs": (_runs, "every run side by side"),
    "forget": (_forget, "delete one run's folder"),
    "upload": (_upload, "send submissions/submission.csv to the competition"),
    "lb": (_lb, "the competition's submissions: date, description, status, public score and the "
           "run that made each"),
    "kaggle-run": (_kaggle_run, "train the run of these settings on a Kaggle GPU and bring it home "
                   "into runs/<id>/"),
    "quota": (_quota, "Kaggle's GPU hours: used, allowed, left and when they refresh"),
}
# What Ctrl-C leaves behind, when it is not "resume where it stopped".
INTERRUPTED = {"kaggle-run": "interrupted: nothing was brought home; rerun the same command to push "
                             "the run again"}


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
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler, force=False)
        group = add_settings(p) if name in SETTINGS_STAGES else p
        for option in for_stage(name):
            add_option(group if option.name in ("config", "preset") else p, option, name)
        stages[name] = p
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
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
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


def _locked(paths: Paths, args: argparse.Namespace) -> Any:
    from pipeline.store.lock import project_lock

    return project_lock(paths, f"make {args.stage}", nowait=args.nowait)


@contextlib.contextmanager
def library_warnings(verbose: bool) -> Iterator[None]:
    """The warnings of the libraries underneath (Optuna's ExperimentalWarning, PyTorch's, pandas')
    speak of code a user does not call, so they are hidden unless VERBOSE=1; the processes a stage
    starts (fold and trial workers) inherit the choice through PYTHONWARNINGS. A PYTHONWARNINGS the
    user set is left to rule."""
    before = os.environ.get("PYTHONWARNINGS")
    if before:
        yield
        return
    action: Literal["default", "ignore"] = "default" if verbose else "ignore"
    os.environ["PYTHONWARNINGS"] = action
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(action)
            yield
    finally:
        if before is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = before


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = ""
    try:
        args = parse(argv)
        stage = args.stage
        paths = Paths(args.root.resolve(), also_submit=notebook.working())
        with library_warnings(getattr(args, "verbose", False)):
            if args.stage in WRITERS:
                with _locked(paths, args):
                    args.handler(args, paths)
            else:
                args.handler(args, paths)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"\ninterrupted {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\n" + INTERRUPTED.get(stage, "interrupted: rerun the same command to resume where it "
                                     "stopped"), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
