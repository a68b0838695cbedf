"""Cross-validated accuracy of several recipes on the same data and folds, and of their blend.

    python benchmarks/accuracy.py [--train PATH] [--folds 5] [--variants tutorial,default,gru]
                                  [--blend] [--project DIR]

Every variant is a run of the pipeline in one scratch project (prepare, folds, train, predict), so
all share the same train.csv and the same folds, and --blend then blends them (`make blend`) with
both averaging rules. The table shows each run's out-of-fold accuracy, error rate, minutes and error
reduction against the tutorial's recipe. The test.csv it predicts is the first rows of train.csv
without labels: it only times prediction, it never feeds back into any score. With --project DIR the
project is kept, and a second call reuses every finished run (runs are cached by their settings).
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

from pipeline.__main__ import main as pipeline
from pipeline.artifacts import latest
from pipeline.config import ROOT, Paths

DEFAULT_TRAIN = ROOT.parent / "shared" / "data" / "mnist-real" / "train.csv"
VARIANTS = {
    "tutorial": {"preset": "tutorial"},
    "default": {},
    "gru": {"model": "gru"},
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


def record(paths: Paths) -> dict[str, object]:
    name = latest(paths)
    return json.loads((paths.runs / str(name) / "run.json").read_text())


def run_variant(paths: Paths, settings: dict[str, str], folds_n: int, quiet: bool) -> dict[str, object]:
    options = [option(k, str(v)) for k, v in settings.items()]
    cli(paths, quiet, "predict", f"--folds={folds_n}", *options)
    made = record(paths)
    oof = float(made["oof_acc"])
    # The run's own training and prediction time: a run kept from an earlier call is not retrained.
    result: dict[str, object] = {"oof_acc": oof, "error": 1 - oof,
                                 "minutes": float(made["seconds"]) / 60, "run": latest(paths)}
    if made.get("oof_acc_tta") is not None:  # a TTA=n variant: the held-out accuracy with TTA too
        result["oof_acc_tta"] = made["oof_acc_tta"]
    return result


BOOLEAN = {"bidirectional", "augment", "normalize", "orthogonal_init", "drop_last", "amp", "cuda_graph"}


def option(key: str, value: str) -> str:
    flag = "--" + key.replace("_", "-")
    if key in BOOLEAN:
        return flag if value.lower() in ("1", "true", "yes", "on") else "--no-" + flag[2:]
    return f"{flag}={value}"


def stage_data(train_csv: Path, folder: Path, test_rows: int) -> Path:
    staging = folder / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    if not (staging / "train.csv").exists():
        (staging / "train.csv").symlink_to(train_csv.resolve())
    pd.read_csv(train_csv, nrows=test_rows).drop(columns="label").to_csv(staging / "test.csv",
                                                                          index=False)
    return staging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=DEFAULT_TRAIN,
                        help=f"a labelled train.csv (default: {DEFAULT_TRAIN})")
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
    print(f"bench-accuracy: {args.folds}-fold CV on {args.train}")
    with tempfile.TemporaryDirectory(prefix="digits-bench-") as tmp:
        folder = args.project or Path(tmp)
        paths = Paths(folder / "work")
        staging = stage_data(args.train, folder, args.test_rows)
        cli(paths, True, "download", "--source", "dir", "--dir", str(staging))
        rows, names = [], []
        for text in args.variants.split(","):
            name, settings = parse_variant(text)
            result = run_variant(paths, settings, args.folds, not args.verbose)
            names.append(str(result.pop("run")))
            rows.append({"variant": name, **result, "_base": text.partition(":")[0]})
            tta = f" (with TTA {result['oof_acc_tta']:.4f})" if "oof_acc_tta" in result else ""
            print(f"  {name:<28} OOF accuracy {result['oof_acc']:.4f}{tta}  "
                  f"{result['minutes']:.2f} min  ({names[-1]})", flush=True)
        if args.blend:
            for mean in ("prob", "logprob"):
                started = time.perf_counter()
                cli(paths, not args.verbose, "blend", f"--folds={args.folds}", "--mean", mean,
                    "--runs", " ".join(dict.fromkeys(names)))
                made = record(paths)
                honest = float(made["oof_acc_honest"])
                rows.append({"variant": f"blend ({mean})", "oof_acc": honest, "error": 1 - honest,
                             "minutes": (time.perf_counter() - started) / 60,
                             "in_sample": made["oof_acc"], "weights": json.dumps(made["weights"]),
                             "_base": "blend"})
                print(f"  blend ({mean}): honest OOF accuracy {honest:.4f}, in-sample "
                      f"{made['oof_acc']:.4f}, weights {made['weights']}", flush=True)
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
