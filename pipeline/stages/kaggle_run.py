"""`make kaggle-run`: train the run of these settings on a Kaggle GPU and bring it home as a run like
any other; `make quota`: the account's GPU hours.

The project's code goes to Kaggle inside one script (pipeline/kaggle/kernels.py) and trains there on
the competition's files, the data of input/ here, so the same settings give the same run id on both
sides (pipeline/kaggle/remote.py checks it). This side follows the session up to DEADLINE, fetches
only what the session's manifest names, and moves the run into runs/<id>/ once all of it is checked.
Whatever the end (done, error, deadline, Ctrl-C) the kernel is deleted, unless KEEP=1.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import COMPETITION, Paths, Settings
from pipeline.errors import PipelineError
from pipeline.kaggle import kernels
from pipeline.kaggle.api import scrub
from pipeline.kaggle.remote import MANIFEST, MANIFEST_FORMAT, sha256
from pipeline.options import T4, default
from pipeline.store import ledger
from pipeline.store.data import data_source
from pipeline.store.io import read_json
from pipeline.store.ledger import format_seconds
from pipeline.store.run import KaggleOrigin, Plan, RunDir, RunRecord, read_probabilities

MAX_SESSION = 12 * 3600.0  # Kaggle ends every session after 12 hours
MAX_POLL = 30.0  # seconds between two status calls, at most
MAX_MISSES = 3  # status calls in a row without an answer before the wait gives up
STILL_EVERY = 300.0  # say "still running" this often when nothing changes
LOG_TAIL = 25  # lines of the session's log shown when it failed
MAX_FILE = 1 << 30  # no file of a run is near this; a manifest saying more is not believed
MAX_MANIFEST = 1 << 20
CANCELLED = ("CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED")
# A rough figure of a run's GPU time (an estimate for the quota check, not a measurement): the
# session's start (image, copying the data, prepare) and each training step of the default model
# with the folds on the GPUs at once. An H200 trained the default of then (5 folds x 30 epochs at
# once) in about 36 s, about 1 ms a step (docs/results.md); a T4 is taken as eight times slower.
# Wider, deeper or gated cells scale the step.
STARTUP_S = 300.0
STEP_S = 0.008
GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def seconds_needed(cfg: Settings, n_train: int) -> float:
    """About how long the run keeps a Kaggle GPU session busy, in seconds."""
    rows = n_train * (cfg.folds - 1) / cfg.folds
    steps = cfg.folds * cfg.epochs * math.ceil(rows / cfg.batch)
    width = cfg.hidden * cfg.layers * (2 if cfg.bidirectional else 1) * GATES.get(cfg.model, 1) / 256
    return STARTUP_S + steps * STEP_S * max(1.0, width)


def check_request(cfg: Settings, paths: Paths, accelerator: str, deadline: float) -> None:
    """Refuse, before anything is sent, what could not come back as this project's run."""
    if "p100" in accelerator.lower():
        raise PipelineError(f"ACCELERATOR={accelerator}: the P100 cannot run the PyTorch of Kaggle's "
                            f"current image (its build dropped compute capability 6.0); use "
                            f"ACCELERATOR={T4} (GPU T4 x2), or none for the session's CPU")
    if accelerator.lower().startswith("tpu"):
        raise PipelineError(f"ACCELERATOR={accelerator}: the pipeline trains with PyTorch on CUDA or "
                            f"a CPU, not on TPUs; use ACCELERATOR={T4} or none")
    if not re.fullmatch(r"[A-Za-z0-9]+", accelerator):
        raise PipelineError(f"ACCELERATOR={accelerator!r}: not a Kaggle machine name; use {T4} or none")
    if not 1 <= deadline <= MAX_SESSION:
        raise PipelineError(f"DEADLINE={deadline:g}: must be 1 to {MAX_SESSION:g} seconds (Kaggle ends "
                            "a session after 12 hours)")
    if cfg.teacher:
        raise PipelineError(f"TEACHER={cfg.teacher}: a distilled run learns from a teacher's "
                            "predictions that are here, not on Kaggle; `make distill` trains it here")
    if data_source(paths) == "sample":
        raise PipelineError("input/ holds the built-in sample, but a run on Kaggle trains on the "
                            "competition's files, so it would not be a run of this data here. "
                            "`make download SOURCE=kaggle FORCE=1` puts the competition's files in "
                            "input/; then `make kaggle-run` again")


