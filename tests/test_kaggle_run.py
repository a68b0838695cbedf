"""`make kaggle-run` and `make quota` through the real ``kaggle`` client, against the fake Kaggle.

The fake runs what was pushed (tests/fake_kaggle.py): the script unpacks the project's code it
carries and trains in a simulated /kaggle tree of its own, on the CPU, without this repository's
code, the network or any credential. One such session, from a fresh clone through `make`, is taken
once per `make test` and shared by the tests of this file (the fixture `trip`); the failures replay
its output, changed, or make the fake misbehave, and run the command line in this process with the
client's environment.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import (
    DUMMY_KEY,
    client_env,
    fresh_clone,
    run_cli,
    run_make,
    start_cli,
    the_run,
)
from fake_kaggle import FAILURE, SESSION_CAP, FakeKaggle, make_zip
from filelock import FileLock
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import Paths, resolve
from pipeline.errors import PipelineError
from pipeline.kaggle import kernels, remote
from pipeline.kaggle.remote import MANIFEST
from pipeline.stages import kaggle_run as kaggle_run_stage
from pipeline.store import ledger, sample
from pipeline.store.data import load_prepared
from pipeline.store.run import KaggleOrigin, RunRecord, latest, run_id
from pipeline.store.submission import COMPETITION_TEST_ROWS

SETTINGS = {"epochs": 2, "folds": 2, "hidden": 16}
MAKE_SETTINGS = tuple(f"{k.upper()}={v}" for k, v in SETTINGS.items())
CLI_SETTINGS = tuple(w for k, v in SETTINGS.items() for w in (f"--{k}", str(v)))
MANIFEST_PHRASE = "nothing was brought home"


@dataclass(frozen=True)
class Competition:
    files: dict[str, bytes]  # train.csv and test.csv, as a session sees them attached
    archive: bytes  # the same files as the competition's download


@dataclass(frozen=True)
class Trip:
    """One `make kaggle-run` from a fresh clone, what the fake saw of it and what its session left:
    plain data, made once per `make test` and shared by its test processes (the fake is gone)."""

    clone: Path
    home: Path  # the client's HOME (dummy credentials)
    result: subprocess.CompletedProcess[str]
    output: dict[str, bytes]  # the session's /kaggle/working, file by file
    log: list[dict[str, Any]]
    calls: list[tuple[str, dict[str, Any]]]  # (kernel method, request body)
    deleted: list[str]
    running: list[str]  # kernels still running when the command ended
    sandbox: str  # where the fake ran the session


@pytest.fixture(scope="module")
def competition(tmp_path_factory: pytest.TempPathFactory) -> Competition:
    """The built-in sample's digits, its test rows repeated to the competition's 28,000 (so the
    submission is one `make upload` takes)."""
    folder = tmp_path_factory.mktemp("competition")
    sample.write(folder / "train.csv", folder / "test.csv")
    header, *rows = (folder / "test.csv").read_bytes().splitlines(keepends=True)
    test = header + b"".join((rows * (COMPETITION_TEST_ROWS // len(rows) + 1))[:COMPETITION_TEST_ROWS])
    files = {"train.csv": (folder / "train.csv").read_bytes(), "test.csv": test}
    return Competition(files, make_zip({**files, "sample_submission.csv": b"ImageId,Label\n"},
                                       zipfile.ZIP_STORED))


def make(clone: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`make ARGS` in the clone as a user types it, the client's environment around it."""
    env = {k: v for k, v in env.items() if not k.startswith(("MAKE", "MFLAGS"))}
    return run_make(*args, "SETUP=", f"PY={sys.executable}", cwd=clone, env=env, timeout=600)


