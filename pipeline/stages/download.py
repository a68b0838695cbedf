"""The download stage: put train.csv and test.csv into input/ from one of several sources.

Sources: ``kaggle`` (the official client), ``dir PATH`` (files you downloaded by hand), ``sample``
(the built-in offline sample) and ``auto``: files already in input/, else (inside a Kaggle notebook)
the competition's attached files, else Kaggle when credentials exist, else the sample. Existing
files are kept unless ``force`` is set; new files land atomically.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config import COMPETITION, Paths
from pipeline.errors import PipelineError
from pipeline.kaggle import api as kaggle_api
from pipeline.kaggle import notebook
from pipeline.options import default
from pipeline.store import sample
from pipeline.store.data import SAMPLE_BANNER, data_source, source_record
from pipeline.store.io import replace_together, staged_files, write_json


def run(paths: Paths, source: str = default("source"), src_dir: Path | None = None, force: bool = False,
        timeout: float = default("timeout")) -> str:
    """Fetch the competition files; returns the source used."""
    present = [p for p in (paths.train_csv, paths.test_csv) if p.exists()]
    record = source_record(paths)
    attached = notebook.competition_input() if source == "auto" else None
    if attached and (len(present) < 2 or force or record.get("source") == "sample"):
        # Inside a Kaggle notebook the competition's files are attached: copy them (the input
        # folder is read-only and is only ever read), replacing the built-in sample if it is there.
        print(f"download: source auto -> the competition's files attached to this Kaggle notebook "
              f"({attached})")
        source, src_dir, force = "dir", attached, force or len(present) == 2
    if source == "dir":
        _check_dir(src_dir)
    if len(present) == 2 and not force and source != "auto":
        force = _replaces_the_sample(record, source, src_dir)
    if len(present) == 2 and not force:
        used = data_source(paths)
        print(f"download: keeping input/train.csv and input/test.csv already present "
              f"(source: {used}); use FORCE=1 to fetch again")
        if used == "sample":
            print(SAMPLE_BANNER)
        return used
    if len(present) == 1 and not force:
        have, missing = present[0], ({paths.train_csv, paths.test_csv} - set(present)).pop()
        raise PipelineError(
            f"{missing}: file not found, while {have.name} is present. Put both files in input/ "
            "(or `make download FORCE=1` to fetch both again); nothing is filled in from another source"
        )
    # What input/ holds now that is not the sample: the user's data, never replaced by the sample.
    held = (data_source(paths) if present else "sample")
    if source == "auto":
        source, src_dir, why = _choose_source(record if present else {}, bool(present))
        if source == "sample" and held != "sample":
            print(f"download: FORCE=1, but there is nowhere to fetch input/train.csv and test.csv "
                  f"again from (they came from {_origin(record)}; {why}): keeping them")
            return held
        print(f"download: source auto -> {source} ({why})")
    if source == "sample" and held != "sample":
        raise PipelineError(f"input/ holds data from {_origin(record)}; the built-in sample never "
                            "replaces it. Move input/train.csv and input/test.csv elsewhere first "
                            "to try the sample")
    # Files that could not be fetched again (put there by hand, or from a folder that is gone) are
    # moved to a folder of their own once the new pair is in.
    keep = None
    if held != "sample" and not _refetchable(record):
        keep = paths.input / "replaced" / time.strftime("%Y%m%d-%H%M%S")
    _fetch(paths, source, src_dir, timeout, keep)
    if keep is not None and keep.is_dir():
        print(f"download: the files input/ held before are kept in {keep.relative_to(paths.root)}/")
    write_json(paths.source_json, {"source": source, **({"dir": str(src_dir)} if src_dir else {})})
    return source


def _replaces_the_sample(record: dict[str, Any], source: str, src_dir: Path | None) -> bool:
    """input/ holds both files: whether they are the built-in sample that another source asked for
    replaces (as FORCE=1 would; saying so); files from another source than asked are kept, with a
    warning."""
    if record.get("source") in (None, source) and not (
            source == "dir" and record.get("dir") not in (None, str(src_dir))):
        return False
    if record["source"] == "sample":  # the built-in sample is no loss: replace it
        print(f"download: replacing the built-in sample in input/ with SOURCE={source}")
        return True
    wanted = _origin({"source": source, "dir": src_dir})
    print(f"download: WARNING: input/ holds files from {_origin(record)}, not from {wanted}; "
          "they are kept. Add FORCE=1 to replace them")
    return False


def _fetch(paths: Paths, source: str, src_dir: Path | None, timeout: float, keep: Path | None) -> None:
    """Replace input/'s CSVs from source; keep: the folder that keeps what they held (None: deleted)."""
    if source == "sample":
        n_train, n_test = sample.write(paths.train_csv, paths.test_csv)
        print(SAMPLE_BANNER)
        print(f"download: wrote the sample: {n_train} train rows, {n_test} test rows")
    elif source == "dir":
        _copy_from_dir(paths, src_dir, keep)
    else:
        _download_kaggle(paths, timeout, keep)


