"""`make runs` (every run side by side) and `make forget` (delete one run's folder)."""

from __future__ import annotations

import shutil
import sys
from datetime import datetime
from typing import Any

from pipeline.config import Paths, describe_changes
from pipeline.errors import PipelineError
from pipeline.options import default
from pipeline.store.ledger import (
    format_seconds,
    format_table,
    leaderboard_by_run,
    score_text,
    warn_damaged,
)
from pipeline.store.run import STUDIES, RunDir, all_runs, latest, run_dir

COLUMNS = ("run", "model", "changed settings", "OOF acc", "LB", "log loss", "fold spread", "time",
           "device", "source", "size", "finished")


def size_text(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def rows(paths: Paths, sort: str = default("sort")) -> list[dict[str, Any]]:
    out = []
    board = leaderboard_by_run(paths)  # the public score of each run's latest upload
    for run in all_runs(paths):
        try:
            out.append(_row(run, board))
        except PipelineError as exc:
            # One damaged folder is named, and the others are still shown.
            print(f"runs: {run.id}: damaged record ({exc}); {run.remake()}, "
                  f"`make forget RUN={run.id}` deletes it", file=sys.stderr)
            out.append({**dict.fromkeys(COLUMNS, ""), "run": run.id, "size": size_text(run.size()),
                        "finished": "(damaged record)", "_acc": -2.0, "_time": 0.0})
    out.sort(key=lambda r: r["_acc" if sort == "acc" else "_time"], reverse=True)
    return out


def _row(run: RunDir, board: dict[str, Any]) -> dict[str, Any]:
    """The table's row of one run folder; a PipelineError when its record is damaged."""
    record = run.completed()
    config = run.settings()
    if record is None:
        state = "(not complete)" if run.config.is_file() else "(interrupted, settings not recorded)"
        return {**dict.fromkeys(COLUMNS, ""), "run": run.id, "model": config.get("model", ""),
                "changed settings": describe_changes(config) if config else "",
                "size": size_text(run.size()), "finished": state, "_acc": -1.0, "_time": 0.0}
    if run.is_blend:
        changed = "blend: " + record.members().replace(", ", " ")
        acc = f"{record.accuracy:.4f} (in-sample {record.oof_acc:.4f})"
    else:
        changed = describe_changes(record.config) or "(defaults)"
        acc = f"{record.oof_acc:.4f}"
        if record.oof_acc_tta is not None:
            acc += f" ({record.oof_acc_tta:.4f} with TTA={record.tta})"
    finished = datetime.fromtimestamp(record.finished).strftime("%Y-%m-%d %H:%M")
    return {"run": run.id, "model": record.model, "changed settings": changed,
            "OOF acc": acc, "LB": score_text(board.get(run.id)), "log loss": f"{record.oof_loss:.4f}",
            "fold spread": f"{record.fold_min:.4f}-{record.fold_max:.4f}",
            "time": format_seconds(record.seconds), "device": record.where,
            "source": record.source, "size": size_text(run.size()),
            "finished": finished, "_acc": record.accuracy, "_time": record.finished}


def table(paths: Paths, sort: str = default("sort"), fmt: str = default("format")) -> str:
    found, last = rows(paths, sort), latest(paths)
    footer = f"\n{len(found)} run(s) in {paths.runs}" + (f"; latest: {last}" if last else "")
    return format_table(found, COLUMNS, fmt, f"no runs yet in {paths.runs}; `make submit` makes one", footer)


def run(paths: Paths, sort: str = default("sort"), fmt: str = default("format")) -> str:
    warn_damaged(paths, "runs")
    text = table(paths, sort, fmt)
    sys.stdout.write(text + "\n")
    return text


def forget(paths: Paths, name: str) -> int:
    """Delete one run's folder, and nothing else; returns the bytes freed."""
    if name == STUDIES:
        raise PipelineError(f"RUN={name}: {paths.runs / STUDIES} holds the tuning studies, not a run, "
                            "so forget leaves it alone; `make tune-status STUDY=<name>` shows a study, "
                            f"and deleting its folder {paths.runs / STUDIES}/<name>/ removes it "
                            "(its trials' runs stay)")
    run = run_dir(paths, name)
    if run.path.is_symlink() or not run.path.is_dir() or run.path.resolve().parent != paths.runs.resolve():
        raise PipelineError(f"RUN={name}: no such run in {paths.runs}; `make runs` lists them")
    size = run.size()
    shutil.rmtree(run.path)
    if latest(paths) == name:
        (paths.runs / "latest").unlink(missing_ok=True)
    print(f"forget: deleted {run.path} ({size_text(size)}); submissions/ keeps its submissions")
    return size