def take_trip(base: Path, competition: Competition) -> Trip:
    fake = FakeKaggle(competition.archive, competition.files).start()
    try:
        clone, env = fresh_clone(base / "clone"), client_env(base / "home", fake.url)
        result = make(clone, env, "kaggle-run", *MAKE_SETTINGS)
        ran = fake.executed[0] if fake.executed else None
        return Trip(clone, base / "home", result, dict(ran.files) if ran else {},
                    list(ran.log) if ran else [], list(fake.calls), list(fake.deleted), fake.running(),
                    str(fake.sandbox))
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def trip(tmp_path_factory: pytest.TempPathFactory, competition: Competition) -> Trip:
    """The trip, taken once per `make test`: the first test process to need it takes it, the others
    (pytest-xdist's workers, whose temporary folders share a parent) read what it saved."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    with FileLock(shared / "kaggle-trip.lock"):
        saved = shared / "kaggle-trip.pickle"  # written by this test run, for this test run
        if not saved.exists():
            saved.write_bytes(pickle.dumps(take_trip(shared / "kaggle-trip", competition)))
        return pickle.loads(saved.read_bytes())


def session_log(trip: Trip) -> str:
    return "".join(entry["data"] for entry in trip.log)


@pytest.mark.slow
def test_make_kaggle_run_trains_on_kaggle_and_brings_the_run_home(trip: Trip) -> None:
    out = trip.result.stdout + trip.result.stderr
    assert trip.result.returncode == 0, out + session_log(trip)
    # The session ran the code the script carried (unpacked under the fake's tree), not this checkout's.
    assert re.search(rf"code [0-9a-f]{{12}} in {re.escape(trip.sandbox)}/", session_log(trip))
    assert "no GPU in this session (asked for NvidiaTeslaT4): training on its CPU" in session_log(trip)
    # Status changes with the time since the push, then the kernel is gone.
    assert re.search(r"kaggle-run: +\d+\.\ds running", out) and re.search(r"\d+\.\ds complete", out)
    assert "deleted the kernel fake-user/digits-rnn-h16-e2-" in out
    assert trip.running == [] and trip.calls[-1][0] == "DeleteKernel"
    # The run's id is the one the same settings have here.
    paths = Paths(trip.clone)
    run = the_run(trip.clone)
    assert run.id == run_id(resolve(overrides=SETTINGS), load_prepared(paths).data_key)
    record = run.read()
    (slug,) = trip.deleted
    assert record.kaggle == KaggleOrigin(kernel=f"fake-user/{slug}", version=1, accelerator="NvidiaTeslaT4")
    assert record.source == "kaggle" and record.device.startswith("cpu")
    # Every file the session wrote came home as it was (run.json gained where it was trained).
    for name, data in trip.output.items():
        if name not in (MANIFEST, "run.json"):
            assert (run.path / name).read_bytes() == data, name
    assert sorted(p.name for p in run.path.iterdir()) == sorted(
        [*(set(trip.output) - {MANIFEST}), "kaggle.log"])
    assert paths.submission_csv.read_bytes() == run.submission.read_bytes() and latest(paths) == run.id
    assert not [p for p in paths.runs.iterdir() if p.name.startswith(".kaggle")]  # no staging left
    assert all(kernels.safe_name(name) and not kernels.escapes(name) for name in trip.output)


@pytest.mark.slow
def test_the_push_is_a_private_script_with_the_competition_on_a_t4_and_no_secret(trip: Trip) -> None:
    (pushed,) = [body for method, body in trip.calls if method == "SaveKernel"]
    assert pushed["isPrivate"] is True and pushed["enableInternet"] is False
    assert pushed["competitionDataSources"] == ["digit-recognizer"] and not pushed.get("datasetDataSources")
    assert (pushed["machineShape"], pushed["kernelType"], pushed["language"]) == (
        "NvidiaTeslaT4", "script", "python")
    assert pushed["sessionTimeoutSeconds"] == 7200
    text = pushed["text"]
    home = trip.home
    for secret in (DUMMY_KEY, base64.b64encode(f"fake-user:{DUMMY_KEY}".encode()).decode(), str(home)):
        assert secret not in text
    code = base64.b64decode(text.split('CODE = """', 1)[1].split('"""', 1)[0])
    with tarfile.open(fileobj=io.BytesIO(code), mode="r:gz") as tar:
        names = tar.getnames()
    assert "pipeline/kaggle/remote.py" in names and "Makefile" in names
    assert all((n.startswith("pipeline/") and n.endswith(".py")) or n in ("Makefile", "pyproject.toml")
               for n in names), names
    assert code == kernels.code_archive()  # the same bytes each time: its hash names the code
    manifest = json.loads(trip.output[MANIFEST])
    assert manifest["code"] == hashlib.sha256(code).hexdigest()


@pytest.mark.slow
def test_runs_quota_upload_blend_and_submit_take_it_as_their_own(trip: Trip, tmp_path: Path) -> None:
    """The README's lines after a Kaggle run, through make in a copy of the clone."""
    clone = shutil.copytree(trip.clone, tmp_path / "clone", copy_function=link_big)
    run = the_run(clone)
    fake = FakeKaggle(b"").start()
    try:
        env = client_env(tmp_path / "home", fake.url)
        listed = make(clone, env, "runs", "FORMAT=csv")
        assert listed.returncode == 0, listed.stderr
        row = {r["run"]: r for r in csv.DictReader(io.StringIO(listed.stdout))}[run.id]
        assert row["device"].startswith("Kaggle: cpu") and row["source"] == "kaggle"
        quota = make(clone, env, "quota")
        assert quota.returncode == 0, quota.stderr
        assert quota.stdout.strip() == ("GPU: 3.00 h used of 30.00 h (27.00 h left); refreshes "
                                        "2026-12-07 00:00 UTC")
        sent = make(clone, env, "upload", "MESSAGE=trained on Kaggle", "WAIT=20")
    finally:
        fake.stop()
    assert sent.returncode == 0, sent.stderr
    assert f"made by {run.id}" in sent.stdout and "public score 0.97100" in sent.stdout
    assert ledger.uploads(Paths(clone))[4242]["run"] == run.id
    # The same settings here are the same run: nothing retrains, nothing is predicted again.
    again = make(clone, env, "submit", *MAKE_SETTINGS)
    assert again.returncode == 0, again.stderr
    assert "train: fold 0 skipped" in again.stdout and "train: fold 1 skipped" in again.stdout
    assert f"predict: {run.id} skipped" in again.stdout
    blended = make(clone, env, "blend", "FOLDS=2")  # blends runs on the folds given
    assert blended.returncode == 0, blended.stderr
    assert f"blend: {run.id} x1" in blended.stdout