def _choose_source(record: dict[str, Any], present: bool) -> tuple[str, Path | None, str]:
    """SOURCE=auto: where files come from (again, when input/ holds some: record is their source)."""
    if record.get("source") == "dir" and _refetchable(record):
        return "dir", Path(record["dir"]), f"input/'s files came from the folder {record['dir']}"
    if found := kaggle_api.credentials_source():
        return "kaggle", None, f"Kaggle credentials found in {found}"
    return "sample", None, f"{'' if present else 'no files in input/ and '}no Kaggle credentials"


def _refetchable(record: dict[str, Any]) -> bool:
    """Whether the files input/ holds can be fetched again from where they came."""
    if record.get("source") == "dir":
        folder = record.get("dir")  # an older record may lack it: then there is no folder to go back to
        return bool(folder) and all((Path(str(folder)) / name).is_file()
                                    for name in ("train.csv", "test.csv"))
    return record.get("source") in ("sample", "kaggle")


def _origin(record: dict[str, Any]) -> str:
    if record.get("source") == "dir":
        return f"the folder {record.get('dir')}"
    return f"SOURCE={record['source']}" if record.get("source") else "files put there by hand"


def _check_dir(src_dir: Path | None) -> None:
    if src_dir is None:
        raise PipelineError("download: SOURCE=dir needs a folder (make download SOURCE=dir DIR=path)")
    src_dir = Path(src_dir).expanduser()
    if not src_dir.is_dir():
        raise PipelineError(f"DIR={src_dir}: no such folder; it must hold the competition's "
                            "train.csv and test.csv")
    for name in ("train.csv", "test.csv"):
        if not (src_dir / name).is_file():
            raise PipelineError(f"{src_dir / name}: not found; the folder must hold train.csv and "
                                "test.csv of the competition")


def _copy_from_dir(paths: Paths, src_dir: Path | None, keep: Path | None) -> None:
    assert src_dir is not None
    src_dir = Path(src_dir).expanduser()
    targets = [paths.train_csv, paths.test_csv]
    # Both copies are made before either replaces what input/ holds: a full disk midway leaves
    # input/ as it was, never a new train.csv beside an old test.csv.
    with staged_files(paths.input, [t.name for t in targets]) as staged:
        for source, target in zip(staged, targets, strict=True):
            try:
                shutil.copyfile(src_dir / target.name, source)
            except OSError as exc:
                reading = exc.filename is not None and Path(exc.filename) == src_dir / target.name
                where = (f"{src_dir / target.name}: cannot read it" if reading else
                         f"{src_dir / target.name}: cannot copy it into {paths.input}")
                raise PipelineError(f"{where} ({exc.strerror}); input/ is as it was") from exc
        replace_together(list(zip(staged, targets, strict=True)), keep)
    print(f"download: copied train.csv and test.csv from {src_dir}")


def _download_kaggle(paths: Paths, timeout: float, keep: Path | None) -> None:
    created = not paths.input.exists()
    try:
        paths.input.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{paths.input}: cannot create ({exc.strerror})") from exc
    try:
        # The temporary folder sits in input/ so the final renames stay on one file system; it is
        # removed whatever happens, so a failed download leaves input/ as it was.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=paths.input) as tmp:
            files = kaggle_api.download_competition(Path(tmp), timeout=timeout)
            # Both files are complete and checked before either replaces what input/ holds.
            replace_together([(files["train.csv"], paths.train_csv),
                              (files["test.csv"], paths.test_csv)], keep)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                paths.input.rmdir()
        raise
    print(f"download: fetched train.csv and test.csv of '{COMPETITION}' from Kaggle")

