"""Cross-validated accuracy of the tutorial's recipe, the default vanilla RNN and the GRU, in one run.

    python benchmarks/accuracy.py [--train PATH] [--folds 5] [--variants tutorial,default,gru]

Each variant runs the whole pipeline (prepare, folds, train, predict) in a scratch folder on the same
train.csv and the same folds, and the table shows its out-of-fold accuracy, error rate, minutes and
error reduction against the tutorial's recipe. The test.csv it predicts is the first rows of train.csv
without labels: it only times prediction, it never feeds back into any score.
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

from pipeline import download, folds, predict, prepare, train
from pipeline.config import ROOT, Paths, resolve

DEFAULT_TRAIN = ROOT.parent / "shared" / "data" / "mnist-real" / "train.csv"
VARIANTS = {
    "tutorial": {"preset": "tutorial"},
    "default": {},
    "gru": {"model": "gru"},
}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'default' or 'name:key=value,key=value' (a named variant with overrides)."""
    name, _, rest = text.partition(":")
    base = dict(VARIANTS.get(name, {}))
    for item in filter(None, rest.split("+")):
        key, _, value = item.partition("=")
        base[key] = value
    return name + (f"[{rest}]" if rest else ""), base


def run_variant(train_csv: Path, settings: dict[str, str], folds_n: int, test_rows: int,
                quiet: bool) -> dict[str, float]:
    settings = dict(settings)
    preset = settings.pop("preset", None)
    cfg = resolve(preset=preset, overrides={"folds": folds_n, **settings})
    with tempfile.TemporaryDirectory(prefix="digits-bench-") as tmp:
        staging = Path(tmp) / "staging"
        staging.mkdir()
        (staging / "train.csv").symlink_to(train_csv.resolve())
        test = pd.read_csv(train_csv, nrows=test_rows).drop(columns="label")
        test.to_csv(staging / "test.csv", index=False)
        paths = Paths(Path(tmp) / "work")
        out = io.StringIO() if quiet else sys.stdout
        started = time.perf_counter()
        with contextlib.redirect_stdout(out):
            download.run(paths, source="dir", src_dir=staging)
            prepare.run(paths)
            folds.run(cfg, paths)
            train.run(cfg, paths)
            predict.run(cfg, paths)
        minutes = (time.perf_counter() - started) / 60
        cv = pd.read_csv(paths.logs / "cv.csv")
        with_tta = json.loads((paths.preds / "ensemble.json").read_text()).get("oof_acc_tta")
    oof = float(cv.loc[cv["fold"].astype(str) == "all", "valid_acc"].iloc[0])
    result = {"oof_acc": oof, "error": 1 - oof, "minutes": minutes}
    if with_tta is not None:  # a TTA=n variant: the held-out accuracy with the same passes too
        result["oof_acc_tta"] = with_tta
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=DEFAULT_TRAIN,
                        help=f"a labelled train.csv (default: {DEFAULT_TRAIN})")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--variants", default="tutorial,default,gru",
                        help="comma-separated: tutorial, default, gru, or name:key=value+key=value")
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--verbose", action="store_true", help="show every stage's output")
    parser.add_argument("--out", type=Path, help="also write the table as CSV here")
    args = parser.parse_args(argv)
    if not args.train.is_file():
        print(f"bench-accuracy: {args.train} not found. It is the 5,999 real digits kept beside the "
              "project; pass another labelled train.csv with TRAIN=path (make) or --train.",
              file=sys.stderr)
        return 2
    print(f"bench-accuracy: {args.folds}-fold CV on {args.train}")
    rows = []
    for text in args.variants.split(","):
        name, settings = parse_variant(text)
        result = run_variant(args.train, settings, args.folds, args.test_rows, not args.verbose)
        rows.append({"variant": name, **result, "_base": text.partition(":")[0]})
        tta = f" (with TTA {result['oof_acc_tta']:.4f})" if "oof_acc_tta" in result else ""
        print(f"  {name:<28} OOF accuracy {result['oof_acc']:.4f}{tta}  {result['minutes']:.2f} min",
              flush=True)
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