def run(plan: Plan, accelerator: str = default("accelerator"), deadline: float = default("deadline"),
        timeout: float = default("timeout"), keep: bool = False) -> RunRecord | None:
    """Train the plan's run on Kaggle and bring it into runs/<id>/; returns its record (None when
    this project already holds the run, complete: nothing is pushed)."""
    cfg, run, data = plan.cfg, plan.run, plan.data
    accelerator = "none" if accelerator.lower() == "none" else accelerator
    check_request(cfg, plan.paths, accelerator, deadline)
    if run.completed() is not None:
        print(f"kaggle-run: {run.id} is already here, complete: nothing to train on Kaggle "
              "(`make submit` with the same settings makes its submission the current one)")
        return None
    if run.path.exists():
        raise PipelineError(f"{run.path} holds this run, trained here in part: finish it here (`make "
                            f"train`), or `make forget RUN={run.id}` to train it on Kaggle instead")
    print(f"kaggle-run: run {run.id}, the id these settings have here")
    if accelerator != "none":
        _check_quota(cfg, len(data.train_y), timeout)
    job = {"run": run.id, "data": data.data_key, "accelerator": accelerator, "settings": asdict(cfg)}
    script, code = kernels.pack(job)
    slug = kernel_slug(run.id)
    machine = {T4: "GPU T4 x2", "none": "no accelerator (the session's CPU)"}.get(accelerator, accelerator)
    print(f"kaggle-run: pushing {slug} ({len(script) // 1024} KB: the project's code and the job) "
          f"as a private kernel on {machine}, '{COMPETITION}' attached, internet off")
    try:
        pushed = kernels.push(script, slug, accelerator, deadline, timeout)
        print(f"kaggle-run: version {pushed.version} of {pushed.url or pushed.kernel} is on its way")
        follow(pushed, deadline, timeout)
        origin = KaggleOrigin(kernel=pushed.kernel, version=pushed.version, accelerator=accelerator)
        record = bring_home(pushed, origin, code, plan, timeout)
    finally:
        _let_go(slug, keep, timeout)
    return record


def kernel_slug(name: str) -> str:
    """A new kernel's slug (its title too): the run's id and the time, at most 50 characters."""
    stamp = time.strftime("%m%d%H%M%S")
    # Kaggle makes the slug of the title; a doubled dash would make another one than asked for.
    return f"digits-{name.lower()[:50 - 8 - len(stamp)].rstrip('-')}-{stamp}"


def _check_quota(cfg: Settings, n_train: int, timeout: float) -> None:
    found = kernels.quota(timeout)
    need = seconds_needed(cfg, n_train)
    if found is None:
        print("kaggle-run: Kaggle did not say how many GPU hours are left; pushing anyway")
        return
    print(f"kaggle-run: GPU quota {found.text()}; this run needs about {need / 3600:.2f} h")
    if found.left < need:
        raise PipelineError(
            f"Kaggle's GPU quota has {found.left / 3600:.2f} h left ({found.text()}), clearly below the "
            f"about {need / 3600:.2f} h this run needs ({cfg.folds} folds x {cfg.epochs} epochs on "
            f"{n_train} rows). Wait for the refresh, train a shorter run (EPOCHS=, FOLDS=) or train "
            "it here (`make submit`); nothing was pushed")


# -- following the session ---------------------------------------------------------------------------

def follow(pushed: kernels.Pushed, deadline: float, timeout: float) -> None:
    """Poll the session until it completes; a PipelineError when it fails, is cancelled or is not
    done within deadline seconds. Each status change is said with the time since the push."""
    started, last, said, misses = time.monotonic(), "", 0.0, 0
    while True:
        try:
            state, failure = kernels.status(pushed, timeout)
            misses = 0
        except PipelineError as exc:  # one lost answer in hours of waiting must not end the run
            misses += 1
            if misses >= MAX_MISSES:
                raise
            state, failure = last, ""
            print(f"kaggle-run: no status this time ({exc}); asking again", file=sys.stderr)
        elapsed = time.monotonic() - started
        if state != last or elapsed - said >= STILL_EVERY:
            print(f"kaggle-run: {format_seconds(elapsed):>7} {state.lower().replace('_', ' ')}"
                  + (f" (still, deadline in {format_seconds(deadline - elapsed)})" if state == last
                     else ""), flush=True)
            last, said = state, elapsed
        _stop_unless_running(pushed, state, failure, elapsed, deadline, timeout)
        if state == "COMPLETE":
            return
        # Often at first (a short run is seen done soon), then every tenth of the time so far.
        time.sleep(max(0.0, min(max(1.0, elapsed / 10), MAX_POLL, deadline - elapsed)))


