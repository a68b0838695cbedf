"""Publishing a submission, and the record of every one: one JSON object per line in
submissions/runs.jsonl, which `make clean` keeps (each entry names a kept submission beside it).

The file is append-only: an entry is one line written with a single write and fsynced, so an
interrupted run leaves at worst one torn last line, which the reader skips (`make runs` and `make lb`
name it) and the writer ends before appending: it never swallows the next entry.

Three kinds of entry share it: a run's (no `kind`: predict and blend), an upload's (`kind: upload`:
Kaggle's reference, the run that made the file, status pending) and a score's (`kind: score`: a later
status of that reference, with the public score). An upload is recorded as soon as Kaggle takes it,
so a score that never comes loses nothing; the latest entry of a reference is its state.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.config import Paths, changed_settings
from pipeline.errors import PipelineError
from pipeline.store.io import write_csv
from pipeline.store.run import RunDir, RunRecord, latest, set_latest
from pipeline.store.submission import validate_file


def runs_path(paths: Paths) -> Path:
    return paths.submissions / "runs.jsonl"


def add(paths: Paths, entry: dict[str, Any]) -> None:
    """Append one run to the record: model, oof_acc, seconds, device, submission (the kept copy's
    name), source, and config (`changed` is derived from it) or changed; `time` (local, ISO 8601)
    is filled in when missing."""
    entry = dict(entry)
    entry.setdefault("time", datetime.now().astimezone().isoformat(timespec="seconds"))
    if "changed" not in entry and "config" in entry:
        entry["changed"] = changed_settings(entry["config"])
    line = json.dumps(entry, sort_keys=True, default=str).encode("utf-8") + b"\n"
    path = runs_path(paths)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # A torn last line from an interrupted write would swallow this entry: end it first.
            if (end := os.lseek(fd, 0, os.SEEK_END)) > 0:
                os.lseek(fd, end - 1, os.SEEK_SET)
                if os.read(fd, 1) != b"\n":
                    line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot record the run ({exc.strerror})") from exc


def read(paths: Paths) -> tuple[list[dict[str, Any]], list[int]]:
    """Every recorded run, oldest first, and the numbers of the lines skipped (torn or damaged)."""
    path = runs_path(paths)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the record of runs ({exc.strerror})") from exc
    found = {number: _entry(raw) for number, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()}
    return [e for e in found.values() if e is not None], [n for n, e in found.items() if e is None]


def _entry(line: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(line.decode("utf-8"))  # a torn or edited line is no JSON object: None
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def warn_damaged(paths: Paths, stage: str) -> None:
    """Name, once per command, the lines of the record that cannot be read: they are skipped and
    every other line is read."""
    if skipped := read(paths)[1]:
        lines = f"line{'s' if len(skipped) > 1 else ''} {', '.join(map(str, skipped))}"
        print(f"{stage}: warning: {runs_path(paths)}: {lines} not a JSON record (a write cut short, or "
              "edited by hand); skipped, the other lines are read", file=sys.stderr)


def run_entries(paths: Paths) -> list[dict[str, Any]]:
    """The entries of runs (predict and blend), oldest first; uploads and scores left out."""
    return [e for e in read(paths)[0] if "kind" not in e]


def made_by(paths: Paths) -> tuple[str | None, str | None]:
    """The run (or blend) that made submissions/submission.csv as it is now, and its kept copy's
    name: the newest recorded run whose kept copy holds the same bytes; else runs/latest when its
    own submission does (then no kept copy is known); else (None, None)."""
    try:
        current = paths.submission_csv.read_bytes()
    except OSError:
        return None, None
    for entry in reversed(run_entries(paths)):
        kept = paths.submissions / str(entry.get("submission", ""))
        if entry.get("run") and _holds(kept, current):
            return str(entry["run"]), kept.name
    name = latest(paths)
    return (name, None) if name and _holds(paths.runs / name / "submission.csv", current) else (None, None)


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def add_upload(paths: Paths, ref: int, run: str | None, kept: str | None, message: str) -> None:
    """Record a submission Kaggle took (status pending until a score entry says otherwise)."""
    add(paths, {"kind": "upload", "ref": ref, "run": run, "kept": kept, "message": message,
                "status": "pending"})


def add_score(paths: Paths, ref: int, run: str | None, status: str, public_score: float | None,
              error: str = "") -> None:
    """Record what Kaggle says of an uploaded submission now: complete (with its public score),
    error (with Kaggle's reason) or pending."""
    add(paths, {"kind": "score", "ref": ref, "run": run, "status": status,
                "public_score": public_score, "error": error or None})


def uploads(paths: Paths) -> dict[int, dict[str, Any]]:
    """Every recorded upload by Kaggle reference, in upload order, merged with its latest score:
    ref, run, kept, message, time (of the upload), status, public_score, error, scored (time)."""
    found: dict[int, dict[str, Any]] = {}
    for entry in read(paths)[0]:
        try:
            ref = int(entry.get("ref") or 0)
        except (TypeError, ValueError):
            continue
        if entry.get("kind") == "upload" and ref:
            found[ref] = {"public_score": None, "error": None, **entry}
        elif entry.get("kind") == "score" and ref in found:
            found[ref].update(status=entry.get("status"), public_score=entry.get("public_score"),
                              error=entry.get("error"), scored=entry.get("time"))
    return found


def leaderboard_by_run(paths: Paths) -> dict[str, dict[str, Any]]:
    """Each run's latest upload (as in uploads), by run id."""
    return {str(u["run"]): u for u in uploads(paths).values() if u.get("run")}


def score_text(upload: dict[str, Any] | None) -> str:
    """An upload's public score as Kaggle shows it (0.97100), else its status; '' for none."""
    score, status = (upload or {}).get("public_score"), (upload or {}).get("status")
    if status == "complete" and isinstance(score, int | float):
        return f"{score:.5f}"
    return str(status or "")


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


def publish(paths: Paths, run: RunDir, record: RunRecord, expected_rows: int, new: bool) -> RunRecord:
    """Make the run's submission the current one (submissions/submission.csv) after checking it
    against the test set as it is now; a new one also gets a kept copy and a line in runs.jsonl.
    Returns the record, naming its kept copy."""
    frame = validate_file(run.submission, expected_rows)
    outputs = [paths.submission_csv]
    if paths.also_submit is not None and paths.also_submit.resolve() != paths.submissions.resolve():
        outputs.append(paths.also_submit / "submission.csv")
    for output in outputs:
        if not _holds(output, run.submission.read_bytes()):
            write_csv(output, frame)
            if output != paths.submission_csv:
                print(f"submission: also written to {output} (the notebook's output)")
    if new or not record.kept or not (paths.submissions / record.kept).is_file():
        mark = f"-tta{record.tta}" if record.tta else ""
        kept = _unique(paths.submissions / f"{time.strftime('%Y%m%d-%H%M%S')}-{record.model}"
                       f"-cv{record.accuracy:.4f}{mark}.csv")
        write_csv(kept, frame)
        record = run.save(replace(record, kept=kept.name))
        add(paths, {"run": run.id, "model": record.model, "config": record.config, "oof_acc": record.oof_acc,
                    "oof_acc_tta": record.oof_acc_tta, "oof_acc_honest": record.oof_acc_honest,
                    "tta": record.tta, "seconds": record.seconds, "device": record.where,
                    "submission": kept.name, "source": record.source})
    set_latest(paths, run.id)
    return record


def _unique(target: Path) -> Path:
    n, base = 1, target
    while target.exists():
        n += 1
        target = base.with_name(f"{base.stem}-{n}.csv")
    return target


def one_line(value: Any) -> str:
    """A table cell as text on one line: a line break or other control character (a description
    typed with a newline) is shown escaped (\\n), so it never splits its row nor reaches the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(value))


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str, empty: str = "",
                 footer: str = "") -> str:
    """Rows as CSV (fmt "csv") or as an aligned text table with a rule under the header and footer
    after it (empty, when given, in place of a table of no rows)."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    if empty and not rows:
        return empty
    cells = [columns] + [tuple(one_line(r[c]) for c in columns) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + footer
