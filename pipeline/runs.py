"""The record of every finished run: one JSON object per line in submissions/runs.jsonl.

It lives in submissions/ because each entry names a kept submission in that folder and because
`make clean` keeps that folder: the history of runs should outlive the logs of the latest one.

The file is append-only. An entry is one line written with a single write, then flushed and
fsynced, so an interrupted run leaves at worst one torn last line. The reader skips lines it cannot
parse, and the writer starts on a fresh line when the file does not end with one, so a torn line
never swallows the next entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.config import Paths, TrainConfig
from pipeline.errors import PipelineError

# Settings that say where and how fast a run went, not what it learned; the table shows the device
# in its own column, so they are left out of "changed".
NOT_HYPERPARAMETERS = ("device", "jobs", "eval_batch")

COLUMNS = ("when", "model", "changed settings", "OOF acc", "time", "device", "source", "submission")


def runs_path(paths: Paths) -> Path:
    return paths.submissions / "runs.jsonl"


def changed_settings(config: dict[str, Any] | TrainConfig) -> dict[str, Any]:
    """The hyperparameters of a config that differ from TrainConfig()'s defaults."""
    values = asdict(config) if isinstance(config, TrainConfig) else dict(config)
    defaults = asdict(TrainConfig())
    return {name: values[name] for name in (f.name for f in fields(TrainConfig))
            if name in values and name not in NOT_HYPERPARAMETERS and values[name] != defaults[name]}


def record(paths: Paths, entry: dict[str, Any]) -> None:
    """Append one run to the record.

    Expected fields: model, oof_acc, seconds, device, submission (the kept copy's file name), source,
    and either config (the full settings; `changed` is derived from it) or changed. `time` is filled
    in (local time, ISO 8601) when missing.
    """
    entry = dict(entry)
    entry.setdefault("time", datetime.now().astimezone().isoformat(timespec="seconds"))
    if "changed" not in entry and "config" in entry:
        entry["changed"] = changed_settings(entry["config"])
    line = json.dumps(entry, sort_keys=True, default=str).encode("utf-8") + b"\n"
    path = runs_path(paths)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot record the run ({exc.strerror})") from exc
    try:
        # A torn last line from an interrupted write would swallow this entry: end it first.
        if not _ends_with_newline(path):
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot record the run ({exc.strerror})") from exc
    finally:
        os.close(fd)


def _ends_with_newline(path: Path) -> bool:
    """True for an empty file or one whose last byte ends a line."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def read(paths: Paths) -> tuple[list[dict[str, Any]], int]:
    """Every recorded run, oldest first, and how many unreadable (torn) lines were skipped."""
    path = runs_path(paths)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the record of runs ({exc.strerror})") from exc
    entries, skipped = [], 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            skipped += 1
            continue
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            skipped += 1
    return entries, skipped


def find(paths: Paths, submission: str) -> dict[str, Any] | None:
    """The recorded run that wrote the kept submission of that file name (the latest if several)."""
    entries, _ = read(paths)
    matches = [e for e in entries if e.get("submission") == submission]
    return matches[-1] if matches else None


def format_seconds(seconds: Any) -> str:
    try:
        total = float(seconds)
    except (TypeError, ValueError):
        return ""
    if total < 60:
        return f"{total:.1f}s"
    minutes, secs = divmod(round(total), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def row_of(entry: dict[str, Any], paths: Paths) -> tuple[str, ...]:
    """One entry as the table's cells; tolerant of missing fields from older records."""
    when = str(entry.get("time", ""))
    with contextlib.suppress(ValueError):  # an unparsable time is shown as written
        when = datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M")
    changed = entry.get("changed") or {}
    # The model has its own column; repeating it among the changed settings only adds width.
    changed_text = " ".join(f"{k}={v}" for k, v in changed.items() if k != "model") \
        if isinstance(changed, dict) else ""
    acc = entry.get("oof_acc")
    acc_text = f"{acc:.4f}" if isinstance(acc, (int, float)) else ""
    tta_acc = entry.get("oof_acc_tta")
    if acc_text and isinstance(tta_acc, (int, float)):
        acc_text += f" ({tta_acc:.4f} with TTA)"
    submission = str(entry.get("submission", ""))
    if submission and not (paths.submissions / submission).is_file():
        submission += " (deleted)"
    return (when, str(entry.get("model", "")), changed_text or "(defaults)", acc_text,
            format_seconds(entry.get("seconds")), str(entry.get("device", "")),
            str(entry.get("source", "")), submission)


def table(paths: Paths) -> str:
    """Every recorded run, newest first, as a plain-text table."""
    entries, skipped = read(paths)
    where = runs_path(paths)
    if not entries:
        text = f"no runs recorded yet in {where}; `make submit` records one when it finishes"
    else:
        # File order is the order the runs finished; it does not depend on clocks or time zones.
        rows = [COLUMNS] + [row_of(e, paths) for e in reversed(entries)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        text = "\n".join(lines) + f"\n{len(entries)} run(s) in {where}"
    if skipped:
        text += f"\n(skipped {skipped} unreadable line(s), e.g. from an interrupted write)"
    return text


def run(paths: Paths) -> str:
    """Print the table of runs; returns it."""
    text = table(paths)
    sys.stdout.write(text + "\n")
    return text
