"""Atomic file writes: a reader never sees a half-written file, and a failure leaves none behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import PipelineError

_UMASK = os.umask(0o022)  # reading the umask means setting it: done once, at import
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over the target on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise PipelineError(f"{path.parent}: cannot write here ({exc.strerror})") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); give it the mode a plain open() would have.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot write ({exc.strerror})") from exc
    finally:
        tmp.unlink(missing_ok=True)


def replace_together(moves: list[tuple[Path, Path]], keep: Path | None = None) -> None:
    """Rename each staged file over its target, all or none (train.csv and test.csv are a pair).

    Each existing target is first kept under a second name (a hard link where the file system has
    them, so the target never goes missing). If a rename fails or the run is interrupted, every
    target is put back as it was; a target that cannot be put back is named with where it is kept.
    Once all are replaced, what they held is deleted, or moved into the folder keep.
    """
    done: list[tuple[Path, Path | None]] = []
    target = moves[0][1]
    try:
        for staged, target in moves:
            kept = None
            if target.exists():
                kept = target.with_name(f".{target.name}.{os.getpid()}.old")
                kept.unlink(missing_ok=True)
                try:
                    os.link(target, kept)
                except OSError:  # no hard links here: move it aside instead
                    os.replace(target, kept)
            done.append((target, kept))
            os.replace(staged, target)
    except BaseException as exc:
        if lost := _put_back(done):
            print(f"WARNING: could not put back {', '.join(lost)}", flush=True)
        if lost or not isinstance(exc, OSError):
            raise
        raise PipelineError(f"{target}: cannot write ({exc.strerror}); "
                            f"{', '.join(t.name for _, t in moves)} are as they were") from exc
    for target, kept in done:
        if kept is not None and keep is not None:
            try:
                keep.mkdir(parents=True, exist_ok=True)
                os.replace(kept, keep / target.name)
            except OSError as exc:
                print(f"WARNING: {target.name} as it was is kept as {kept}, not in {keep} ({exc.strerror})")
        elif kept is not None:
            kept.unlink(missing_ok=True)


def _put_back(done: list[tuple[Path, Path | None]]) -> list[str]:
    """Undo replace_together's renames; returns what could not be restored, and where it is kept."""
    lost = []
    for target, kept in reversed(done):
        try:
            if kept is None:
                target.unlink(missing_ok=True)
            elif target.exists() and os.path.samefile(kept, target):
                kept.unlink()  # never replaced: rename() between two links of one file does nothing
            else:
                os.replace(kept, target)
        except OSError:
            lost.append(f"{target} (kept as {kept})" if kept else str(target))
    return lost


@contextlib.contextmanager
def staged_files(folder: Path, names: list[str]) -> Iterator[list[Path]]:
    """Temporary paths in folder (so a final rename stays on its file system), removed on exit."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    except OSError as exc:
        raise PipelineError(f"{folder}: cannot write here ({exc.strerror})") from exc
    try:
        yield [tmp / name for name in names]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or unreadable (callers then redo the work)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_csv(path: Path, frame: Any, **kwargs: Any) -> None:
    """Write a pandas DataFrame atomically."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, index=False, lineterminator="\n", **kwargs)