# -- the failures: each ends with one clear message, a non-zero exit, no kernel left, nothing here --------

@pytest.fixture
def fake(trip: Trip) -> Iterator[FakeKaggle]:
    """A fake that replays the shared session's output (kernel_mode and files changed by tests)."""
    server = FakeKaggle(b"").start()
    server.kernel_mode = "replay"
    server.replay_files, server.replay_log = dict(trip.output), list(trip.log)
    yield server
    server.stop()
    assert server.hosts <= {"localhost"}, "the client tried to reach a real host"


@pytest.fixture
def project(trip: Trip, tmp_path: Path, fake: FakeKaggle, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project holding the shared trip's data and folds, no run; this process's environment the
    client's, aimed at `fake`."""
    root = tmp_path / "project"
    shutil.copytree(trip.clone / "input", root / "input", copy_function=link_big)
    env = client_env(tmp_path / "home", fake.url)
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return root


def link_big(source: str, target: str) -> None:
    """Copy a small file, hard-link a big one (the CSVs and the pixel cache, which nothing here
    writes in place: the pipeline replaces files by renaming): a project in a blink."""
    if os.path.getsize(source) > 1 << 20:
        os.link(source, target)
    else:
        shutil.copy2(source, target)


def kaggle_run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(root, "kaggle-run", *CLI_SETTINGS, "--timeout", "60", *args, check=False)


def nothing_here(root: Path) -> None:
    """No run, no staging folder, no submission: the project holds what it held before."""
    assert [p.name for p in (root / "runs").iterdir()] in ([], [".lock"])
    assert not (root / "submissions").exists()


def assert_refused(result: subprocess.CompletedProcess[str], fake: FakeKaggle, root: Path,
                   *phrases: str, pushed: bool = True) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr, out
    assert "Traceback" not in out and DUMMY_KEY not in out
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, out)
    assert fake.running() == []
    if pushed:  # whatever the end, the kernel is asked to go
        assert ("POST", "/api/v1/kernels.KernelsApiService/DeleteKernel") in fake.requests, fake.requests
    nothing_here(root)


