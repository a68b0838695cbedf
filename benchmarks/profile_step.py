"""Where a training epoch's time goes: torch.profiler over one epoch of the pipeline's loop.

    python benchmarks/profile_step.py [--device cuda] [--batch 1024] [--rows 33600]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.speed import N_TRAIN, pipeline_loop, sync, synthetic
from pipeline.config import resolve
from pipeline.engine.runtime import resolve_device


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--rows", type=int, default=33_600)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    cfg = resolve(overrides={"device": args.device, "batch": args.batch})
    device = resolve_device(cfg.device)
    images_np, labels_np = synthetic(N_TRAIN, seed=1)
    images = torch.from_numpy(images_np).to(device)
    labels = torch.from_numpy(labels_np.astype("int64")).to(device)
    epoch = pipeline_loop(cfg, images, labels, args.rows)
    epoch()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        epoch()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.top))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