def _stop_unless_running(pushed: kernels.Pushed, state: str, failure: str, elapsed: float,
                         deadline: float, timeout: float) -> None:
    """A PipelineError when the session failed, was cancelled or ran past the deadline."""
    if state == "ERROR":
        raise PipelineError(_failure(pushed, failure, timeout))
    if state in CANCELLED:
        raise PipelineError(f"the session of {pushed.kernel} was cancelled on Kaggle ({state}); "
                            "nothing was brought home")
    if state != "COMPLETE" and elapsed >= deadline:
        raise PipelineError(f"the run on Kaggle did not finish within DEADLINE={deadline:g} s (last "
                            f"status: {state or 'none'}); nothing was brought home. Allow longer with "
                            "DEADLINE=<seconds> (at most 43200)")


def _failure(pushed: kernels.Pushed, failure: str, timeout: float) -> str:
    """The run failed on Kaggle: Kaggle's message and the last lines of the session's log."""
    try:
        log = kernels.output(pushed, timeout).log
        lines = [line for line in scrub(log).splitlines() if line.strip()][-LOG_TAIL:]
        tail = "\n".join(f"  | {line}" for line in lines) or "  (the log is empty)"
    except PipelineError as exc:
        tail = f"  (its log could not be fetched: {exc})"
    return (f"the run failed on Kaggle (status ERROR): {scrub(failure) or 'Kaggle gave no message'}\n"
            f"the last lines of its log:\n{tail}")


def _let_go(slug: str, keep: bool, timeout: float) -> None:
    """Delete the kernel (KEEP=1: say where it stays). A failure to delete is said, never raised:
    the end the command came to (a result, an error, Ctrl-C) is the one it reports."""
    if keep:
        print(f"kaggle-run: KEEP=1: the kernel {slug} stays on Kaggle (https://www.kaggle.com/code, "
              "yours); a session still running there keeps using GPU quota until it ends or you "
              "delete it", file=sys.stderr)
        return
    # Ctrl-C is held off while the kernel is deleted: a second one must not leave it running.
    main = threading.current_thread() is threading.main_thread()  # only it may handle signals
    before = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        owner, found, complaint = kernels.delete(slug, timeout)
    except PipelineError as exc:
        owner, found, complaint = "", True, str(exc)
    finally:
        if main:
            signal.signal(signal.SIGINT, before)
    kernel = f"{owner}/{slug}" if owner else slug
    if complaint:
        print(f"kaggle-run: WARNING: could not delete the kernel {kernel} ({complaint}); if it still "
              f"runs it uses GPU quota: delete it at https://www.kaggle.com/code/{kernel} or with "
              f"`kaggle kernels delete {kernel} -y`", file=sys.stderr)
    elif found:
        print(f"kaggle-run: deleted the kernel {kernel} on Kaggle (KEEP=1 keeps it)", file=sys.stderr)
    else:
        print(f"kaggle-run: no kernel {kernel} on Kaggle: nothing left running there", file=sys.stderr)


# -- bringing the run home ---------------------------------------------------------------------------

