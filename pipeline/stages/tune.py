"""The tune stage: an Optuna study whose trials are runs.

Each trial samples settings from the search space (tune.toml), trains the run of those settings
like `make train` (its own folder under runs/, resumable), reports each epoch's validation accuracy
so a pruner can stop a hopeless trial, and scores the run by its out-of-fold accuracy (or, with
TUNE_FOLDS=k, by the mean validation accuracy of its first k folds). Trials that train every fold
are predicted too, so they are complete runs that `make blend` can use.

Storage: by default a journal file in runs/tune/<study>/ (Optuna's JournalStorage: safe for several
processes on one machine); STORAGE= takes any database URL Optuna accepts, e.g. a PostgreSQL server
shared by several machines, where a heartbeat marks the trial of a lost worker failed and retries it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from pipeline.config import FOLD_SETTINGS, Paths, Settings, allowed, coerce, validate
from pipeline.errors import PipelineError
from pipeline.store.artifacts import Prepared, check_name, run_dir, run_id, studies_dir
from pipeline.store.io import atomic_write_text, write_json

Stages = tuple[Callable[..., Any], Callable[..., Any]]  # train.run, predict.run
HEARTBEAT_S, GRACE_S = 20, 60  # a database worker silent for a minute has lost its trial


# -- the search space -----------------------------------------------------------------------------

def load_space(path: Path) -> dict[str, dict[str, Any]]:
    """The space file, checked: every key a setting that changes learning (and not one that moves
    the folds), every entry of the right types, every range non-empty and inside the setting's own
    range. Choices come back as values of the setting's type."""
    try:
        space = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PipelineError(f"SPACE={path}: cannot read it ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"SPACE={path}: not valid TOML: {exc}") from exc
    known = {f.name: f for f in fields(Settings) if f.metadata["learns"]}
    if not space:
        raise PipelineError(f"SPACE={path}: no parameters to search")
    return {name: _space_entry(f"{path}: [{name}]", name, entry, known) for name, entry in space.items()}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _space_entry(where: str, name: str, entry: Any, known: dict[str, Any]) -> dict[str, Any]:
    if name in FOLD_SETTINGS:
        raise PipelineError(f"{where}: {name} decides which rows each fold holds, and every trial "
                            "is scored on the base's folds; search it as studies of their own "
                            f"(make tune {name.upper()}=... STUDY=...), not inside one")
    if name not in known:
        raise PipelineError(f"{where}: unknown parameter; known: "
                            f"{', '.join(k for k in known if k not in FOLD_SETTINGS)}")
    field = known[name]
    if not isinstance(entry, dict) or ("choices" in entry) == ("low" in entry or "high" in entry):
        raise PipelineError(f"{where}: give either choices = [...] or low = ... and high = ...")
    extra = sorted(set(entry) - {"choices", "low", "high", "log"})
    if extra:
        raise PipelineError(f"{where}: unknown key(s) {', '.join(extra)}; a parameter takes "
                            "choices = [...], or low, high and log = true|false")
    if "log" in entry and not isinstance(entry["log"], bool):
        raise PipelineError(f"{where}: log must be true or false, got {entry['log']!r}")
    if "choices" in entry:
        choices = entry["choices"]
        if entry.get("log"):
            raise PipelineError(f"{where}: log = true is for a low/high range, not for choices")
        if not isinstance(choices, list):
            raise PipelineError(f"{where}: choices must be a list, e.g. choices = [{field.default!r}], "
                                f"got {choices!r}")
        if not choices:
            raise PipelineError(f"{where}: an empty range (choices is empty)")
        values = [coerce(field, value, where) for value in choices]
        for value in values:
            validate(replace(Settings(), **{name: value}), where)
        return {**entry, "choices": values}
    if "low" not in entry or "high" not in entry:
        raise PipelineError(f"{where}: an empty range (low or high is missing)")
    if isinstance(field.default, bool | str):
        raise PipelineError(f"{where}: {name} has no range; give choices = [...] "
                            f"({allowed(field)})")
    for key in ("low", "high"):
        if not _number(entry[key]) or entry[key] != entry[key]:
            raise PipelineError(f"{where}: {key} must be a number, got {entry[key]!r}")
        validate(replace(Settings(), **{name: coerce(field, entry[key], f"{where} {key}")}), where)
    if not entry["low"] < entry["high"]:
        raise PipelineError(f"{where}: an empty range: low = {entry['low']} is not below "
                            f"high = {entry['high']}")
    if entry.get("log") and entry["low"] <= 0:
        raise PipelineError(f"{where}: a log scale needs low > 0")
    return entry


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = {}
    for name, entry in space.items():
        if "choices" in entry:
            params[name] = trial.suggest_categorical(name, entry["choices"])
        elif isinstance(Settings.__dataclass_fields__[name].default, int):
            params[name] = trial.suggest_int(name, int(entry["low"]), int(entry["high"]),
                                             log=bool(entry.get("log")))
        else:
            params[name] = trial.suggest_float(name, float(entry["low"]), float(entry["high"]),
                                               log=bool(entry.get("log")))
    return params


# -- storage and study ----------------------------------------------------------------------------

def hide_password(url: str, text: str | None = None) -> str:
    """text (the url itself by default) with no part of the url's password: everything between the
    user's ':' and the last '@' is the password, since a password may hold '@' itself."""
    found = re.search(r"//[^:/@]*:(.*)@", url)
    text = url if text is None else text
    if not found or not found.group(1):
        return text
    from urllib.parse import unquote

    text = text.replace(f":{found.group(1)}@", ":***@")
    for secret in {found.group(1), unquote(found.group(1))}:  # a driver may print it decoded
        text = text.replace(secret, "***")
    return text


def storage(paths: Paths, study: str, url: str | None) -> Any:
    import optuna

    if not url:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        folder = studies_dir(paths) / study
        folder.mkdir(parents=True, exist_ok=True)
        log = str(folder / "journal.log")
        return optuna.storages.JournalStorage(JournalFileBackend(log, JournalFileOpenLock(log)))
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S, heartbeat_stale_trial_callback=(
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)))
        except Exception as exc:  # the driver's own errors (unreachable host, bad password...)
            # Machines starting at once race to create Optuna's tables; the loser tries again.
            if "UniqueViolation" in str(exc) and attempt < 2:
                time.sleep(1 + attempt)
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"STORAGE={hide_password(url)}: cannot use this database "
                                f"({hide_password(url, first)})") from None
    raise AssertionError("unreachable")


