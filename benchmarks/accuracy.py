"""Cross-validated accuracy of several recipes on the same data and folds, and of their blend.

    python benchmarks/accuracy.py [--train PATH] [--test PATH] [--folds 5]
                                  [--variants tutorial,default,gru] [--blend] [--project DIR]
                                  [--screen [--screen-epochs N]]

Every variant is a run of the pipeline in one scratch project (prepare, folds, train, predict), so
all share the same train.csv and the same folds, and --blend then blends them (`make blend`) with
both averaging rules. The table shows each run's out-of-fold accuracy, error rate, minutes and error
reduction against the tutorial's recipe. With --test PATH (the competition's test.csv) each run
predicts it and its submission is kept in the project's submissions/ (to be scored elsewhere);
without it the test.csv is the first rows of train.csv without labels: it only times prediction and
never feeds back into any score. With --project DIR the project is kept, and a second call reuses
every finished run (runs are cached by their settings).

--screen trains only the first fold of each variant (optionally with a shorter schedule,
--screen-epochs) and reports that fold's held-out accuracy: a cheap ranking of recipes on a 2-core
machine before the finalists are confirmed on every fold (the default mode).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import main as pipeline
from pipeline.config import ROOT, TRUE, Paths, resolve
from pipeline.store.data import load_prepared
from pipeline.store.run import RunRecord, latest, run_dir, run_id

DEFAULT_TRAIN = ROOT.parent / "shared" / "data" / "mnist-real" / "train.csv"
VARIANTS = {
    "tutorial": {"preset": "tutorial"},
    "default": {},
    "gru": {"model": "gru"},
    # How the network reads the digit (screen them with --screen --screen-epochs 12):
    "last1": {"readout": "last", "rows_per_step": 1},  # one row a step, last states: the default before
    "both": {"view": "both"},  # a row sweep and a column sweep in one model
    "relu": {"nonlinearity": "relu"},
    "best": {"preset": "best"},
}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'default' or 'name:key=value+key=value' (a named variant with overrides)."""
    name, _, rest = text.partition(":")
    base = dict(VARIANTS.get(name, {}))
    for item in filter(None, rest.split("+")):
        key, _, value = item.partition("=")
        base[key] = value
    return name + (f"[{rest}]" if rest else ""), base


def cli(paths: Paths, quiet: bool, *args: str) -> None:
    out = io.StringIO() if quiet else sys.stdout
    with contextlib.redirect_stdout(out):
        code = pipeline(["--root", str(paths.root), *args])
    if code != 0:
        raise SystemExit(f"bench-accuracy: `{' '.join(args)}` failed:\n{out.getvalue()[-2000:]}")


def record(paths: Paths) -> RunRecord:
    return run_dir(paths, str(latest(paths))).read()


def screen_variant(paths: Paths, settings: dict[str, str], folds_n: int, quiet: bool) -> dict[str, object]:
    """Only fold 0 of the variant: its held-out accuracy and training time."""
    options = [option(k, str(v)) for k, v in settings.items()]
    cli(paths, quiet, "train", f"--folds={folds_n}", "--fold=0", *options)
    given = {k: v for k, v in settings.items() if k != "preset"}
    cfg = resolve(preset=settings.get("preset"), overrides={**given, "folds": folds_n})
    name = run_id(cfg, load_prepared(paths).data_key)
    fold = run_dir(paths, name).fold(0)
    return {"oof_acc": fold.valid_acc, "error": 1 - fold.valid_acc, "minutes": fold.seconds / 60,
            "best_epoch": fold.best_epoch, "run": name}


def run_variant(paths: Paths, settings: dict[str, str], folds_n: int, quiet: bool) -> dict[str, object]:
    options = [option(k, str(v)) for k, v in settings.items()]
    cli(paths, quiet, "predict", f"--folds={folds_n}", *options)
    made = record(paths)
    # The run's own training and prediction time: a run kept from an earlier call is not retrained.
    result: dict[str, object] = {"oof_acc": made.oof_acc, "error": 1 - made.oof_acc,
                                 "minutes": made.seconds / 60, "run": latest(paths)}
    if made.oof_acc_tta is not None:  # a TTA=n variant: the held-out accuracy with TTA too
        result["oof_acc_tta"] = made.oof_acc_tta
    return result


BOOLEAN = {"bidirectional", "augment", "normalize", "orthogonal_init", "drop_last", "amp", "cuda_graph"}


