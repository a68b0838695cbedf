"""Command line: ``python -m pipeline <stage> [options]``, one subcommand per stage."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from pipeline.config import CHOICES, PRESETS, ROOT, Paths, TrainConfig, resolve
from pipeline.download import SOURCES
from pipeline.errors import PipelineError


def _field_help() -> dict[str, str]:
    """Each config field's help: its comment in config.py, so the two never drift apart."""
    import inspect

    from pipeline import config

    helps = {}
    for line in inspect.getsource(config.TrainConfig).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and "#" in rest and name.isidentifier():
            helps[name] = rest.split("#", 1)[1].strip()
    return helps


def add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training config (defaults < --preset < --config < options)")
    group.add_argument("--config", type=Path, help="TOML or JSON file of config fields "
                       "(logs/config.json of a past run works)")
    group.add_argument("--preset", choices=tuple(PRESETS),
                       help="a named recipe; 'tutorial' reproduces the tutorial's settings")
    helps = _field_help()
    for field in fields(TrainConfig):
        default = field.default
        flag = "--" + field.name.replace("_", "-")
        text = f"{helps.get(field.name, '')} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
        else:
            group.add_argument(flag, dest=field.name, type=type(default), default=None,
                               choices=CHOICES.get(field.name), help=text)


def config_from(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    return resolve(preset=args.preset, file=args.config, overrides=overrides)


def _download(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline import download

    download.run(paths, source=args.source, src_dir=args.dir, force=args.force,
                 timeout=args.timeout)


def _prepare(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline import prepare

    prepare.run(paths, force=args.force)


def _folds(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline import folds

    folds.run(config_from(args), paths)


def _train(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline import train

    train.run(config_from(args), paths, fold=args.fold, force=args.force)


def _predict(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline import predict

    predict.run(config_from(args), paths, force=args.force)


def _submit(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline import download, folds, predict, prepare, train

    cfg = config_from(args)
    started = time.perf_counter()
    download.run(paths, source=args.source, src_dir=args.dir, force=args.force, timeout=args.timeout)
    prepare.run(paths)
    folds.run(cfg, paths)
    train.run(cfg, paths)
    predict.run(cfg, paths)
    print(f"submit: done in {time.perf_counter() - started:.1f}s -> {paths.submission_csv}")


def _upload(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline import upload

    upload.run(paths, message=args.message, timeout=args.timeout)


def _report(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline import report

    report.run(paths)


def _runs(args: argparse.Namespace, paths: Paths) -> None:
    from pipeline import runs

    runs.run(paths)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline",
                                     description="Kaggle Digit Recognizer with recurrent networks.")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="project folder holding input/, models/, logs/... (default: this repo)")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")

    def stage(name: str, handler: Any, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    def source_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source", default="auto", choices=SOURCES,
                       help="where the CSVs come from (default: auto)")
        p.add_argument("--dir", type=Path, help="folder holding train.csv and test.csv "
                       "(with --source dir)")
        p.add_argument("--timeout", type=float, default=300.0,
                       help="seconds to wait for Kaggle before giving up (default: 300)")

    p = stage("download", _download, "put train.csv and test.csv into input/")
    source_options(p)
    p.add_argument("--force", action="store_true", help="fetch again even if the files exist")
    p = stage("prepare", _prepare, "validate the CSVs and cache them as uint8 arrays")
    p.add_argument("--force", action="store_true", help="rebuild the cache even if current")
    add_config_options(stage("folds", _folds, "write the stratified folds (input/folds.csv)"))
    p = stage("train", _train, "train one model per fold (resumes an interrupted run)")
    p.add_argument("--fold", type=int, help="train only this fold (0-based)")
    p.add_argument("--force", action="store_true", help="train from scratch even if up to date")
    add_config_options(p)
    p = stage("predict", _predict, "ensemble the fold models into submissions/submission.csv")
    p.add_argument("--force", action="store_true", help="predict again even if current")
    add_config_options(p)
    p = stage("submit", _submit, "every stage in order, each skipped when its output is current")
    source_options(p)
    p.add_argument("--force", action="store_true", help="download the CSVs again even if present")
    add_config_options(p)
    p = stage("upload", _upload, "send submissions/submission.csv to the competition")
    p.add_argument("--message", default=os.environ.get("MESSAGE", ""),
                   help="the submission's description on Kaggle (default: $MESSAGE, as `make upload` sets)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for Kaggle before giving up (default: 300)")
    stage("report", _report, "draw the latest run into reports/index.html (curves, confusion matrix, "
          "mistakes)")
    stage("runs", _runs, "list every finished run, newest first (submissions/runs.jsonl)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args, Paths(args.root.resolve()))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
