"""On a CUDA device: a training step replayed from a CUDA graph learns what the eager step learns.

    python benchmarks/graph_check.py [--device cuda] [--epochs 2] [--rows 4100] [--out DIR]

For each cell (and each with AMP) and each way of reading the digit, trains the same model from the
same seed three times on synthetic data whose epochs end in a short batch: eager, eager again (the
noise floor of nondeterministic GPU kernels), and graph-replayed. Prints the largest weight difference of each
against the first run, the per-epoch losses and each path's speed; exits 1 if the graph-replayed
run is further from the eager one than the noise floor allows (or a capture failed). On a CPU no
graph is captured (the option is ignored there), so the script only checks itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.speed import sync, synthetic
from pipeline.config import Settings, resolve
from pipeline.engine.checkpoint import FoldState
from pipeline.engine.models import build_model
from pipeline.engine.runtime import describe, resolve_device
from pipeline.engine.step import TrainStep
from pipeline.stages import train

VARIANTS = {"rnn": {}, "gru": {"model": "gru"}, "lstm": {"model": "lstm"}, "rnn+amp": {"amp": True},
            "gru+amp": {"model": "gru", "amp": True}, "lstm+amp": {"model": "lstm", "amp": True},
            # How the model reads: the one-row, last-state model; both sweeps; wide steps, columns,
            # relu; weight averaging (updated outside the graph, after each step).
            "rnn-last1": {"readout": "last", "rows_per_step": 1}, "rnn-both": {"view": "both"},
            "rnn-cols4": {"view": "cols", "rows_per_step": 4}, "rnn-relu": {"nonlinearity": "relu"},
            "rnn-both+amp": {"view": "both", "amp": True}, "rnn+ema": {"ema": 0.99}}


def fit(cfg: Settings, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
        failures: list[str]) -> tuple[dict, list[float], float, bool]:
    """Train from a fixed seed; returns the weights, per-epoch losses, samples/s, and if captured."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    optimizer = train.make_optimizer(cfg, model)
    scheduler = train.make_scheduler(cfg, optimizer, train.steps_per_epoch(cfg, len(images)))
    step = TrainStep(model, optimizer, scheduler, cfg, device, log=failures.append)
    state = FoldState(step, torch.Generator(device=device).manual_seed(1))
    rows = torch.arange(len(images), device=device)
    losses, started = [], time.perf_counter()
    for _ in range(cfg.epochs):
        losses.append(train.train_epoch(state, images, labels, rows, cfg)[0])
    sync(device)
    rate = cfg.epochs * len(images) / (time.perf_counter() - started)
    weights = {k: v.detach().clone() for k, v in step.trained.state_dict().items()}  # EMA: the average
    return weights, losses, rate, step.graph is not None


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4100, help="training rows (not a multiple of 128)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: "
                        + ", ".join(VARIANTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = resolve_device(args.device)
    # Off CUDA no graph is captured (cuda_graph is ignored there): a dry run of this script.
    needs_capture = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    images_np, labels_np = synthetic(args.rows, seed=3)
    images = torch.from_numpy(images_np).to(device)
    labels = torch.from_numpy(labels_np.astype("int64")).to(device)
    print(f"graph_check: {describe(device)}, torch {torch.__version__}, {args.rows} rows x "
          f"{args.epochs} epochs")
    ok, report = True, {}
    for name in args.variants.split(","):
        settings = VARIANTS[name]
        cfg = resolve(overrides={"device": args.device, "epochs": args.epochs, "cuda_graph": False,
                                 **settings})
        failures: list[str] = []
        eager, eager_losses, _, _ = fit(cfg, images, labels, device, failures)
        # The rerun's speed, not the first run's: that one pays for cuDNN's autotuning and set-up.
        again, _, eager_rate, _ = fit(cfg, images, labels, device, failures)
        graphed, graph_losses, graph_rate, captured = fit(replace(cfg, cuda_graph=True), images, labels,
                                                          device, failures)
        floor, diff = max_diff(eager, again), max_diff(eager, graphed)
        # The replayed steps' losses are what the epochs sum, as the eager steps' are.
        same_losses = all(abs(g - e) <= 1e-3 * abs(e) + 1e-6
                          for g, e in zip(graph_losses, eager_losses, strict=True))
        passed = ((captured or not needs_capture) and not failures and diff <= 10 * floor + 1e-5
                  and same_losses)
        ok &= passed
        report[name] = {"floor": floor, "diff": diff, "eager_losses": eager_losses,
                        "graph_losses": graph_losses, "eager_samples_per_s": eager_rate,
                        "graph_samples_per_s": graph_rate, "captured": captured, "failures": failures}
        print(f"  {name:<12} {'ok' if passed else 'MISMATCH':<8} weights vs eager: graph {diff:.2e}, "
              f"eager rerun {floor:.2e}; last loss {eager_losses[-1]:.5f} / {graph_losses[-1]:.5f}; "
              f"{eager_rate:,.0f} -> {graph_rate:,.0f} samples/s ({graph_rate / eager_rate:.2f}x)"
              + (f"; {failures[0]}" if failures else ""), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "graph_check.json").write_text(json.dumps(report, indent=2))
    print("graph_check:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
