"""The Kaggle side of `make kaggle-run`: what the pushed script runs in a Kaggle session.

The script (kernels.pack) unpacks the project and calls main() with the job the local side wrote
into it (the run's settings, its id, the key of its data). main() checks the session, then trains
with the pipeline's own command line in Kaggle-notebook mode and writes the run's files to the
session's output, with a manifest written last: the local side takes nothing it does not vouch for.

Standard library only at import (torch only inside the GPU check): it must say what is wrong even
in a session that lacks packages.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.kaggle import notebook
from pipeline.store.io import write_json

MANIFEST = "digits-manifest.json"
MANIFEST_FORMAT = 1
# Where a Linux driver lists the NVIDIA GPUs it sees: a GPU there that PyTorch cannot use is an error.
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


class RemoteError(Exception):
    """Why the session cannot make the run, in one message for the log."""


def say(message: str) -> None:
    print(f"kaggle-run: {message}", flush=True)


def main(job: dict[str, Any], project: str, code: str) -> int:
    """Make the run the job describes; the exit status of the session's script (1 on failure)."""
    try:
        _make(job, Path(project), code)
    except RemoteError as exc:
        print(f"kaggle-run: ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def _make(job: dict[str, Any], project: Path, code: str) -> None:
    say(f"run {job['run']} on Python {platform.python_version()}, code {code[:12]} in {project}")
    if notebook.check() != 0:
        raise RemoteError("this session's Python lacks what the pipeline needs (said above)")
    if problem := gpu_problem(job["accelerator"], str(job["settings"].get("device", "auto"))):
        raise RemoteError(problem)
    if (attached := notebook.competition_input()) is None:
        raise RemoteError(f"the competition's files are not attached to this session (no train.csv and "
                          f"test.csv under {notebook.kaggle_root() / 'input'}); `make kaggle-run` "
                          "attaches them: push again")
    given = project / "kaggle-settings.json"
    given.write_text(json.dumps(job["settings"]), encoding="utf-8")
    source = ["--source", "dir", "--dir", str(attached)]
    _pipeline(project, "prepare", *source)
    key = _data_key(project)
    if key != job["data"]:
        raise RemoteError(f"the competition's data here (key {key}) is not the data in input/ of the "
                          f"project that pushed this run (key {job['data']}): the run would not be "
                          "the same run there. Put the competition's files in its input/ (`make "
                          "download SOURCE=kaggle FORCE=1`) and push again")
    _pipeline(project, "submit", "--config", str(given), *source)
    made = (project / "runs" / "latest").read_text(encoding="utf-8").strip()
    if made != job["run"]:
        raise RemoteError(f"the pipeline made run {made}, not {job['run']}: the code or the "
                          "settings differ between here and the project that pushed it")
    if (out := notebook.working()) is None:
        raise RemoteError(f"this session has no output folder ({notebook.kaggle_root() / 'working'})")
    files = write_output(project / "runs" / made, out, {**job, "code": code})
    say(f"wrote run {made} ({len(files)} files) and {MANIFEST} to {out}")


def _pipeline(project: Path, stage: str, *args: str) -> None:
    """One stage of the pipeline's command line, its output in the session's log."""
    env = {**os.environ, "PYTHONPATH": str(project)}  # the unpacked code, in every process it starts
    command = [sys.executable, "-m", "pipeline", "--root", str(project), stage, *args]
    say(f"$ python -m pipeline {stage} {' '.join(args)}")
    code = subprocess.run(command, cwd=project, env=env, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        raise RemoteError(f"`python -m pipeline {stage}` failed (exit status {code}); its message is above")


def _data_key(project: Path) -> str:
    try:
        meta = json.loads((project / "input" / "prepared" / "meta.json").read_text(encoding="utf-8"))
        return str(meta["data_key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"prepare wrote no readable record of the data ({exc})") from exc


def _probe(index: int) -> None:
    """A step of a small recurrent network on GPU index: CUDA code of every kind the run uses."""
    import torch

    device = torch.device("cuda", index)
    layer = torch.nn.RNN(28, 16, batch_first=True, bidirectional=True).to(device)
    layer(torch.zeros(4, 28, 28, device=device))[0].sum().backward()
    torch.cuda.synchronize(device)


def gpu_problem(accelerator: str, device: str, probe: Callable[[int], None] = _probe,
                nvidia: Path = NVIDIA_GPUS) -> str | None:
    """Why this session's GPU cannot train the run, in words; None when it can (or when the run
    asked for the CPU). A GPU PyTorch cannot see, or one its kernels were not built for (a P100
    under a current image), is named with what to push instead, never left to fail as a CUDA
    traceback halfway through the run."""
    import torch

    if device == "cpu":
        say("DEVICE=cpu: training on the session's CPU")
        return None
    if not torch.cuda.is_available():
        if nvidia.is_dir() and any(nvidia.iterdir()):
            return (f"this session has an NVIDIA GPU, but its PyTorch {torch.__version__} cannot use it "
                    f"(torch.cuda.is_available() is False); asked for {accelerator}")
        say(f"no GPU in this session (asked for {accelerator}): training on its CPU")
        return None
    built = " ".join(torch.cuda.get_arch_list()) or "unknown"
    for index in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        try:
            probe(index)
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or ["no detail"])[0]
            return (f"the GPU {name} (compute capability {major}.{minor}) cannot run this image's "
                    f"PyTorch {torch.__version__}, built for {built}: {first}. Push again with "
                    "ACCELERATOR=NvidiaTeslaT4 (GPU T4 x2); a P100 cannot run it")
        say(f"GPU {index}: {name} (compute capability {major}.{minor}) runs PyTorch {torch.__version__}")
    return None


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_output(run: Path, out: Path, facts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Copy the run's files into out and write the manifest last; returns its files (name -> size,
    sha256). facts: the job (run, data) and the code's hash, repeated in the manifest."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(run.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        target = out / path.name
        shutil.copyfile(path, target)
        files[path.name] = {"size": target.stat().st_size, "sha256": sha256(target)}
    manifest = {"format": MANIFEST_FORMAT, "run": facts["run"], "data": facts["data"],
                "code": facts["code"], "python": platform.python_version(), "files": files}
    write_json(out / MANIFEST, manifest)  # whole or not at all
    return files
