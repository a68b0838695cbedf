"""A study: what is asked of it (Job), where it is stored (a journal in runs/tune/<study>/, or a
database shared by several machines, with retries and heartbeats), its stopped trials queued again,
and its status. The train and predict stages come from the command line, so no stage imports another.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import Paths, Settings
from pipeline.errors import PipelineError
from pipeline.options import default
from pipeline.store.run import FoldRecord, RunRecord, check_name, studies_dir
from pipeline.tuning.space import Space, load_space


@dataclass(frozen=True)
class Stages:
    """train.run (optuna.TrialPruned raised in on_epoch stops the fold) and predict.run."""

    train: Callable[..., list[FoldRecord]]
    predict: Callable[..., RunRecord]


@dataclass(frozen=True)
class Job:
    """A study to run: everything a trial process needs (but the data, which it loads itself)."""

    root: Path
    base: Settings
    stages: Stages
    study: str
    trials: int  # the study's total of finished trials, where every worker stops
    url: str | None = None
    space: Space = field(default_factory=dict)
    workers: int = default("workers")
    tune_folds: int = default("tune_folds")
    pruner: str = default("pruner")

    def with_space(self, path: Path | None) -> Job:
        """The job with its search space read and checked (default: the project's tune.toml)."""
        return replace(self, space=load_space(path or self.root / "tune.toml"))

    def fold_ids(self, cfg: Settings) -> list[int]:
        return list(range(min(self.tune_folds or cfg.folds, cfg.folds)))


HEARTBEAT_S, GRACE_S = 20, 60  # a database worker silent for a minute has lost its trial
ATTEMPTS = 5  # to open a database that other machines are setting up at the same moment
RACES = ("UniqueViolation", "DuplicateObject", "DuplicateTable", "already exists")  # their errors


# How a URL writes what would end its password early (RFC 3986's percent-encoding).
ESCAPES = ("in a user name or password write '@' as %40 (and ':' '/' '?' '#' '%' ' ' as "
           "%3A %2F %3F %23 %25 %20)")


def _password(url: str) -> str | None:
    """The password as written: after the first ':' of what lies between '//' and the last '@'
    (a password may hold '@' itself, so the last '@' is the safe end to hide up to)."""
    start = url.find("//")
    end = url.rfind("@")
    if start < 0 or end <= start:
        return None
    _, colon, password = url[start + 2:end].partition(":")
    return password if colon and password else None


def hide_password(url: str, text: str | None = None) -> str:
    """text (default: the url) with no part of the url's password, as written or decoded (%40 -> @,
    as a driver may print it); check_url refuses a URL the database library would read otherwise."""
    password = _password(url)
    text = url if text is None else text
    if password is None:
        return text
    from urllib.parse import unquote

    text = text.replace(f":{password}@", ":***@")
    for secret in sorted({password, unquote(password)}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def check_url(url: str) -> None:
    """Refuse, before connecting, a URL whose password SQLAlchemy (Optuna's database library) would
    read otherwise than written: it ends a password at the first '@', and the rest would become the
    host name that the driver's errors print."""
    from urllib.parse import unquote

    from sqlalchemy.engine import make_url

    shown, password = hide_password(url), _password(url)
    if url.count("@") > 1:
        raise PipelineError(f"STORAGE={shown}: '@' appears {url.count('@')} times, so the password "
                            f"cannot be told from the host; {ESCAPES}")
    try:
        read = make_url(url).password
    except Exception:  # not a URL it can read: it has no password to show either
        read = None
    if password is not None and read != unquote(password):
        raise PipelineError(f"STORAGE={shown}: the database library would not read the password "
                            f"written after the user name; {ESCAPES}")


def storage(paths: Paths, study: str, url: str | None) -> Any:
    import optuna

    if not url:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        folder = studies_dir(paths) / study
        folder.mkdir(parents=True, exist_ok=True)
        log = str(folder / "journal.log")
        return optuna.storages.JournalStorage(JournalFileBackend(log, JournalFileOpenLock(log)))
    check_url(url)
    for attempt in range(ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S, heartbeat_stale_trial_callback=(
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)))
        except Exception as exc:  # the driver's own errors (unreachable host, bad password...)
            # Machines starting at once on a new database race to make Optuna's tables, types and
            # version row; a loser's transaction is undone whole, and it finds them made next time.
            if any(word in str(exc) for word in RACES) and attempt < ATTEMPTS - 1:
                time.sleep(0.5 + attempt + random.random())
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = f"; {ESCAPES}" if "password" in first.lower() else ""
            raise PipelineError(f"STORAGE={hide_password(url)}: cannot use this database "
                                f"({hide_password(url, first)}){hint}") from None
    raise AssertionError("unreachable")


def scoring(job: Job) -> dict[str, Any]:
    """How a study's trials are scored (trials scored otherwise cannot be ranked together)."""
    return {"scored on folds": len(job.fold_ids(job.base)), "pruner": job.pruner}


def _words(scored: dict[str, Any], base: Settings) -> str:
    k = scored.get("scored on folds")
    folds = "all folds" if k == base.folds else f"TUNE_FOLDS={k}"
    return f"{folds}, PRUNER={scored.get('pruner')}"


def open_study(paths: Paths, job: Job, seed: int | None = None) -> Any:
    """The study, made or continued; refused when it was made with another space, base or scoring.
    seed: mixed with the trials so far, so a continued study draws new settings, reproducibly."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial says it all
    study, base = job.study, job.base
    pruners = {"median": optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=30),
               "wilcoxon": optuna.pruners.WilcoxonPruner(p_threshold=0.1),
               "none": optuna.pruners.NopPruner()}
    made = optuna.create_study(storage=storage(paths, study, job.url), study_name=study,
                               direction="maximize", load_if_exists=True, pruner=pruners[job.pruner])
    have = len(made.get_trials(deepcopy=False))
    made.sampler = optuna.samplers.TPESampler(
        n_startup_trials=8, seed=None if seed is None else (seed * 1_000_003 + have) % 2**32)
    described = json.dumps({"space": job.space, "base": base.learned()}, sort_keys=True, default=str)
    scored = scoring(job)
    recorded = made.user_attrs.get("space")
    if recorded is None:
        made.set_user_attr("space", described)
    elif recorded != described:
        was = json.loads(recorded)
        what = "search space" if was.get("space") != json.loads(described)["space"] else "base settings"
        raise PipelineError(f"STUDY={study} was made with another {what}; name a new study "
                            "(STUDY=...) for this one")
    before = made.user_attrs.get("scoring")
    if before is None:
        made.set_user_attr("scoring", scored)
    elif before != scored:
        raise PipelineError(f"STUDY={study} scores its trials with {_words(before, base)}; this "
                            f"command asks {_words(scored, base)}, and trials scored differently "
                            "cannot be ranked together: give the same, or name a new study (STUDY=...)")
    return made


def requeue_stopped(made: Any, journal: bool) -> int:
    """Trials a stopped worker left behind are queued again once (their run resumes): those a Ctrl-C
    interrupted and, on the journal, those a killed process left running (marked failed first).
    Called under the project lock, when no other command of this project can be running one."""
    from optuna.trial import TrialState

    trials = made.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    waiting = [t.system_attrs.get("fixed_params") for t in trials if t.state == TrialState.WAITING]
    queued = 0
    for trial in trials:
        left_running = journal and trial.state == TrialState.RUNNING
        interrupted = trial.state == TrialState.FAIL and trial.user_attrs.get("outcome") == "interrupted"
        if left_running:
            made._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        if not (left_running or interrupted) or trial.number in retried:
            continue
        how = "was left running by a stopped worker: marked failed" if left_running else \
            "was interrupted"
        if trial.params in waiting:  # already queued by hand or by an earlier retry
            print(f"tune: trial {trial.number} {how}; its settings are already queued")
            continue
        made.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        waiting.append(trial.params)
        queued += 1
        print(f"tune: trial {trial.number} {how}, its settings queued again (its run resumes)")
    return queued


def load(paths: Paths, study: str, url: str | None) -> Any:
    import optuna

    check_name(study, "STUDY")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial says it all
    if not url and not (studies_dir(paths) / study / "journal.log").is_file():
        raise PipelineError(f"STUDY={study}: no such study in {studies_dir(paths)}")
    try:
        return optuna.load_study(study_name=study, storage=storage(paths, study, url))
    except KeyError:
        raise PipelineError(f"STUDY={study}: no such study in that storage") from None


def status(paths: Paths, study: str, url: str | None, made: Any = None) -> str:
    from optuna.trial import TrialState

    made = made or load(paths, study, url)
    trials = made.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    lines = [f"study {study}: " + ", ".join(f"{counts[s]} {s.name.lower()}" for s in
                                             (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                              TrialState.RUNNING, TrialState.WAITING))]
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)[:5]
    for t in done:
        lines.append(f"  trial {t.number:>3}  {t.value:.4f}  {t.user_attrs.get('run', '')}  "
                     f"{params_text(t.params)}")
    return "\n".join(lines)


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def progress(made: Any, trial: Any) -> None:
    """One line per finished trial: number, settings, score or where it was pruned, time."""
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else float("nan")
    # A pruned trial's value is its last report, not a score: say where it stopped instead.
    outcome = f"{trial.value:.4f}" if trial.state.name == "COMPLETE" else str(
        trial.user_attrs.get("outcome", trial.state.name.lower()))
    print(f"tune: trial {trial.number:>3}  {outcome:<22}  {seconds:6.1f}s  {params_text(trial.params)}",
          flush=True)