def bring_home(pushed: kernels.Pushed, origin: KaggleOrigin, code: str, plan: Plan,
               timeout: float) -> RunRecord:
    """Fetch the files the session's manifest names into a staging folder, check every one, and
    move the run into runs/<id>/ only when all of it is right; publish its submission."""
    target, paths, data = plan.run, plan.paths, plan.data
    staging = Path(tempfile.mkdtemp(prefix=".kaggle-", dir=paths.runs))
    try:
        # The listing, and the manifest with it (to a name of ours: nothing else is fetched yet).
        found = kernels.output(pushed, timeout, first=(MANIFEST, staging / MANIFEST, MAX_MANIFEST))
        if unsafe := [n for n in found.urls if kernels.escapes(n)]:
            raise PipelineError(f"Kaggle's output lists a file named {unsafe[0]!r}, which could land "
                                "outside the run's folder")
        if MANIFEST not in found.urls:
            raise PipelineError(f"the session's output has no {MANIFEST} (the run did not finish "
                                f"writing it; it lists {', '.join(sorted(found.urls)[:8]) or 'nothing'})")
        staged = RunDir(staging / target.id)
        staged.path.mkdir()
        files = read_manifest(staging / MANIFEST, target.id, data.data_key, code)
        if missing := sorted(set(files) - set(found.urls)):
            raise PipelineError(f"the session's output lacks {', '.join(missing[:5])}, which its "
                                "manifest names (incomplete)")
        print(f"kaggle-run: fetching {len(files)} files "
              f"({sum(f['size'] for f in files.values()) / 1e6:.1f} MB)")
        kernels.fetch([(found.urls[n], staged.path / n, f["size"]) for n, f in files.items()], timeout)
        record = _checked(staged, files, plan)
        record = staged.save(replace(record, kaggle=origin, source=data_source(paths)))
        (staged.path / "kaggle.log").write_text(scrub(found.log), encoding="utf-8")
        try:
            os.rename(staged.path, target.path)
        except OSError as exc:  # the lock keeps others out; this is a full disk or a folder made by hand
            raise PipelineError(f"{target.path}: cannot move the run there ({exc.strerror})") from exc
    except PipelineError as exc:  # of Kaggle's answers or of what came back
        raise PipelineError(f"{exc}: nothing was brought home") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = ledger.publish(paths, target, record, len(data.test_x), new=True)
    print(f"kaggle-run: {target.id}: OOF accuracy {record.oof_acc:.4f}, trained on Kaggle "
          f"({record.device}); brought home to {target.path.relative_to(paths.root)}; wrote "
          f"{paths.submission_csv} (kept as submissions/{record.kept})")
    return record


def read_manifest(path: Path, run: str, data_key: str, code: str) -> dict[str, dict[str, Any]]:
    """The manifest's files (name -> size, sha256), once it is known to describe this very run; else
    a PipelineError (bring_home adds that nothing was brought home)."""
    made = read_json(path)
    if not isinstance(made, dict) or not isinstance(made.get("files"), dict):
        raise PipelineError(f"the session's {MANIFEST} is not readable")
    for field, expected in (("format", MANIFEST_FORMAT), ("run", run), ("data", data_key), ("code", code)):
        if made.get(field) != expected:
            raise PipelineError(f"the session's manifest is of another {field} ({made.get(field)!r}, "
                                f"not {expected!r})")
    files = made["files"]
    for name, facts in files.items():
        if not kernels.safe_name(name):
            raise PipelineError(f"the session's manifest names a file {name!r}, which could land "
                                "outside the run's folder")
        size, digest = (facts.get("size"), facts.get("sha256")) if isinstance(facts, dict) else (0, 0)
        if not (isinstance(size, int) and 0 <= size <= MAX_FILE and isinstance(digest, str)
                and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise PipelineError(f"the session's manifest gives no size and SHA-256 of {name}")
    return files


def _checked(staged: RunDir, files: dict[str, dict[str, Any]], plan: Plan) -> RunRecord:
    """The staged run's record once every file matches the manifest and the run is complete, of
    this data and of these folds; else a PipelineError (the staging folder is then removed)."""
    for name, facts in files.items():
        path = staged.path / name
        size = path.stat().st_size if path.is_file() else -1
        if size != facts["size"]:
            raise PipelineError(f"{name} came back with {max(size, 0)} bytes, not the {facts['size']} "
                                "its manifest says (damaged on the way)")
        if sha256(path) != facts["sha256"]:
            raise PipelineError(f"{name} came back with another SHA-256 than its manifest's (damaged on "
                                "the way)")
    try:
        record = staged.check(len(plan.data.train_y), len(plan.data.test_x))
        for k in range(plan.cfg.folds):
            rows, _ = read_probabilities(staged.oof_fold(k), "row")
            if not np.array_equal(np.sort(rows.astype(np.int64)), np.flatnonzero(plan.fold_of == k)):
                raise PipelineError(f"{staged.oof_fold(k).name} holds out other rows than fold {k} "
                                    "of input/folds.csv")
    except PipelineError as exc:
        raise PipelineError(f"what came back is not a complete run of these folds ({exc})") from None
    if record.data != plan.data.data_key or (record.n_folds, record.fold_seed) != (plan.cfg.folds,
                                                                                  plan.cfg.fold_seed):
        raise PipelineError("what came back was made from other data or folds than input/ holds")
    return record


def quota(timeout: float = default("timeout")) -> str:
    """Print the account's GPU hours: used, allowed, left and when they refresh; returns the line."""
    found = kernels.quota(timeout)
    text = f"GPU: {found.text()}" if found else "Kaggle's answer holds no GPU quota"
    sys.stdout.write(text + "\n")
    return text
