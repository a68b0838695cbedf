"""Speed of every stage beside its baseline, in one run, on seeded synthetic data of the full shape.

    python benchmarks/speed.py [--device auto] [--rows N] [--repeats 3] [--e2e] [--out DIR]

1. the raw bound: nn.RNN forward+backward+optimizer step on resident float tensors (and forward
   alone for inference), at the pipeline's default hidden and batch sizes;
2. the tutorial's loop: a DataLoader over a float TensorDataset, batch 64, hidden 150;
3. the pipeline's training loop at its defaults (augmentation on) and at the tutorial's settings;
   on CUDA the defaults replay each step from a CUDA graph, so the loop also runs without one;
4. inference of a 5-fold ensemble over the test rows, against 5 raw forward passes;
5. prepare: parsing both CSVs written at full size, and reloading the prepared cache;
6. with --e2e: the whole `submit` on the full-size data (defaults, or the options given).
Each figure is the median of --repeats runs; the ratios compare figures taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ROOT, Paths, Settings, resolve
from pipeline.engine.checkpoint import FoldState
from pipeline.engine.models import build_model
from pipeline.engine.runtime import describe, predict_log_proba, resolve_device
from pipeline.engine.step import TrainStep
from pipeline.stages import prepare, train
from pipeline.store.data import load_prepared

N_TRAIN, N_TEST = 42_000, 28_000
RAW = "raw bound: nn.RNN step, resident tensors"
TUTORIAL = "tutorial loop (DataLoader, batch 64, h150)"
OURS = "pipeline loop, defaults (augmentation on)"
OURS_TUTORIAL = "pipeline loop, tutorial settings"
OURS_EAGER = "pipeline loop, defaults without CUDA graph"
RAW_FORWARD, ENSEMBLE = "raw forward bound x5", "pipeline ensemble of 5 folds"


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images with about a fifth of the pixels inked, like MNIST, and random labels."""
    rng = np.random.default_rng(seed)
    inked = rng.random((n, 28, 28), dtype=np.float32) < 0.19
    images = np.where(inked, rng.integers(1, 256, (n, 28, 28), dtype=np.uint8), np.uint8(0))
    return images, rng.integers(0, 10, n, dtype=np.uint8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocations, cuDNN plans, lazy initialisation
    sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# -- baselines ------------------------------------------------------------------------------------

class TutorialRNN(nn.Module):
    """The tutorial's model, with only its hidden state moved to the input's device so it runs."""

    def __init__(self, hidden: int = 150) -> None:
        super().__init__()
        self.hidden_size = hidden
        self.basic_rnn = nn.RNN(28, hidden)
        self.FC = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(1, 0, 2)
        hidden = torch.zeros(1, x.size(1), self.hidden_size, device=x.device)
        _, hidden = self.basic_rnn(x, hidden)
        return self.FC(hidden).view(-1, 10)


def tutorial_loop(images: np.ndarray, labels: np.ndarray, device: torch.device,
                  rows: int) -> Callable[[], None]:
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.from_numpy(images[:rows]).float() / 255,
                         torch.from_numpy(labels[:rows].astype(np.int64)))
    loader = DataLoader(data, batch_size=64, shuffle=True, drop_last=True)
    model = TutorialRNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()

    def epoch() -> None:
        model.train()
        running_loss = running_acc = 0.0
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            outputs = model(inputs.view(-1, 28, 28))
            loss = criterion(outputs, targets)
            loss.backward()
            optimizer.step()
            running_loss += loss.detach().item()
            running_acc += (outputs.argmax(1) == targets).float().mean().item()
    return epoch


