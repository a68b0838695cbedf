"""download from a folder or the sample (Kaggle itself: test_kaggle.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import (
    CLEAN_TEST,
    CLEAN_TRAIN,
    SMALL,
    run_cli,
    write_inputs,
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
    # The sample never replaces real data, even with FORCE=1.
    forced = run_cli(run_copy, "download", "--source", "sample", "--force", check=False)
    assert forced.returncode == 1 and "the built-in sample never replaces it" in forced.stderr
    assert Paths(run_copy).train_csv.read_bytes() == (elsewhere / "train.csv").read_bytes()


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


def no_credentials(tmp_path: Path) -> dict[str, str]:
    """A user's environment with no Kaggle credentials anywhere (an empty HOME)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    keep = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_") or k == "KAGGLE_ROOT"}
    return {**keep, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}


@pytest.mark.slow
def test_force_never_swaps_the_users_files_for_the_sample(tmp_path: Path) -> None:
    """Files put into input/ by hand, then `make submit FORCE=1` with nowhere to fetch them again
    from: they are kept, byte for byte, and the reason says so (not "no files in input/")."""
    root = tmp_path / "project"
    paths = write_inputs(root)
    env = no_credentials(tmp_path)
    run_cli(root, "submit", *SMALL, env=env)
    forced = run_cli(root, "submit", *SMALL, "--force", env=env).stdout
    assert "nowhere to fetch input/train.csv and test.csv again from" in forced
    assert "files put there by hand" in forced and "no files in input/" not in forced
    assert "SAMPLE" not in forced
    assert (paths.train_csv.read_bytes(), paths.test_csv.read_bytes()) == (CLEAN_TRAIN, CLEAN_TEST)


@pytest.mark.parametrize("folder", ["kept", "gone", "unrecorded"])
def test_force_after_a_folder_fetches_from_it_again_or_keeps_the_files(
        tmp_path: Path, folder: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in no_credentials(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KAGGLE_CONFIG_DIR", raising=False)
    mine = write_inputs(tmp_path / "mine").input
    paths = Paths(tmp_path / "project")
    download.run(paths, source="dir", src_dir=mine)
    shorter = CLEAN_TRAIN.rsplit(b"\n", 3)[0] + b"\n"
    (mine / "train.csv").write_bytes(shorter)  # the folder's file changed since: fetched again, or not
    if folder == "gone":
        shutil.rmtree(mine)
    if folder == "unrecorded":  # a record of a folder without its path (an older version's)
        paths.source_json.write_text('{"source": "dir"}')
        monkeypatch.chdir(mine)  # which holds both files: never taken for the folder
    download.run(paths, source="auto", force=True)
    out = capsys.readouterr().out
    fetched = folder == "kept"
    assert paths.train_csv.read_bytes() == (shorter if fetched else CLEAN_TRAIN)
    assert paths.test_csv.read_bytes() == CLEAN_TEST
    assert ("source auto -> dir" in out) == fetched and ("nowhere to fetch" in out) != fetched
    assert json.loads(paths.source_json.read_text())["source"] == "dir"


def test_files_that_cannot_be_fetched_again_are_kept_before_they_are_replaced(tmp_path: Path) -> None:
    """Hand-placed files replaced by FORCE=1 from a folder: a copy stays in input/replaced/."""
    paths = write_inputs(tmp_path / "project")
    other = write_inputs(tmp_path / "other", train=CLEAN_TRAIN.rsplit(b"\n", 3)[0] + b"\n").input
    download.run(paths, source="dir", src_dir=other, force=True)
    assert paths.train_csv.read_bytes() == (other / "train.csv").read_bytes() != CLEAN_TRAIN
    kept = list((paths.input / "replaced").iterdir())
    assert len(kept) == 1
    assert (kept[0] / "train.csv").read_bytes() == CLEAN_TRAIN
    assert (kept[0] / "test.csv").read_bytes() == CLEAN_TEST
    # Files from a folder that still holds them can be fetched again: no second copy.
    download.run(paths, source="dir", src_dir=other, force=True)
    assert len(list((paths.input / "replaced").iterdir())) == 1