def scoring(base: Settings, tune_folds: int, pruner: str) -> dict[str, Any]:
    """How a study's trials are scored: on their first k folds (k = all of them when TUNE_FOLDS=0)
    and which pruner stops them. Trials scored otherwise cannot be ranked against each other."""
    return {"scored on folds": min(tune_folds or base.folds, base.folds), "pruner": pruner}


def _words(scored: dict[str, Any], base: Settings) -> str:
    k = scored.get("scored on folds")
    folds = "all folds" if k == base.folds else f"TUNE_FOLDS={k}"
    return f"{folds}, PRUNER={scored.get('pruner')}"


def open_study(paths: Paths, study: str, url: str | None, space: dict[str, Any],
               pruner: str, base: Settings, seed: int | None = None,
               tune_folds: int = 0) -> Any:
    """The study, made or continued; refused when it was made with another space, base or scoring.

    seed: the sampler's, mixed with the number of trials the study already has, so a continued
    study draws new settings rather than those of its first session again (and stays reproducible).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial says it all
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    pruners = {"median": optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=30),
               "wilcoxon": optuna.pruners.WilcoxonPruner(p_threshold=0.1),
               "none": optuna.pruners.NopPruner()}
    made = optuna.create_study(storage=storage(paths, study, url), study_name=study,
                               direction="maximize", load_if_exists=True, pruner=pruners[pruner])
    have = len(made.get_trials(deepcopy=False))
    made.sampler = optuna.samplers.TPESampler(
        n_startup_trials=8, seed=None if seed is None else (seed * 1_000_003 + have) % 2**32)
    described = json.dumps({"space": space, "base": base.learned()}, sort_keys=True, default=str)
    scored = scoring(base, tune_folds, pruner)
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
    """Trials a stopped worker left behind are tried again, their settings queued (so their run
    resumes where it stopped): with the embedded journal, trials left running by a killed process
    (marked failed first); with any storage, trials a Ctrl-C interrupted. Each is queued once.

    Only called under the project lock, when no other command of this project can be running one.
    """
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


# -- one trial ------------------------------------------------------------------------------------

class Objective:
    """Train (and, with every fold, predict) the run of a trial's settings; return its score.

    stages: the train and predict stages' run functions (given by the command line, so this stage
    imports no other)."""

    def __init__(self, paths: Paths, base: Settings, space: dict[str, Any], data: Prepared,
                 fold_of: Any, tune_folds: int, pruner: str, stages: Stages) -> None:
        self.paths, self.base, self.space, self.data, self.fold_of = paths, base, space, data, fold_of
        self.tune_folds, self.pruner, self.stages = tune_folds, pruner, stages

    def __call__(self, trial: Any) -> float:
        try:
            return self._score(trial)
        except PipelineError as exc:  # the trial fails (Optuna goes on); its line says why
            trial.set_user_attr("outcome", f"failed: {exc}")
            raise
        except KeyboardInterrupt:  # failed by Optuna; the next `make tune` queues it again
            trial.set_user_attr("outcome", "interrupted")
            raise

    def _score(self, trial: Any) -> float:
        from filelock import FileLock, Timeout

        cfg = validate(replace(self.base, **suggest(trial, self.space)), f"trial {trial.number}")
        run = run_dir(self.paths, run_id(cfg, self.data.data_key))
        trial.set_user_attr("run", run.id)
        # Two workers that drew the same settings share one run folder: one trains, the other
        # waits and then finds the run current.
        lock = FileLock(self.paths.runs / f".train-{run.id}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"tune: trial {trial.number}: its run {run.id} is being trained by another "
                  "trial; waiting for it", flush=True)
            lock.acquire()
        try:
            return self._train(trial, cfg, run)
        finally:
            lock.release()

    def _train(self, trial: Any, cfg: Settings, run: Any) -> float:
        import optuna

        train_run, predict_run = self.stages
        folds = list(range(min(self.tune_folds or cfg.folds, cfg.folds)))

        def on_epoch(fold: int, epoch: int, valid_acc: float) -> None:
            if self.pruner == "wilcoxon":
                return
            trial.report(valid_acc, fold * 1000 + round(100 * epoch / cfg.epochs))
            if trial.should_prune():
                trial.set_user_attr("outcome", f"pruned at fold {fold} epoch {epoch}")
                raise optuna.TrialPruned()

        records = []
        for fold in folds:  # fold by fold, so the Wilcoxon pruner can stop between them
            records += train_run(cfg, self.paths, run, self.data, self.fold_of, folds=[fold],
                                 on_epoch=on_epoch)
            if self.pruner == "wilcoxon":
                trial.report(records[-1]["valid_acc"], fold)
                if trial.should_prune():
                    trial.set_user_attr("outcome", f"pruned after fold {fold}")
                    raise optuna.TrialPruned()
        if len(folds) == cfg.folds:
            made = predict_run(cfg, self.paths, run, self.data, self.fold_of, records, publish=False)
            return float(made["oof_acc"])
        return sum(r["valid_acc"] for r in records) / len(records)


def progress(made: Any, trial: Any) -> None:
    """One line per finished trial: number, settings, score or where it was pruned, time."""
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else float("nan")
    settings = params_text(trial.params)
    if trial.state.name == "COMPLETE":
        outcome = f"{trial.value:.4f}"
    else:  # a pruned trial's value is its last report, not a score: say where it stopped instead
        outcome = str(trial.user_attrs.get("outcome", trial.state.name.lower()))
    print(f"tune: trial {trial.number:>3}  {outcome:<22}  {seconds:6.1f}s  {settings}", flush=True)


# -- the stage ------------------------------------------------------------------------------------

def run(paths: Paths, base: Settings, data: Prepared, fold_of: Any, stages: Stages, study: str,
        trials: int, workers: int = 1, url: str | None = None, space_path: Path | None = None,
        tune_folds: int = 0, pruner: str = "median") -> dict[str, Any]:
    """Run trials until the study has `trials` finished ones (complete or pruned); returns a summary."""
    import optuna
    from optuna.trial import TrialState

    check_name(study, "STUDY")
    for name, value, low in (("TRIALS", trials, 1), ("WORKERS", workers, 1), ("TUNE_FOLDS", tune_folds, 0)):
        if value < low:
            raise PipelineError(f"{name}={value} is out of range; it must be a whole number from {low}")
    space = load_space(space_path or paths.root / "tune.toml")
    # One worker on its own storage is reproducible (SEED); workers sharing a study must not all
    # draw the same settings, so they draw unseeded.
    made = open_study(paths, study, url, space, pruner, base,
                      seed=base.seed if workers == 1 and not url else None, tune_folds=tune_folds)
    requeue_stopped(made, journal=not url)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    have = len(made.get_trials(deepcopy=False, states=finished))
    started = time.perf_counter()
    if have >= trials:
        print(f"tune: study {study} already has {have} finished trials (TRIALS={trials}); "
              f"TRIALS={have + 10} adds 10 more")
    else:
        print(f"tune: study {study}: {have} finished trials, running until {trials} "
              f"({workers} worker(s), {'TUNE_FOLDS=' + str(tune_folds) if tune_folds else 'all folds'}, "
              f"pruner {pruner})")
        # Each worker runs its share of what is missing; the callback stops all at the study's total
        # (several machines on one database may overshoot it by a trial or so each).
        shares = [(trials - have) // workers + (i < (trials - have) % workers) for i in range(workers)]
        args = (str(paths.root), asdict(base), space, study, url, trials, tune_folds, pruner, workers,
                stages)
        try:
            if workers > 1:
                _run_workers(args, shares)
            else:
                _optimize(made, paths, base, space, data, fold_of, trials, tune_folds, pruner,
                          shares[0], stages)
        except KeyboardInterrupt:
            # Stopped: the trials that completed still make best.toml and the summary.
            summarize(paths, made, study, base, time.perf_counter() - started, optuna)
            raise
    return summarize(paths, made, study, base, time.perf_counter() - started, optuna)


def _run_workers(args: tuple[Any, ...], shares: list[int]) -> None:
    """WORKERS=n trial processes. A Ctrl-C (or a SIGINT to this process alone) reaches every worker:
    each marks its trial interrupted and stops; then this one stops too."""
    import signal
    from concurrent.futures import ProcessPoolExecutor, wait
    from multiprocessing import get_context

    with ProcessPoolExecutor(len(shares), mp_context=get_context("spawn"),
                             initializer=signal.signal,
                             initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        futures = [pool.submit(_worker, *args, share) for share in shares if share]
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


def _optimize(made: Any, paths: Paths, base: Settings, space: dict[str, Any], data: Prepared,
              fold_of: Any, trials: int, tune_folds: int, pruner: str, share: int,
              stages: Stages) -> None:
    import optuna
    from optuna.trial import TrialState

    objective = Objective(paths, base, space, data, fold_of, tune_folds, pruner, stages)
    stop = optuna.study.MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    made.optimize(objective, n_trials=share, callbacks=[stop, progress], catch=(PipelineError,))


def _worker(root: str, base_fields: dict[str, Any], space: dict[str, Any], study: str,
            url: str | None, trials: int, tune_folds: int, pruner: str, workers: int,
            stages: Stages, share: int) -> None:
    """One trial process of WORKERS=n: its share of the cores, the same study. SIGINT stops it only
    while it works (idle, it ignores SIGINT, so a Ctrl-C never leaves a traceback of an idle one)."""
    import signal

    import torch

    from pipeline.store.artifacts import load_prepared, read_folds

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        paths, base = Paths(Path(root)), Settings(**base_fields)
        made = open_study(paths, study, url, space, pruner, base, tune_folds=tune_folds)
        _optimize(made, paths, base, space, load_prepared(paths), read_folds(paths), trials,
                  tune_folds, pruner, share, stages)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def summarize(paths: Paths, made: Any, study: str, base: Settings, seconds: float,
              optuna: Any) -> dict[str, Any]:
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
    lines += [f"{k} = {_toml(v)}" for k, v in settings.items()]
    atomic_write_text(best_toml, "\n".join(lines) + "\n")
    write_json(folder / "summary.json", {"counts": counts, "best": best.number, "value": best.value,
                                         "params": best.params, "seconds": seconds})
    print(f"tune: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed "
          f"in {seconds:.0f}s; best: trial {best.number} ({best.value:.4f}) "
          f"{best.user_attrs.get('run', '')}")
    print(f"tune: wrote {best_toml.relative_to(paths.root)}; train it on all folds with "
          f"`make submit CONFIG={best_toml.relative_to(paths.root)}`")
    return {"counts": counts, "best": best.number, "value": best.value, "params": best.params}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "nan"
    return str(value)


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def load(paths: Paths, study: str, url: str | None) -> Any:
    """An existing study, or a clear error."""
    import optuna

    check_name(study, "STUDY")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial says it all
    if not url and not (studies_dir(paths) / study / "journal.log").is_file():
        raise PipelineError(f"STUDY={study}: no such study in {studies_dir(paths)}")
    try:
        made = optuna.load_study(study_name=study, storage=storage(paths, study, url))
    except KeyError:
        raise PipelineError(f"STUDY={study}: no such study in that storage") from None
    return made


def status(paths: Paths, study: str, url: str | None, made: Any = None) -> str:
    """Trials so far by state, and the best five."""
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


def report(paths: Paths, study: str, url: str | None) -> Path:
    """reports/study-<name>/index.html: the optimisation history and the parameter importances,
    drawn by Optuna's own matplotlib plots."""
    import html

    from optuna.visualization import matplotlib as plots

    from pipeline.page import CSS, pyplot

    made = load(paths, study, url)
    text = status(paths, study, url, made)
    plt = pyplot()
    out = paths.reports / f"study-{study}"
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, draw in (("history", plots.plot_optimization_history),
                       ("importances", plots.plot_param_importances)):
        try:
            axes = draw(made)
        except (ValueError, RuntimeError) as exc:  # importances need two complete trials and more
            figures.append(f"<p>{name}: not drawn yet ({html.escape(str(exc))})</p>")
            continue
        axes.figure.set_size_inches(8, 4.5)
        axes.figure.tight_layout()
        axes.figure.savefig(out / f"{name}.png", dpi=100)
        plt.close(axes.figure)
        figures.append(f'<h2>{name}</h2><img src="{name}.png" alt="{name}">')
    page = out / "index.html"
    atomic_write_text(page, f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>digits: study {html.escape(study)}</title>
<style>{CSS}</style></head><body><h1>Study {html.escape(study)}</h1>
<pre>{html.escape(text)}</pre>{''.join(figures)}</body></html>
""")
    print(f"report: study {study}: wrote {page}")
    return page