def raw_step_loop(cfg: Settings, device: torch.device, rows: int) -> Callable[[], None]:
    """nn.RNN + Linear, forward, backward and AdamW on one resident float batch: no data work."""
    rnn = nn.RNN(28, cfg.hidden, batch_first=True).to(device)
    head = nn.Linear(cfg.hidden, 10).to(device)
    params = [*rnn.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda")
    x = torch.randn(cfg.batch, 28, 28, device=device)
    y = torch.randint(0, 10, (cfg.batch,), device=device)
    steps = rows // cfg.batch

    def epoch() -> None:
        for _ in range(steps):
            _, h = rnn(x)
            loss = nn.functional.cross_entropy(head(h[-1]), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return epoch


def pipeline_loop(cfg: Settings, images: torch.Tensor, labels: torch.Tensor,
                  rows: int) -> Callable[[], None]:
    device = images.device
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    optimizer = train.make_optimizer(cfg, model)
    steps = train.steps_per_epoch(cfg, rows)
    scheduler = train.make_scheduler(replace(cfg, epochs=1000), optimizer, steps)
    subset = torch.arange(rows, device=device)
    step = TrainStep(model, optimizer, scheduler, cfg, device)
    state = FoldState(step, torch.Generator(device=device).manual_seed(0))

    def epoch() -> None:
        train.train_epoch(state, images, labels, subset, cfg)
    epoch.step = step  # type: ignore[attr-defined]
    return epoch


def raw_forward(cfg: Settings, device: torch.device, n: int, models: int) -> Callable[[], None]:
    rnns = [nn.RNN(28, cfg.hidden, batch_first=True).to(device).eval() for _ in range(models)]
    heads = [nn.Linear(cfg.hidden, 10).to(device).eval() for _ in range(models)]
    x = torch.randn(n, 28, 28, device=device)

    @torch.no_grad()
    def run() -> None:
        for rnn, head in zip(rnns, heads, strict=True):
            for start in range(0, n, cfg.eval_batch):
                _, h = rnn(x[start:start + cfg.eval_batch])
                head(h[-1]).softmax(1)
    return run


def ensemble_predict(cfg: Settings, test: torch.Tensor, models: int) -> Callable[[], None]:
    built = [build_model(cfg).to(test.device) for _ in range(models)]

    def run() -> None:
        probs = [predict_log_proba(m, test, cfg).exp() for m in built]
        torch.stack(probs).mean(0).argmax(1).cpu()
    return run


# -- the benchmark --------------------------------------------------------------------------------

def bench_training(cfg: Settings, device: torch.device, rows: int, repeats: int,
                   data: tuple[np.ndarray, np.ndarray]) -> list[dict]:
    images_np, labels_np = data
    images = torch.from_numpy(images_np).to(device)
    labels = torch.from_numpy(labels_np.astype(np.int64)).to(device)
    tutorial_cfg = replace(resolve(preset="tutorial"), device=cfg.device, amp=cfg.amp)
    cases = [
        (RAW, raw_step_loop(cfg, device, rows)),
        (TUTORIAL, tutorial_loop(images_np, labels_np, device, rows)),
        (OURS, pipeline_loop(cfg, images, labels, rows)),
        (OURS_TUTORIAL, pipeline_loop(tutorial_cfg, images, labels, rows)),
    ]
    if device.type == "cuda":  # the defaults replay each step from a CUDA graph: without, for scale
        cases.append((OURS_EAGER, pipeline_loop(replace(cfg, cuda_graph=False), images, labels, rows)))
    results = []
    for name, fn in cases:
        seconds = median_seconds(fn, repeats, device)
        results.append({"case": name, "seconds": seconds, "samples_per_s": rows / seconds})
        # On CUDA the defaults use a CUDA graph; say so when its capture failed and it ran eagerly.
        fell_back = name == OURS and device.type == "cuda" and cfg.cuda_graph and fn.step.graph is None
        print(f"  {name:<46} {rows / seconds:>12,.0f} samples/s"
              + ("  (CUDA graph NOT captured: eager)" if fell_back else ""), flush=True)
    return results


def bench_inference(cfg: Settings, device: torch.device, repeats: int,
                    test_np: np.ndarray) -> list[dict]:
    models = 5  # the default number of folds
    test = torch.from_numpy(test_np).to(device)
    results = []
    for name, fn in [(RAW_FORWARD, raw_forward(cfg, device, len(test), models)),
                     (ENSEMBLE, ensemble_predict(cfg, test, models))]:
        seconds = median_seconds(fn, repeats, device)
        results.append({"case": name, "seconds": seconds, "samples_per_s": len(test) / seconds})
        print(f"  {name:<46} {seconds:>10.3f} s  ({len(test) / seconds:,.0f} images/s)", flush=True)
    return results


def write_full_size_csvs(folder: Path) -> None:
    import pandas as pd

    columns = [f"pixel{k}" for k in range(784)]
    images, labels = synthetic(N_TRAIN, seed=1)
    frame = pd.DataFrame(images.reshape(N_TRAIN, 784), columns=columns)
    frame.insert(0, "label", labels)
    frame.to_csv(folder / "train.csv", index=False)
    test, _ = synthetic(N_TEST, seed=2)
    pd.DataFrame(test.reshape(N_TEST, 784), columns=columns).to_csv(folder / "test.csv", index=False)


PREPARE_COMMAND, BARE_READ = "prepare --force (command)", "bare pandas read (command)"


def bench_prepare(folder: Path, repeats: int) -> list[dict]:
    cpu = torch.device("cpu")
    paths = Paths(folder / "work")
    paths.input.mkdir(parents=True)
    for name in ("train.csv", "test.csv"):
        (paths.input / name).symlink_to(folder / name)

    def parse() -> None:
        prepare.read_competition_csv(paths.train_csv, labelled=True)
        prepare.read_competition_csv(paths.test_csv, labelled=False)

    parse_s = median_seconds(parse, repeats, cpu)
    prepare.run(paths, force=True)
    load_s = median_seconds(lambda: load_prepared(paths), repeats, cpu)
    # Whole commands, process start included, alternated so both see the same machine: our prepare
    # (validation, cache and all) against a bare pandas read of the same two files.
    ours = [sys.executable, "-m", "pipeline", "--root", str(paths.root), "prepare", "--force"]
    bare = [sys.executable, "-c", "import sys, pandas as pd; [pd.read_csv(f) for f in sys.argv[1:]]",
            str(paths.train_csv), str(paths.test_csv)]
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(max(3, repeats)):
        for name, command in (("ours", ours), ("bare", bare)):
            started = time.perf_counter()
            subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
            times[name].append(time.perf_counter() - started)
    command_s = {name: statistics.median(values) for name, values in times.items()}
    print(f"  {'parse train.csv + test.csv (full size)':<46} {parse_s:>10.3f} s")
    print(f"  {'reload the prepared cache':<46} {load_s:>10.3f} s")
    print(f"  {'`prepare --force`, a command (full size)':<46} {command_s['ours']:>10.3f} s")
    print(f"  {'bare pd.read_csv of both, a command':<46} {command_s['bare']:>10.3f} s")
    return [{"case": "parse both CSVs", "seconds": parse_s},
            {"case": "reload prepared cache", "seconds": load_s},
            {"case": PREPARE_COMMAND, "seconds": command_s["ours"]},
            {"case": BARE_READ, "seconds": command_s["bare"]}]


def bench_e2e(folder: Path, device: str, options: str, log: Path | None) -> dict:
    """One full-size `submit` in a fresh folder (set-up excluded): download through predict."""
    root = Path(tempfile.mkdtemp(prefix="e2e-", dir=folder))
    command = [sys.executable, "-m", "pipeline", "--root", str(root), "submit", "--source", "dir",
               "--dir", str(folder), "--device", device, *options.split()]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if log:
        log.mkdir(parents=True, exist_ok=True)
        name = "e2e" + "".join(c if c.isalnum() else "_" for c in options) + ".log"
        (log / name).write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        print(f"  submit {options} FAILED:\n{result.stderr[-2000:]}")
        return {"case": f"e2e submit {options}".strip(), "seconds": float("nan")}
    print(f"  {'submit, full size, ' + (options or 'defaults'):<46} {seconds:>10.1f} s")
    at_once = re.search(r"train: (\d+) folds at a time", result.stdout)
    together = int(at_once.group(1)) if at_once else 1
    rate = training_rate(Paths(root), together)
    print(f"  {'  its training, ' + (f'{together} folds at a time' if together > 1 else 'one fold'):<46} "
          f"{rate:>12,.0f} samples/s")
    return {"case": f"e2e submit {options}".strip(), "seconds": seconds,
            "training_samples_per_s": rate, "folds_together": together}


def training_rate(paths: Paths, together: int) -> float:
    """Training samples per second from the fold logs, with `together` folds running at a time."""
    import pandas as pd

    logs = sorted(paths.runs.glob("*/fold_*.csv"))
    medians = [pd.read_csv(log)["samples_per_s"].median() for log in logs]
    return float(statistics.median(medians) * min(together, len(medians)))


def ratio(results: list[dict], a: str, b: str, key: str = "samples_per_s") -> float:
    pick = {r["case"]: r for r in results}
    return pick[a][key] / pick[b][key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=16_384, help="training rows timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, help="pipeline batch size (default: the config's)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--skip-prepare", action="store_true")
    parser.add_argument("--e2e", action="append", nargs="?", const="", metavar="OPTIONS",
                        help="also time a full-size submit with these options (e.g. '--jobs 5'); "
                        "repeatable; alone: the defaults")
    parser.add_argument("--test-rows", type=int, default=N_TEST)
    parser.add_argument("--out", type=Path, help="write results.json here")
    args = parser.parse_args(argv)

    overrides = {"device": args.device, "batch": args.batch, "amp": args.amp}
    cfg = resolve(overrides=overrides)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"bench: {describe(device)}, torch {torch.__version__}, rnn hidden {cfg.hidden}, "
          f"batch {cfg.batch}, amp {cfg.amp}, {args.rows} rows x {args.repeats} repeats (median)")
    rows = min(args.rows, N_TRAIN)
    results = bench_training(cfg, device, rows, args.repeats, synthetic(rows, seed=1))
    test_np, _ = synthetic(args.test_rows, seed=2)
    results += bench_inference(cfg, device, args.repeats, test_np)
    with tempfile.TemporaryDirectory(prefix="digits-speed-") as tmp:
        folder = Path(tmp)
        if not args.skip_prepare or args.e2e:
            write_full_size_csvs(folder)
        if not args.skip_prepare:
            results += bench_prepare(folder, args.repeats)
        for options in args.e2e or []:
            results.append(bench_e2e(folder, args.device, options, args.out))

    ratios = {
        "pipeline / raw bound (training)": ratio(results, OURS, RAW),
        "pipeline / tutorial loop (training)": ratio(results, OURS, TUTORIAL),
        "pipeline at tutorial settings / tutorial loop": ratio(results, OURS_TUTORIAL, TUTORIAL),
        "ensemble / raw forward (inference)": ratio(results, ENSEMBLE, RAW_FORWARD),
    }
    if device.type == "cuda":
        ratios["pipeline without CUDA graph / tutorial loop"] = ratio(results, OURS_EAGER, TUTORIAL)
        ratios["CUDA graph speed-up (defaults / without)"] = ratio(results, OURS, OURS_EAGER)
    if any(r["case"] == PREPARE_COMMAND for r in results):  # target: prepare <= 1.2x the bare read
        ratios["bare pandas read / prepare (>= 0.83 is met)"] = ratio(results, BARE_READ,
                                                                       PREPARE_COMMAND, "seconds")
    tutorial_rate = next(r["samples_per_s"] for r in results if r["case"] == TUTORIAL)
    for r in results:
        if r.get("folds_together", 1) > 1:
            ratios[f"{r['case']}: all folds' training / tutorial loop"] = (
                r["training_samples_per_s"] / tutorial_rate)
    print("\nratios (higher is better for ours):")
    for name, value in ratios.items():
        print(f"  {name:<46} {value:>8.2f}x")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(
            {"device": describe(device), "torch": torch.__version__, "cpu_count": os.cpu_count(),
             "config": {"hidden": cfg.hidden, "batch": cfg.batch, "amp": cfg.amp},
             "results": results, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