def option(key: str, value: str) -> str:
    flag = "--" + key.replace("_", "-")
    if key in BOOLEAN:
        return flag if value.lower() in TRUE else "--no-" + flag[2:]
    return f"{flag}={value}"


def stage_data(train_csv: Path, folder: Path, test_rows: int, test_csv: Path | None = None) -> Path:
    staging = folder / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    for name, source in (("train.csv", train_csv), ("test.csv", test_csv)):
        if source is not None and not (staging / name).exists():
            (staging / name).symlink_to(source.resolve())
    if test_csv is None:
        pd.read_csv(train_csv, nrows=test_rows).drop(columns="label").to_csv(staging / "test.csv",
                                                                              index=False)
    return staging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=DEFAULT_TRAIN,
                        help=f"a labelled train.csv (default: {DEFAULT_TRAIN})")
    parser.add_argument("--test", type=Path, help="the competition's test.csv: each run predicts it "
                        "and keeps its submission (default: the first --test-rows of train.csv)")
    parser.add_argument("--screen", action="store_true",
                        help="train and score only the first fold of each variant (a quick ranking)")
    parser.add_argument("--screen-epochs", type=int,
                        help="with --screen: this many epochs for every variant (a shorter schedule)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--variants", default="tutorial,default,gru",
                        help="comma-separated: tutorial, default, gru, or name:key=value+key=value")
    parser.add_argument("--blend", action="store_true", help="blend the variants' runs at the end")
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--project", type=Path, help="keep the project here (reused when rerun)")
    parser.add_argument("--verbose", action="store_true", help="show every stage's output")
    parser.add_argument("--out", type=Path, help="also write the table as CSV here")
    args = parser.parse_args(argv)
    if not args.train.is_file():
        print(f"bench-accuracy: {args.train} not found. It is the 5,999 real digits kept beside the "
              "project; pass another labelled train.csv with TRAIN=path (make) or --train.",
              file=sys.stderr)
        return 2
    if args.test is not None and not args.test.is_file():
        print(f"bench-accuracy: {args.test} not found (TEST= / --test: an unlabelled test.csv)",
              file=sys.stderr)
        return 2
    if args.screen and args.blend:
        print("bench-accuracy: --blend needs every fold; leave out --screen", file=sys.stderr)
        return 2
    mode = "screening: fold 0 of " if args.screen else ""
    print(f"bench-accuracy: {mode}{args.folds}-fold CV on {args.train}")
    with tempfile.TemporaryDirectory(prefix="digits-bench-") as tmp:
        folder = args.project or Path(tmp)
        paths = Paths(folder / "work")
        staging = stage_data(args.train, folder, args.test_rows, args.test)
        cli(paths, True, "download", "--source", "dir", "--dir", str(staging))
        rows, names = [], []
        for text in args.variants.split(","):
            name, settings = parse_variant(text)
            if args.screen:
                if args.screen_epochs:
                    settings["epochs"] = str(args.screen_epochs)
                result = screen_variant(paths, settings, args.folds, not args.verbose)
            else:
                result = run_variant(paths, settings, args.folds, not args.verbose)
            names.append(str(result.pop("run")))
            rows.append({"variant": name, **result, "_base": text.partition(":")[0]})
            tta = f" (with TTA {result['oof_acc_tta']:.4f})" if "oof_acc_tta" in result else ""
            what = "fold 0 accuracy" if args.screen else "OOF accuracy"
            print(f"  {name:<28} {what} {result['oof_acc']:.4f}{tta}  "
                  f"{result['minutes']:.2f} min  ({names[-1]})", flush=True)
        if args.blend:
            for mean in ("prob", "logprob"):
                started = time.perf_counter()
                cli(paths, not args.verbose, "blend", f"--folds={args.folds}", "--mean", mean,
                    "--runs", " ".join(dict.fromkeys(names)))
                made = record(paths)
                honest = made.accuracy
                rows.append({"variant": f"blend ({mean})", "oof_acc": honest, "error": 1 - honest,
                             "minutes": (time.perf_counter() - started) / 60,
                             "in_sample": made.oof_acc, "weights": json.dumps(made.weights),
                             "_base": "blend"})
                print(f"  blend ({mean}): honest OOF accuracy {honest:.4f}, in-sample "
                      f"{made.oof_acc:.4f}, weights {made.weights}", flush=True)
    table = pd.DataFrame(rows)
    base = table.loc[table.pop("_base") == "tutorial", "error"]
    if len(base):
        table["error_reduction"] = 1 - table["error"] / float(base.iloc[0])
    print()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
