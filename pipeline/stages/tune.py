"""The tune stage: an Optuna study whose trials are runs (the space, the study and the trial live in
pipeline/tuning/). Trials that train every fold are predicted too, so `make blend` can use them; the
study ends with runs/tune/<study>/best.toml, ready for `make submit CONFIG=...`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline.config import Paths, Settings
from pipeline.errors import PipelineError
from pipeline.store.data import Prepared
from pipeline.store.io import atomic_write_text, write_json
from pipeline.store.run import check_name, studies_dir
from pipeline.tuning.study import Job, open_study, requeue_stopped
from pipeline.tuning.trial import optimize, worker


def run(job: Job, paths: Paths, data: Prepared, fold_of: Any, space: Path | None = None) -> dict[str, Any]:
    """Run trials until the study has job.trials finished (complete or pruned); returns a summary."""
    from optuna.trial import TrialState

    base, study, trials, workers, tune_folds = job.base, job.study, job.trials, job.workers, job.tune_folds
    check_name(study, "STUDY")
    if base.teacher:
        raise PipelineError(f"TEACHER={base.teacher}: a study's trials are not distilled runs; tune "
                            "without TEACHER, then `make distill CONFIG=runs/tune/<study>/best.toml`")
    for name, value, low in (("TRIALS", trials, 1), ("WORKERS", workers, 1), ("TUNE_FOLDS", tune_folds, 0)):
        if value < low:
            raise PipelineError(f"{name}={value} is out of range; it must be a whole number from {low}")
    job = job.with_space(space)
    # One worker on its own storage is reproducible (SEED); workers sharing a study must not all
    # draw the same settings, so they draw unseeded.
    made = open_study(paths, job, seed=base.seed if workers == 1 and not job.url else None)
    requeue_stopped(made, journal=not job.url)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    have = len(made.get_trials(deepcopy=False, states=finished))
    started = time.perf_counter()
    if have >= trials:
        print(f"tune: study {study} already has {have} finished trials (TRIALS={trials}); "
              f"TRIALS={have + 10} adds 10 more")
    else:
        print(f"tune: study {study}: {have} finished trials, running until {trials} "
              f"({workers} worker(s), {'TUNE_FOLDS=' + str(tune_folds) if tune_folds else 'all folds'}, "
              f"pruner {job.pruner})")
        # Each worker runs its share of what is missing; the callback stops all at the study's total
        # (several machines on one database may overshoot it by a trial or so each).
        shares = [(trials - have) // workers + (i < (trials - have) % workers) for i in range(workers)]
        try:
            if workers > 1:
                _run_workers(job, shares)
            else:
                optimize(made, job, paths, data, fold_of, shares[0])
        except KeyboardInterrupt:
            # Stopped: the trials that completed still make best.toml and the summary.
            summarize(paths, made, study, base, time.perf_counter() - started)
            raise
    return summarize(paths, made, study, base, time.perf_counter() - started)


def _run_workers(job: Job, shares: list[int]) -> None:
    """WORKERS=n trial processes; a Ctrl-C (or a SIGINT to this one alone) stops every worker."""
    import signal
    from concurrent.futures import ProcessPoolExecutor, wait
    from multiprocessing import get_context

    with ProcessPoolExecutor(len(shares), mp_context=get_context("spawn"),
                             initializer=signal.signal,
                             initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        futures = [pool.submit(worker, job, share) for share in shares if share]
        try:
            for done in futures:
                done.result()
        except KeyboardInterrupt:
            for process in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signal.SIGINT)
            wait(futures)
            raise
        for done in futures:  # a worker stopped by a Ctrl-C of the terminal: stop here too
            if isinstance(done.exception(), KeyboardInterrupt):
                raise KeyboardInterrupt


def summarize(paths: Paths, made: Any, study: str, base: Settings, seconds: float) -> dict[str, Any]:
    from optuna.trial import TrialState

    counts = {s.name.lower(): len(made.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    folder = studies_dir(paths) / study
    folder.mkdir(parents=True, exist_ok=True)
    if not counts["complete"]:
        print(f"tune: no complete trial yet ({counts}); nothing to write")
        return {"counts": counts}
    best = made.best_trial
    settings = {**{k: v for k, v in base.learned().items() if v != Settings.__dataclass_fields__[k].default},
                **best.params}
    best_toml = folder / "best.toml"
    lines = [f"# The best trial of study {study}: trial {best.number}, score {best.value:.4f}",
             f"# (run {best.user_attrs.get('run', '?')}). Train it on all folds:",
             f"#     make submit CONFIG={best_toml.relative_to(paths.root)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]  # checked, finite settings: TOML too
    atomic_write_text(best_toml, "\n".join(lines) + "\n")
    write_json(folder / "summary.json", {"counts": counts, "best": best.number, "value": best.value,
                                         "params": best.params, "seconds": seconds})
    print(f"tune: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed "
          f"in {seconds:.0f}s; best: trial {best.number} ({best.value:.4f}) "
          f"{best.user_attrs.get('run', '')}")
    print(f"tune: wrote {best_toml.relative_to(paths.root)}; train it on all folds with "
          f"`make submit CONFIG={best_toml.relative_to(paths.root)}`")
    return {"counts": counts, "best": best.number, "value": best.value, "params": best.params}

