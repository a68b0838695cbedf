"""One command at a time per project: a lock file under runs/, held while a command writes.

The lock is an OS file lock (the filelock package), so it goes away with the process that held it:
a killed command never leaves a lock that blocks forever. Beside it, a small note says which
command holds it and since when, so the one that waits can say so.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator

from filelock import FileLock, Timeout

from pipeline.config import Paths
from pipeline.errors import PipelineError


@contextlib.contextmanager
def project_lock(paths: Paths, command: str, nowait: bool = False) -> Iterator[None]:
    try:
        paths.runs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{paths.runs}: cannot create ({exc.strerror})") from exc
    lock, note = FileLock(paths.runs / ".lock"), paths.runs / ".lock.json"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:  # who holds it, as its note says
            info = json.loads(note.read_text(encoding="utf-8"))
            holder = f"`{info['command']}` (pid {info['pid']}, since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            holder = "another command"
        if nowait:
            raise PipelineError(f"{holder} is running in this project; NOWAIT=1 so this one stops "
                                "(run it again when that one ends)") from None
        print(f"waiting: {holder} is running in this project (Ctrl-C to give up; NOWAIT=1 never "
              "waits)", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        note.write_text(json.dumps({"command": command, "pid": os.getpid(),
                                    "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        yield
    finally:
        with contextlib.suppress(OSError):
            note.unlink()
        lock.release()
