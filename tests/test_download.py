"""download from a folder or the sample (Kaggle itself: test_kaggle.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import (
    run_cli,
)

from pipeline.config import Paths
from pipeline.errors import PipelineError
from pipeline.stages import download


@pytest.mark.slow
def test_explicit_other_source_replaces_only_the_sample(run_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "downloads"
    elsewhere.mkdir()
    for name in ("train.csv", "test.csv"):
        (elsewhere / name).write_bytes((run_copy / "input" / name).read_bytes())
    (elsewhere / "train.csv").write_text(
        "\n".join((elsewhere / "train.csv").read_text().splitlines()[:-10]) + "\n")
    # The built-in sample gives way to an explicitly asked-for source...
    replaced = run_cli(run_copy, "download", "--source", "dir", "--dir", str(elsewhere))
    assert "replacing the built-in sample" in replaced.stdout
    assert json.loads(Paths(run_copy).source_json.read_text())["source"] == "dir"
    assert Paths(run_copy).train_csv.read_bytes() == (elsewhere / "train.csv").read_bytes()
    # ...but real files from one source are kept, with a warning, unless FORCE=1.
    kept = run_cli(run_copy, "download", "--source", "sample")
    assert f"WARNING: input/ holds files from the folder {elsewhere}, not from SOURCE=sample" \
        in kept.stdout and "FORCE=1" in kept.stdout
    assert Paths(run_copy).train_csv.read_bytes() == (elsewhere / "train.csv").read_bytes()
    forced = run_cli(run_copy, "download", "--source", "sample", "--force")
    assert "wrote the sample" in forced.stdout


@pytest.mark.slow
def test_dir_download_that_fails_midway_keeps_the_old_pair(run_copy: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths(run_copy)
    before = paths.train_csv.read_bytes(), paths.test_csv.read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.csv").write_bytes(before[0].replace(b"\n0,", b"\n1,", 1))  # a different file
    (other / "test.csv").write_bytes(before[1])
    real = shutil.copyfile

    def copyfile(src: Path, dst: Path) -> None:  # the disk fills up while test.csv is copied
        if Path(src).name == "test.csv":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    with pytest.raises(PipelineError, match=r"other/test.csv: cannot copy it into .*input \(No space "
                       r"left.*as it was"):
        download.run(paths, source="dir", src_dir=other, force=True)
    assert (paths.train_csv.read_bytes(), paths.test_csv.read_bytes()) == before
    assert not [p for p in paths.input.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_missing_dir_is_an_error(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "download", "--source", "dir", "--dir", str(tmp_path / "nope"),
                     check=False)
    assert result.returncode == 1 and "no such folder" in result.stderr