def edited_manifest(files: dict[str, bytes], change: Any) -> dict[str, bytes]:
    manifest = json.loads(files[MANIFEST])
    change(manifest)
    return {**files, MANIFEST: json.dumps(manifest).encode()}


def _flip(files: dict[str, bytes]) -> dict[str, bytes]:
    data = bytearray(files["fold_0.pt"])
    data[len(data) // 2] ^= 0xFF
    return {**files, "fold_0.pt": bytes(data)}


def _cut(files: dict[str, bytes]) -> dict[str, bytes]:
    return {**files, "test.csv": files["test.csv"][: len(files["test.csv"]) // 2]}


def _drop(name: str) -> Any:
    return lambda files: {k: v for k, v in files.items() if k != name}


def _bad_cv(files: dict[str, bytes]) -> dict[str, bytes]:
    """cv.csv replaced, its manifest entry too: every hash matches, the run does not."""
    data = b"fold,valid_loss\n0,x\n"
    changed = {**files, "cv.csv": data}
    return edited_manifest(changed, lambda m: m["files"].update(
        {"cv.csv": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))


def _other_run(files: dict[str, bytes]) -> dict[str, bytes]:
    return edited_manifest(files, lambda m: m.update(run="gru-h16-e2-000000"))


DAMAGED = {
    "flipped-byte": (_flip, "fold_0.pt came back with another SHA-256"),
    "truncated": (_cut, "test.csv came back with"),
    "missing-file": (_drop("oof.csv"), "lacks oof.csv"),
    "no-manifest": (_drop(MANIFEST), f"has no {MANIFEST}"),
    "torn-manifest": (lambda f: {**f, MANIFEST: f[MANIFEST][:40]}, "is not readable"),
    "other-run": (_other_run, "of another run"),
    "other-format": (lambda f: edited_manifest(f, lambda m: m.update(format=2)), "another format (2, not 1)"),
    "not-a-run": (_bad_cv, "not a complete run"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_or_incomplete_output_lands_nothing(case: str, project: Path, fake: FakeKaggle) -> None:
    change, phrase = DAMAGED[case]
    fake.replay_files = change(fake.replay_files)
    result = kaggle_run(project, "--accelerator", "none")
    assert_refused(result, fake, project, phrase, MANIFEST_PHRASE)
    assert fake.deleted  # the kernel existed, and is gone


@pytest.mark.slow
@pytest.mark.parametrize("change", [
    lambda files: {**files, "../x": b"x"},
    lambda files: edited_manifest(files, lambda m: m["files"].update(
        {"../x": {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}}))],
    ids=["listed", "in-the-manifest"])
def test_a_returned_file_outside_the_runs_folder_is_refused(change: Any, project: Path,
                                                            fake: FakeKaggle) -> None:
    fake.replay_files = change(fake.replay_files)
    assert_refused(kaggle_run(project, "--accelerator", "none"), fake, project, "'../x'",
                   "outside the run's folder")
    assert not (project / "x").exists() and not (project / "runs" / "x").exists()


@pytest.mark.parametrize("name", ["../x", "..", "/tmp/x", "a/../../x", "a/b", "C:x", "..\\x", ".hidden",
                                  "", "x" * 201])
def test_names_that_could_leave_the_folder_are_not_safe(name: str) -> None:
    assert not kernels.safe_name(name)
    assert kernels.escapes(name) is (name not in ("a/b", ".hidden", "x" * 201))  # a listed name may be odd


@pytest.mark.slow
def test_lost_answers_and_other_files_in_the_output_do_not_stop_a_landing(project: Path,
                                                                          fake: FakeKaggle) -> None:
    """Two status calls go unanswered (503), and the output holds more than the run (Kaggle's own
    files, a sub-folder): the wait goes on, only what the manifest names is fetched, the run lands."""
    fake.status_errors = 2
    fake.replay_files = {**fake.replay_files, "__results__.html": b"<html/>", "sub/notes.txt": b"x",
                         ".hidden": b"x"}
    result = kaggle_run(project, "--accelerator", "none")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("no status this time (Kaggle answered HTTP 503") == 2
    run = the_run(project)
    assert {p.name for p in run.path.iterdir()} == {*(set(fake.replay_files) - {MANIFEST, "__results__.html",
                                                   "sub/notes.txt", ".hidden"}), "kaggle.log"}
    fetched = {path.rsplit("/", 1)[1] for method, path in fake.requests if method == "GET"}
    assert fetched == set(json.loads(fake.replay_files[MANIFEST])["files"]) | {MANIFEST}
    origin = KaggleOrigin(kernel=f"fake-user/{fake.deleted[0]}", version=1, accelerator="none")
    assert run.read().kaggle == origin
    assert Paths(project).submission_csv.read_bytes() == run.submission.read_bytes()


REFUSED = {  # what the fake is given, what the refusal says
    "error-field": ({"push_answer": {"ref": "", "url": "", "error": "Phone verification is required"}},
                    ["Kaggle refused the kernel: Phone verification is required"]),
    "no-version-number": ({"push_answer": {"ref": "/code/fake-user/x",
                                           "url": "https://www.kaggle.com/code/fake-user/x"}},
                          ["no version number", "/code/fake-user/x"]),
    "competition-not-attached": ({"push_answer": {"ref": "/code/fake-user/x", "url": "", "versionNumber": 1,
                                                  "invalidCompetitionSources": ["digit-recognizer"]}},
                                 ["would not attach the competition (digit-recognizer)", "rules"]),
    "two-sessions-cap": ({"busy_gpu_sessions": 2}, [SESSION_CAP, "wait until one of your sessions ends"]),
    "http-403": ({"api_error": (403, "Phone verification required")}, ["HTTP 403", "phone-verified"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_push_stops_with_kaggles_words(case: str, project: Path, fake: FakeKaggle) -> None:
    attributes, phrases = REFUSED[case]
    vars(fake).update(attributes)
    result = kaggle_run(project, *(() if case == "two-sessions-cap" else ("--accelerator", "none")))
    assert_refused(result, fake, project, *phrases)
    asked = [path.rsplit("/", 1)[1] for method, path in fake.requests if method == "POST"]
    assert "SaveKernel" in asked and "GetKernelSessionStatus" not in asked and asked[-1] == "DeleteKernel"
    if case == "http-403":  # the push itself refused (every call is): no kernel was made
        assert fake.kernels == {}


@pytest.mark.slow
@pytest.mark.parametrize("used", ["108000s", "107990s"], ids=["used-up", "nearly-used-up"])
def test_quota_clearly_below_the_runs_need_refuses_to_start(used: str, project: Path,
                                                            fake: FakeKaggle) -> None:
    fake.quota = {"timeUsed": used, "timeReserved": "0s", "totalTimeAllowed": "108000s"}
    result = kaggle_run(project)
    assert_refused(result, fake, project, "0.00 h left", "of 30.00 h", "this run needs", "nothing was pushed",
                   pushed=False)
    assert fake.methods() == ["GetAcceleratorQuotaStatistics"]


@pytest.mark.slow
def test_an_error_on_kaggle_shows_its_message_and_the_logs_tail(project: Path, fake: FakeKaggle) -> None:
    fake.kernel_mode = "fail"
    fake.fail_log = [{"stream_name": "stdout", "time": 1.0, "data": f"line {i}\n"} for i in range(40)] + [
        {"stream_name": "stderr", "time": 2.0,
         "data": "kaggle-run: ERROR: the GPU Tesla P100-PCIE-16GB (compute capability 6.0) cannot run "
                 "this image's PyTorch\n"}]
    result = kaggle_run(project, "--accelerator", "none")
    assert_refused(result, fake, project, f"status ERROR): {FAILURE}", "| line 39",
                   "| kaggle-run: ERROR: the GPU Tesla P100-PCIE-16GB")
    assert "| line 5\n" not in result.stderr  # the tail, not the whole log


@pytest.mark.slow
def test_a_kernel_that_never_finishes_is_deleted_at_the_deadline(project: Path, fake: FakeKaggle) -> None:
    fake.kernel_mode = "never"
    started = time.monotonic()
    result = kaggle_run(project, "--accelerator", "none", "--deadline", "1.5")
    assert_refused(result, fake, project, "did not finish within DEADLINE=1.5 s", "last status: RUNNING")
    assert len(fake.deleted) == 1 and time.monotonic() - started < 30
    assert next(b for m, b in fake.calls if m == "SaveKernel")["sessionTimeoutSeconds"] == 1


@pytest.mark.slow
def test_ctrl_c_while_waiting_deletes_the_kernel(project: Path, fake: FakeKaggle) -> None:
    fake.kernel_mode = "never"
    process = start_cli(project, "kaggle-run", *CLI_SETTINGS, "--accelerator", "none", env=dict(os.environ),
                        output=True, sigint=True)
    deadline = time.monotonic() + 120
    while "GetKernelSessionStatus" not in fake.methods() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert "deleted the kernel fake-user/digits-" in err and "interrupted: nothing was brought home" in err
    assert len(fake.deleted) == 1 and fake.running() == []
    nothing_here(project)


def test_a_second_ctrl_c_while_the_kernel_is_deleted_is_held_off(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def delete(slug: str, timeout: float) -> tuple[str, bool, str]:
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while it is asked
        return "u", True, ""

    monkeypatch.setattr(kernels, "delete", delete)
    try:
        kaggle_run_stage._let_go("s", False, 5)
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C interrupted the deletion")
    assert "deleted the kernel u/s" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again


@pytest.mark.slow
def test_keep_leaves_the_kernel_and_says_so(project: Path, fake: FakeKaggle) -> None:
    fake.kernel_mode = "never"
    result = kaggle_run(project, "--accelerator", "none", "--deadline", "1", "--keep")
    assert result.returncode == 1 and "KEEP=1: the kernel digits-" in result.stderr
    assert fake.deleted == [] and len(fake.running()) == 1


@pytest.mark.slow
@pytest.mark.parametrize(("args", "phrases"), [
    (("--accelerator", "NvidiaTeslaP100"), ["the P100 cannot run"]),
    (("--accelerator", "TpuV5E8"), ["not on TPUs"]),
    (("--deadline", "0"), ["DEADLINE=0"]),
    (("--teacher", "blend-abc"), ["TEACHER=blend-abc"]),
    ((), ["built-in sample, but a run on Kaggle trains on the competition's files", "SOURCE=kaggle FORCE=1"]),
], ids=["p100", "tpu", "deadline", "teacher", "sample"])
def test_what_could_not_come_back_is_refused_before_anything_is_sent(
        args: tuple[str, ...], phrases: list[str], project: Path, fake: FakeKaggle) -> None:
    if not args:  # input/ holds the built-in sample
        (project / "input" / "source.json").write_text('{"source": "sample"}\n')
    assert_refused(kaggle_run(project, *args), fake, project, *phrases, pushed=False)
    assert fake.requests == []


@pytest.mark.slow
def test_a_run_already_here_is_not_pushed_again(trip: Trip, project: Path, fake: FakeKaggle) -> None:
    run = the_run(trip.clone)
    (project / "runs").mkdir()
    (project / "runs" / run.id).mkdir()
    (project / "runs" / run.id / "config.json").write_text("{}")
    partial = kaggle_run(project)
    assert partial.returncode == 1 and "trained here in part" in partial.stderr
    shutil.rmtree(project / "runs" / run.id)
    shutil.copytree(run.path, project / "runs" / run.id)
    done = kaggle_run(project)
    assert done.returncode == 0 and f"{run.id} is already here, complete" in done.stdout
    assert fake.requests == []


# -- the pieces ------------------------------------------------------------------------------------

# torch.cuda as a session with one GPU whose capability the image's PyTorch was not built for.
FAKE_CUDA = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1,
                            get_device_name=lambda index: "Tesla P100-PCIE-16GB",
                            get_device_capability=lambda index: (6, 0),
                            get_arch_list=lambda: ["sm_70", "sm_75", "sm_80"])


def no_kernel_image(index: int) -> None:
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")


def test_the_gpu_check_names_a_gpu_the_images_pytorch_cannot_run(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    import torch

    monkeypatch.setattr(torch, "cuda", FAKE_CUDA)
    problem = remote.gpu_problem("NvidiaTeslaT4", "auto", probe=no_kernel_image)
    assert problem is not None
    for words in ("Tesla P100-PCIE-16GB (compute capability 6.0)", "built for sm_70 sm_75 sm_80",
                  "no kernel image is available", "ACCELERATOR=NvidiaTeslaT4"):
        assert words in problem
    assert "more" not in problem  # one line of CUDA's words, not its traceback
    assert remote.gpu_problem("NvidiaTeslaT4", "auto", probe=lambda index: None) is None
    assert remote.gpu_problem("NvidiaTeslaT4", "cpu", probe=no_kernel_image) is None


def test_the_gpu_check_on_a_session_without_a_usable_gpu(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert remote.gpu_problem("none", "auto", nvidia=tmp_path / "absent") is None  # the CPU, said so
    (tmp_path / "gpus" / "0000:00:04.0").mkdir(parents=True)
    problem = remote.gpu_problem("NvidiaTeslaT4", "auto", nvidia=tmp_path / "gpus")
    assert problem and "has an NVIDIA GPU, but its PyTorch" in problem


@pytest.mark.slow
@pytest.mark.parametrize("made", [
    {"kernel": "u/k", "version": "1", "accelerator": "none"}, {"kernel": "u/k"}, ["u/k"],
    {"kernel": 3, "version": 1, "accelerator": "none"}, {"kernel": "u/k", "version": True,
                                                        "accelerator": "none"}])
def test_a_damaged_kaggle_fact_in_a_record_is_named(made: Any, trip: Trip) -> None:
    run = the_run(trip.clone)
    record = json.loads(run.record.read_text())
    assert RunRecord.parse(record, run.record).kaggle is not None
    with pytest.raises(PipelineError, match="kaggle"):
        RunRecord.parse({**record, "kaggle": made}, run.record)
    assert RunRecord.parse({k: v for k, v in record.items() if k != "kaggle"}, run.record).kaggle is None


def test_quota_text_and_log_text() -> None:
    quota = kernels.Quota(used=4 * 3600, allowed=30 * 3600, refresh="")
    assert quota.text() == "4.00 h used of 30.00 h (26.00 h left)"
    assert kernels.Quota(used=31 * 3600, allowed=30 * 3600, refresh="").left == 0
    entries = [{"stream_name": "stdout", "time": 0.1, "data": "a\n"}, {"stream_name": "stderr", "data": "b"}]
    assert kernels.log_text(json.dumps(entries)) == "a\nb"
    assert kernels.log_text("plain text") == "plain text" and kernels.log_text(None) == ""


@given(name=st.text(max_size=40))
def test_a_safe_name_stays_in_its_folder(name: str) -> None:
    if kernels.safe_name(name):
        assert (Path("/base") / name).resolve().parent == Path("/base") and "/" not in name


@given(model=st.sampled_from(["rnn", "gru", "lstm"]), view=st.sampled_from(["rows", "cols"]),
       hidden=st.integers(1, 4096), epochs=st.integers(1, 10_000), teacher=st.sampled_from(["", "t"]),
       data=st.text("0123456789abcdef", min_size=16, max_size=16))
def test_a_kernel_slug_is_its_own_slug_and_short(model: str, view: str, hidden: int, epochs: int,
                                                  teacher: str, data: str) -> None:
    """Kaggle makes a kernel's slug of its title: the title we give must be a slug already."""
    from slugify import slugify

    name = run_id(resolve(overrides={"model": model, "view": view, "hidden": hidden, "epochs": epochs,
                                     "teacher": teacher}), data)
    slug = kaggle_run_stage.kernel_slug(name)
    assert slugify(slug) == slug and 5 <= len(slug) <= 50 and slug.startswith("digits-")
