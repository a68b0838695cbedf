"""Kaggle download and upload through the real ``kaggle`` client, against a fake Kaggle on 127.0.0.1.

The client reads its environment when imported, so every run goes through the real command line in
a subprocess with an environment of its own: a temporary HOME and KAGGLE_CONFIG_DIR holding dummy
credentials, KAGGLE_API_ENVIRONMENT=LOCALHOST and HTTP(S)_PROXY pointing at the fake server, no
NO_PROXY. Nothing can reach the network beyond 127.0.0.1, and no real key can be sent anywhere."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DUMMY_BASIC,
    DUMMY_KEY,
    DUMMY_TOKEN,
    DUMMY_USER,
    REPO,
    assert_one_clear_error,
    client_env,
    closed_port,
    fresh_clone,
    run_cli,
    run_make,
    snapshot,
    start_cli,
)
from fake_kaggle import SUBMIT_OK, FakeKaggle, make_zip

from pipeline.config import Paths
from pipeline.errors import PipelineError
from pipeline.kaggle import api as kaggle_api
from pipeline.stages import download
from pipeline.store import ledger
from pipeline.store.run import latest
from pipeline.store.submission import COMPETITION_TEST_ROWS

RULES_URL = "https://www.kaggle.com/competitions/digit-recognizer/rules"
TRAIN = b"label,pixel0,pixel1\n1,0,255\n7,12,0\n"
TEST = b"pixel0,pixel1\n3,4\n"
BOTH = {"train.csv": TRAIN, "test.csv": TEST}
ARCHIVE = make_zip({**BOTH, "sample_submission.csv": b"ImageId,Label\n1,0\n"})


# The hang tests' own timeout. Only they use one this short: on a busy machine the client alone can
# take longer to start, and other failures must not be mistaken for a hang.
HANG_TIMEOUT = 1.5
HANGS = ("server-hangs", "hangs-at-import", "body-stalls")
OLD = {"train.csv": b"old train\n", "test.csv": b"old test\n", "source.json": b'{"source": "dir"}\n'}


@pytest.fixture
def fake() -> Iterator[FakeKaggle]:
    server = FakeKaggle(ARCHIVE).start()
    yield server
    server.stop()
    assert server.hosts <= {"localhost"}, "the client tried to reach a real host"


@pytest.fixture
def env(tmp_path: Path, fake: FakeKaggle) -> dict[str, str]:
    """The environment of the client: dummy credentials, every request sent to the fake server."""
    return client_env(tmp_path / "home", fake.url)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "project" / "input").mkdir(parents=True)
    return tmp_path / "project"


# The client's environment is the whole environment of the command (see env), in a real process.
CLIENT = {"full_env": True, "check": False, "timeout": 60}


def download_kaggle(root: Path, env: dict[str, str], *extra: str,
                    timeout: float = 30) -> subprocess.CompletedProcess:
    return run_cli(root, "download", "--source", "kaggle", "--timeout", str(timeout), *extra, env=env,
                   **CLIENT)


def put_old_files(root: Path) -> None:
    for name, data in OLD.items():
        (root / "input" / name).write_bytes(data)


def assert_no_secret(result: subprocess.CompletedProcess) -> None:
    for text in (result.stdout, result.stderr):
        for secret in (DUMMY_KEY, DUMMY_BASIC, DUMMY_TOKEN):
            assert secret not in text


def patch_headers(data: bytes, offsets: tuple[int, int], patch: Callable[[bytes], bytes]) -> bytes:
    """The archive with the 4 bytes at offsets (in each local, central header) of every member
    patched: a zip bomb's sizes, a flag of encryption."""
    out = bytearray(data)
    for signature, offset in zip((b"PK\x03\x04", b"PK\x01\x02"), offsets, strict=True):
        start = out.find(signature)
        while start != -1:
            at = start + offset
            out[at:at + 4] = patch(bytes(out[at:at + 4]))
            start = out.find(signature, start + 4)
    return bytes(out)


def corrupted(data: bytes) -> bytes:
    """A stored archive with one byte of train.csv changed: its CRC no longer matches."""
    at = data.find(TRAIN) + 5
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


@pytest.mark.slow
def test_importing_every_pipeline_module_leaves_kaggle_and_optuna_out() -> None:
    code = ("import importlib, pkgutil, sys, pipeline\n"
            "for m in pkgutil.walk_packages(pipeline.__path__, 'pipeline.'):\n"
            "    if m.name != 'pipeline.__main__': importlib.import_module(m.name)\n"
            "print(sorted(k for k in sys.modules if k.startswith(('kaggle', 'optuna', 'psycopg'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _use_env_vars(env: dict[str, str]) -> str:
    Path(env["KAGGLE_CONFIG_DIR"], "kaggle.json").unlink()
    env.update(KAGGLE_USERNAME=DUMMY_USER, KAGGLE_KEY=DUMMY_KEY)
    return f"Basic {DUMMY_BASIC}"


def _use_token(env: dict[str, str]) -> str:
    env["KAGGLE_API_TOKEN"] = DUMMY_TOKEN  # wins over kaggle.json, as in the client
    return f"Bearer {DUMMY_TOKEN}"


CREDENTIALS = {"kaggle.json": lambda env: f"Basic {DUMMY_BASIC}", "env-vars": _use_env_vars,
               "access-token": _use_token}


@pytest.mark.slow
@pytest.mark.parametrize("credentials", list(CREDENTIALS))
def test_download_writes_the_served_files(credentials: str, root: Path, env: dict[str, str],
                                          fake: FakeKaggle) -> None:
    expected_auth = CREDENTIALS[credentials](env)
    result = download_kaggle(root, env)
    assert result.returncode == 0, result.stderr
    assert (root / "input" / "train.csv").read_bytes() == TRAIN
    assert (root / "input" / "test.csv").read_bytes() == TEST
    assert json.loads((root / "input" / "source.json").read_text())["source"] == "kaggle"
    assert sorted(snapshot(root / "input")) == ["source.json", "test.csv", "train.csv"]  # no leftovers
    assert expected_auth in fake.auth_headers  # the client really used these credentials, on the fake
    assert_no_secret(result)


@pytest.mark.slow
def test_download_keeps_existing_files_unless_forced(root: Path, env: dict[str, str],
                                                     fake: FakeKaggle) -> None:
    put_old_files(root)
    result = download_kaggle(root, env)
    assert result.returncode == 0 and "keeping" in result.stdout
    assert fake.requests == []
    assert (root / "input" / "train.csv").read_bytes() == OLD["train.csv"]
    result = download_kaggle(root, env, "--force")
    assert result.returncode == 0, result.stderr
    assert (root / "input" / "train.csv").read_bytes() == TRAIN


@pytest.mark.slow
def test_auto_picks_kaggle_when_credentials_exist_and_warns_of_a_readable_key(root: Path,
                                                                              env: dict[str, str]) -> None:
    Path(env["KAGGLE_CONFIG_DIR"], "kaggle.json").chmod(0o644)
    result = run_cli(root, "download", "--timeout", "5", env=env, **CLIENT)
    assert result.returncode == 0, result.stderr
    assert "source auto -> kaggle (Kaggle credentials found in" in result.stdout
    assert (root / "input" / "test.csv").read_bytes() == TEST
    assert "chmod 600" in result.stderr


def _no_credentials(fake: FakeKaggle, env: dict[str, str]) -> None:
    Path(env["KAGGLE_CONFIG_DIR"], "kaggle.json").unlink()


def _set(**attributes: Any) -> Callable[[FakeKaggle, dict[str, str]], None]:
    """A setup that gives the fake these attributes."""
    def setup(fake: FakeKaggle, env: dict[str, str]) -> None:
        vars(fake).update(attributes)
    return setup


def _no_network(fake: FakeKaggle, env: dict[str, str]) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = f"http://127.0.0.1:{closed_port()}"


def _hang_at_import(fake: FakeKaggle, env: dict[str, str]) -> None:
    env["KAGGLE_API_TOKEN"] = DUMMY_TOKEN  # importing the client checks the token with the server
    fake.hang_api = True


def _broken_client(fake: FakeKaggle, env: dict[str, str]) -> None:
    env["KAGGLE_CONFIG_DIR"] = str(Path(env["HOME"], ".kaggle", "kaggle.json", "sub"))  # import fails


DOWNLOAD_FAILURES = {
    "no-credentials": (_no_credentials, ["no Kaggle credentials", "kaggle.json", "KAGGLE_USERNAME"]),
    "http-401": (_set(api_error=(401, "Unauthenticated")), ["HTTP 401", "key", "https://www.kaggle.com/settings"]),
    "http-403": (_set(api_error=(403, "You must accept this competition's rules")), ["HTTP 403", RULES_URL]),
    "http-500": (_set(api_error=(500, "Internal error")), ["HTTP 500", "Internal error"]),
    "no-network": (_no_network, ["cannot reach Kaggle", "network"]),
    "server-hangs": (_set(hang_api=True), ["did not answer for 1.5 s", "TIMEOUT="]),
    "hangs-at-import": (_hang_at_import, ["did not answer for 1.5 s"]),
    "body-stalls": (_set(stall_file_after=len(ARCHIVE) // 2), ["did not answer for 1.5 s"]),
    "client-error": (_broken_client, ["the kaggle client failed", "NotADirectoryError"]),
    "truncated-zip": (_set(zip_bytes=ARCHIVE[: len(ARCHIVE) // 2]), ["truncated or corrupt"]),
    "corrupt-zip": (_set(zip_bytes=corrupted(make_zip(BOTH, zipfile.ZIP_STORED))), ["truncated or corrupt"]),
    "not-a-zip": (_set(zip_bytes=b"<html>Service unavailable</html>"), ["truncated or corrupt"]),
    "no-test-csv": (_set(zip_bytes=make_zip({"train.csv": TRAIN})), ["has no test.csv"]),
    "nested-files": (_set(zip_bytes=make_zip({"data/train.csv": TRAIN, "data/test.csv": TEST})),
                     ["has no train.csv or test.csv"]),
    "dotdot-member": (_set(zip_bytes=make_zip({**BOTH, "../evil.csv": b"x"})),
                      ["unsafe path", "../evil.csv"]),
    "absolute-member": (_set(zip_bytes=make_zip({**BOTH, "/tmp/evil.csv": b"x"})), ["unsafe path"]),
    "zip-bomb": (_set(zip_bytes=patch_headers(make_zip(BOTH, zipfile.ZIP_STORED), (22, 24),
                                              lambda _: struct.pack("<I", 0xF0000000))),
                 ["would unpack to", "refusing"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DOWNLOAD_FAILURES))
def test_download_failure_leaves_input_as_it_was(case: str, root: Path, env: dict[str, str],
                                                 fake: FakeKaggle) -> None:
    setup, phrases = DOWNLOAD_FAILURES[case]
    setup(fake, env)
    put_old_files(root)  # with FORCE the old files must survive a failed download untouched
    before = snapshot(root / "input")  # hidden entries included: no temporary folder may remain
    started = time.monotonic()
    result = download_kaggle(root, env, "--force", timeout=HANG_TIMEOUT if case in HANGS else 30)
    assert_one_clear_error(result, *phrases)
    assert result.stdout == ""  # nothing from the client (its auth help, say) gets through
    assert snapshot(root / "input") == before
    assert time.monotonic() - started < 20


@pytest.mark.slow
def test_failed_download_without_input_folder_leaves_none(root: Path, env: dict[str, str],
                                                          fake: FakeKaggle) -> None:
    (root / "input").rmdir()
    fake.zip_bytes = ARCHIVE[: len(ARCHIVE) // 2]
    assert_one_clear_error(download_kaggle(root, env), "truncated or corrupt")
    assert not (root / "input").exists()


@pytest.mark.slow
def test_a_client_that_dies_without_an_answer_shows_its_last_words_scrubbed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that ends with no result (killed, crashed at import) is named with its exit code and
    the tail of what it printed, every credential in it blanked."""
    dying = tmp_path / "python"
    dying.write_text(f"#!/bin/sh\necho 'Authorization: Basic {DUMMY_BASIC}'\necho 'key {DUMMY_KEY}'\n"
                     "echo 'the client gave up'\nexit 3\n")
    dying.chmod(0o755)
    for name, value in {"HOME": tmp_path, "KAGGLE_CONFIG_DIR": tmp_path, "KAGGLE_USERNAME": DUMMY_USER,
                        "KAGGLE_KEY": DUMMY_KEY}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(kaggle_api.sys, "executable", str(dying))
    with pytest.raises(PipelineError) as caught:
        kaggle_api.call(kaggle_api._child_submissions, 30)
    said = str(caught.value)
    assert "stopped unexpectedly (exit code 3)" in said and "the client gave up" in said, said
    assert said.count("[redacted]") == 2 and DUMMY_KEY not in said and DUMMY_BASIC not in said, said


def test_no_credential_reaches_the_output_even_when_verbose(root: Path, env: dict[str, str],
                                                            fake: FakeKaggle) -> None:
    env.update(VERBOSE="1", VERBOSE_OUTPUT="1")
    result = download_kaggle(root, env)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result)
    # A server that echoes the credentials back in an error must not get them printed either.
    fake.api_error = (500, f"bad request, Authorization: Basic {DUMMY_BASIC} key={DUMMY_KEY}")
    result = download_kaggle(root, env, "--force")
    assert_one_clear_error(result, "HTTP 500")
    assert "[redacted]" in result.stderr


@pytest.mark.slow
def test_scrub_blanks_what_the_verbose_client_prints(env: dict[str, str], fake: FakeKaggle,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The hazard is real (the client prints the key with VERBOSE) and scrub() removes it."""
    code = "import kaggle; kaggle.api.competition_download_files('digit-recognizer', path='.', quiet=True)"
    result = subprocess.run([sys.executable, "-c", code], env={**env, "VERBOSE": "1"}, cwd=env["HOME"],
                            capture_output=True, text=True, timeout=60)
    assert f"Basic {DUMMY_BASIC}" in result.stdout
    for name in ("HOME", "KAGGLE_CONFIG_DIR"):
        monkeypatch.setenv(name, env[name])
    scrubbed = kaggle_api.scrub(result.stdout + result.stderr)
    assert DUMMY_BASIC not in scrubbed and DUMMY_KEY not in scrubbed


@pytest.fixture
def submission(root: Path) -> Path:
    """A valid full-size submission made from the competition's data."""
    path = root / "submissions" / "submission.csv"
    path.parent.mkdir()
    rows = "".join(f"{i},{i % 10}\n" for i in range(1, COMPETITION_TEST_ROWS + 1))
    path.write_text("ImageId,Label\n" + rows)
    (root / "input" / "source.json").write_text('{"source": "kaggle"}\n')
    (root / "runs" / "rnn-h8-e1-000000").mkdir(parents=True)
    (root / "runs" / "rnn-h8-e1-000000" / "run.json").write_text('{"source": "kaggle"}\n')
    return path


def upload(root: Path, env: dict[str, str], message: str = "5-fold RNN",
           timeout: float = 30, wait: float = 20) -> subprocess.CompletedProcess:
    return run_cli(root, "upload", "--message", message, "--timeout", str(timeout), "--wait", str(wait),
                   env=env, **CLIENT)


@pytest.mark.slow
def test_upload_sends_the_file_and_prints_the_reference(root: Path, env: dict[str, str], fake: FakeKaggle,
                                                        submission: Path) -> None:
    env.update(VERBOSE="1", VERBOSE_OUTPUT="1")
    result = upload(root, env, "5-fold RNN, 30 epochs")
    assert result.returncode == 0, result.stderr
    assert "reference 4242" in result.stdout and SUBMIT_OK in result.stdout
    assert fake.uploaded == submission.read_bytes()
    assert fake.submit_request is not None
    assert fake.submit_request["submissionDescription"] == "5-fold RNN, 30 epochs"
    assert_no_secret(result)


CALL_FAILURES = {  # the command, what goes wrong, what its error says
    "upload-rejected": ("upload", _set(put_status=500), ["did not take the submission", "Could not submit"]),
    "ref-zero": ("upload", _set(submission={"message": "Submission limit reached", "ref": 0}),
                 ["did not take the submission", "Submission limit reached"]),
    "http-403": ("upload", _set(api_error=(403, "You must accept this competition's rules")),
                 ["HTTP 403", RULES_URL]),
    "server-hangs": ("upload", _set(hang_api=True), ["did not answer for 1.5 s"]),
    "lb-http-401": ("lb", _set(api_error=(401, "Unauthenticated")), ["HTTP 401", "https://www.kaggle.com/settings"]),
    "lb-no-network": ("lb", _no_network, ["cannot reach Kaggle"]),
    "lb-no-credentials": ("lb", _no_credentials, ["no Kaggle credentials"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CALL_FAILURES))
def test_upload_and_lb_failures_are_reported(case: str, root: Path, env: dict[str, str], fake: FakeKaggle,
                                             submission: Path) -> None:
    command, setup, phrases = CALL_FAILURES[case]
    setup(fake, env)
    timeout = HANG_TIMEOUT if case in HANGS else 30
    result = (upload(root, env, timeout=timeout) if command == "upload"
              else run_cli(root, "lb", "--timeout", str(timeout), env=env, **CLIENT))
    assert_one_clear_error(result, *phrases)
    assert result.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize("record", ["input/source.json", "runs/rnn-h8-e1-000000/run.json"])
def test_upload_refuses_a_submission_of_the_sample(record: str, root: Path, env: dict[str, str],
                                                   fake: FakeKaggle, submission: Path) -> None:
    (root / "runs" / "latest").write_text("rnn-h8-e1-000000\n")
    (root / record).write_text('{"source": "sample"}\n')
    assert_one_clear_error(upload(root, env), "built-in sample", record)
    assert fake.requests == []


@pytest.mark.slow
@pytest.mark.parametrize(("message", "wait", "rows", "phrases"), [
    ("  ", 20, COMPETITION_TEST_ROWS, ['MESSAGE="']), ("m", -1, COMPETITION_TEST_ROWS, ["WAIT=-1", "3600"]),
    ("m", 20, COMPETITION_TEST_ROWS - 1, [f"expected {COMPETITION_TEST_ROWS}"]),
], ids=["empty-message", "wait-out-of-range", "short-submission"])
def test_upload_refuses_bad_requests_before_anything_is_sent(message: str, wait: float, rows: int,
                                                             phrases: list[str], root: Path,
                                                             env: dict[str, str], fake: FakeKaggle,
                                                             submission: Path) -> None:
    submission.write_text("".join(submission.read_text().splitlines(keepends=True)[:rows + 1]))
    assert_one_clear_error(upload(root, env, message, wait=wait), *phrases)
    assert fake.requests == []


FULL_SIZE = "ImageId,Label\n" + "".join(f"{i},{i % 10}\n" for i in range(1, COMPETITION_TEST_ROWS + 1))


OLDER = {"ref": 1111, "date": "2026-11-02T09:30:00.000Z", "description": "made elsewhere",
         "status": "COMPLETE", "publicScore": "0.95000"}


@pytest.fixture
def made_here(run_copy: Path) -> tuple[Path, str]:
    """The finished sample run, as if made from the competition's data: its submission (current,
    kept and in its folder) full-size, its records saying source kaggle. Returns (root, run id)."""
    run_id = latest(Paths(run_copy))
    assert run_id
    record = json.loads((run_copy / "runs" / run_id / "run.json").read_text())
    for path in (run_copy / "submissions" / "submission.csv", run_copy / "submissions" / record["kept"],
                 run_copy / "runs" / run_id / "submission.csv"):
        path.write_text(FULL_SIZE)
    (run_copy / "runs" / run_id / "run.json").write_text(json.dumps({**record, "source": "kaggle"}))
    (run_copy / "input" / "source.json").write_text('{"source": "kaggle"}\n')
    return run_copy, run_id


@pytest.mark.slow
def test_upload_waits_for_the_score_and_runs_show_it_beside_oof(made_here: tuple[Path, str],
                                                                env: dict[str, str],
                                                                fake: FakeKaggle) -> None:
    root, run_id = made_here
    result = upload(root, env, "tiny rnn")
    assert result.returncode == 0, result.stderr
    assert f"made by {run_id}" in result.stdout and "public score 0.97100" in result.stdout
    assert fake.list_calls >= 2  # pending at first, then scored
    found = ledger.uploads(Paths(root))[4242]
    assert (found["run"], found["status"], found["public_score"]) == (run_id, "complete", 0.971)
    assert found["message"] == "tiny rnn" and found["kept"].endswith(".csv")
    table = run_cli(root, "runs", "--format", "csv", env=env, **CLIENT)
    assert table.returncode == 0, table.stderr
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(table.stdout))}
    assert rows[run_id]["LB"] == "0.97100"
    assert "0.97100" in run_cli(root, "runs", env=env, **CLIENT).stdout
    assert_no_secret(result)


@pytest.mark.slow
def test_make_upload_lb_and_runs_as_a_new_user_types_them(made_here: tuple[Path, str], tmp_path: Path,
                                                          env: dict[str, str], fake: FakeKaggle) -> None:
    """The README's lines through make, in a fresh clone holding the finished run."""
    root, run_id = made_here
    clone = fresh_clone(tmp_path / "clone")
    for folder in ("input", "runs", "submissions"):
        shutil.copytree(root / folder, clone / folder)
    env = {k: v for k, v in env.items() if not k.startswith(("MAKE", "MFLAGS"))}

    def make(*args: str) -> subprocess.CompletedProcess:
        return run_make(*args, "SETUP=", f"PY={sys.executable}", cwd=clone, env=env)

    sent = make("upload", 'MESSAGE=gru blend, "quoted", paid $5 for $(USER)', "WAIT=20")
    assert sent.returncode == 0, sent.stderr
    assert "public score 0.97100" in sent.stdout
    assert fake.submit_request is not None
    assert fake.submit_request["submissionDescription"] == 'gru blend, "quoted", paid $5 for $(USER)'
    board = make("lb")
    assert board.returncode == 0, board.stderr
    assert board.stdout.splitlines()[0].split() == ["date", "description", "status", "public", "score",
                                                    "ref", "from"]
    assert run_id in board.stdout and "0.97100" in board.stdout
    listed = make("runs", "FORMAT=csv")
    assert listed.returncode == 0, listed.stderr
    assert {r["run"]: r["LB"] for r in csv.DictReader(io.StringIO(listed.stdout))}[run_id] == "0.97100"
    assert_no_secret(sent)


@pytest.mark.slow
def test_a_scoring_error_is_reported_and_recorded(root: Path, env: dict[str, str], fake: FakeKaggle,
                                                  submission: Path) -> None:
    fake.score_script = ["pending", "error"]
    assert_one_clear_error(upload(root, env), "could not score it", "Submission CSV Not Found")
    found = ledger.uploads(Paths(root))[4242]
    assert found["status"] == "error" and found["error"] == "Submission CSV Not Found"


@pytest.mark.slow
def test_never_scored_within_wait_stays_pending_until_lb(root: Path, env: dict[str, str], fake: FakeKaggle,
                                                         submission: Path) -> None:
    fake.score_script = ["pending"]
    fake.listed = [OLDER]
    started = time.monotonic()
    result = upload(root, env, "first try", wait=1.5)
    assert result.returncode == 0, result.stderr
    assert "not scored within WAIT=1.5 s" in result.stdout and "make lb" in result.stdout
    assert time.monotonic() - started < 20
    assert ledger.uploads(Paths(root))[4242]["status"] == "pending"
    fake.score_script = ["complete"]  # Kaggle scores it later
    listed = run_cli(root, "lb", env=env, **CLIENT)
    assert listed.returncode == 0, listed.stderr
    ours, older = [line for line in listed.stdout.splitlines() if "complete" in line]
    assert "first try" in ours and "0.97100" in ours and "4242" in ours and "(unknown run)" in ours
    assert "made elsewhere" in older and "0.95000" in older and older.rstrip().endswith("-")
    assert ledger.uploads(Paths(root))[4242]["public_score"] == 0.971  # recorded by `make lb`
    lines = ledger.runs_path(Paths(root)).read_text().count("\n")
    assert run_cli(root, "lb", "--format", "csv", env=env, **CLIENT).returncode == 0
    assert ledger.runs_path(Paths(root)).read_text().count("\n") == lines  # nothing new to record


@pytest.mark.slow
def test_ctrl_c_while_waiting_for_the_score_names_the_upload_not_a_rerun(
        root: Path, env: dict[str, str], fake: FakeKaggle, submission: Path) -> None:
    """A rerun would upload a second time (a daily submission spent): the message names the
    recorded reference and `make lb`, which brings the score."""
    fake.score_script = ["pending"]
    proc = start_cli(root, "upload", "--message", "tiny rnn", "--wait", "60", env=env, full_env=True,
                     output=True, sigint=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and fake.list_calls == 0:  # taken, recorded, now polling
        time.sleep(0.05)
    assert fake.list_calls, "the upload never started waiting for its score"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "reference 4242" in err and "`make lb` brings its score" in err, err
    assert "rerun the same command" not in err
    assert ledger.uploads(Paths(root))[4242]["status"] == "pending" and len(fake.made) == 1


@pytest.mark.slow
def test_lb_keeps_each_row_on_one_line_and_names_a_damaged_ledger_line(
        root: Path, env: dict[str, str], fake: FakeKaggle) -> None:
    """A description typed with a newline stays in its row; a torn line of submissions/runs.jsonl
    is named once, the lines around it still read."""
    fake.listed = [{**OLDER, "description": "first line\nsecond line"}]
    book = root / "submissions" / "runs.jsonl"
    book.parent.mkdir()
    upload_entry = {"kind": "upload", "ref": 1111, "run": "rnn-h8-e1-000000", "message": "m",
                    "status": "pending"}
    book.write_text('{"run": "rnn-h8-e1-000000", "model": "rnn"}\n{"kind": "upl\n'
                    + json.dumps(upload_entry) + "\n")
    listed = run_cli(root, "lb", env=env, **CLIENT)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 4, listed.stdout  # header, rule, one row, the closing line
    assert "first line\\nsecond line" in lines[2] and lines[2].rstrip().endswith("rnn-h8-e1-000000")
    assert listed.stderr.count("runs.jsonl") == 1 and "line 2" in listed.stderr, listed.stderr


@pytest.mark.slow
def test_a_score_that_fails_to_arrive_never_loses_the_upload(root: Path, env: dict[str, str],
                                                             fake: FakeKaggle, submission: Path) -> None:
    fake.list_error = (500, "Internal error")
    result = upload(root, env)
    assert result.returncode == 0, result.stderr
    assert "the upload is recorded (reference 4242)" in result.stderr and "make lb" in result.stderr
    assert "HTTP 500" in result.stderr
    found = ledger.uploads(Paths(root))[4242]
    assert found["status"] == "pending" and found["message"] == "5-fold RNN"


@pytest.mark.slow
def test_wait_zero_does_not_ask_for_the_score(root: Path, env: dict[str, str], fake: FakeKaggle,
                                              submission: Path) -> None:
    result = upload(root, env, wait=0)
    assert result.returncode == 0, result.stderr
    assert "WAIT=0" in result.stdout and fake.list_calls == 0
    assert 4242 in ledger.uploads(Paths(root))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME and no KAGGLE_* variables, for credentials_source."""
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name == "XDG_CONFIG_HOME":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def write_kaggle_json(folder: Path, **values: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kaggle.json").write_text(json.dumps(values))
    return folder / "kaggle.json"


@pytest.mark.slow
def test_credentials_follow_the_clients_order(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert kaggle_api.credentials_source() is None
    write_kaggle_json(home / ".kaggle", username=DUMMY_USER)  # a key is missing: not usable
    assert kaggle_api.credentials_source() is None
    (home / ".kaggle" / "kaggle.json").write_text("{not json")
    assert kaggle_api.credentials_source() is None
    (home / ".kaggle" / "credentials.json").write_text("{}")
    assert kaggle_api.credentials_source() == str(home / ".kaggle" / "credentials.json")
    path = write_kaggle_json(home / ".kaggle", username=DUMMY_USER, key=DUMMY_KEY)
    assert kaggle_api.credentials_source() == str(path)
    monkeypatch.setenv("KAGGLE_USERNAME", "u")
    monkeypatch.setenv("KAGGLE_KEY", "k")
    assert kaggle_api.credentials_source() == "KAGGLE_USERNAME/KAGGLE_KEY"
    (home / ".kaggle" / "access_token").write_text("token\n")
    assert kaggle_api.credentials_source() == str(home / ".kaggle" / "access_token")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token")
    assert kaggle_api.credentials_source() == "KAGGLE_API_TOKEN"


@pytest.mark.slow
def test_a_notebooks_own_token_comes_first_and_is_scrubbed(home: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (home / "nb-token").write_text("KGAT_notebook_own_token_123\n")
    monkeypatch.setenv("KAGGLE_API_V1_TOKEN", str(home / "nb-token"))
    monkeypatch.setenv("KAGGLE_API_TOKEN", DUMMY_TOKEN)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert kaggle_api.credentials_source() == "KAGGLE_API_TOKEN"  # the client needs the proxy too
    monkeypatch.setenv("KAGGLE_DATA_PROXY_URL", "http://proxy.invalid")
    assert kaggle_api.credentials_source().startswith("KAGGLE_API_V1_TOKEN")
    assert "KGAT_notebook_own_token_123" not in kaggle_api.scrub("token KGAT_notebook_own_token_123")


@pytest.mark.slow
def test_credentials_in_config_dir_xdg_and_mixed(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = write_kaggle_json(home / ".config" / "kaggle", username=DUMMY_USER, key=DUMMY_KEY)
    if sys.platform.startswith("linux"):
        assert kaggle_api.credentials_source() == str(xdg)
    custom = write_kaggle_json(home / "elsewhere", username=DUMMY_USER)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / "elsewhere"))
    assert kaggle_api.credentials_source() is None
    monkeypatch.setenv("KAGGLE_KEY", DUMMY_KEY)  # the client merges the key from the environment
    assert kaggle_api.credentials_source() == str(custom)


@pytest.mark.slow
def test_scrub_removes_keys_and_authorization(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_kaggle_json(home / ".kaggle", username=DUMMY_USER, key=DUMMY_KEY)
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_abcdef123456")
    text = kaggle_api.scrub(f"key {DUMMY_KEY} basic {DUMMY_BASIC}\nAuthorization: Bearer xyz-1234567\n"
                            "token KGAT_abcdef123456")
    for secret in (DUMMY_KEY, DUMMY_BASIC, "xyz-1234567", "KGAT_abcdef123456"):
        assert secret not in text


@pytest.mark.slow
def test_auto_falls_back_to_the_sample_without_credentials(home: Path) -> None:
    assert download._choose_source({}, False) == ("sample", None,
                                                  "no files in input/ and no Kaggle credentials")
    write_kaggle_json(home / ".kaggle", username=DUMMY_USER, key=DUMMY_KEY)
    source, _, why = download._choose_source({}, False)
    assert source == "kaggle" and str(home / ".kaggle" / "kaggle.json") in why


@pytest.mark.slow
@pytest.mark.parametrize(("data", "phrase"), [
    (patch_headers(make_zip(BOTH), (6, 8), lambda f: bytes([f[0] | 1]) + f[1:]), "truncated or corrupt"),
    (make_zip({**BOTH, "..\\evil.csv": b"x"}), "unsafe path"),
    (make_zip({**BOTH, "C:/evil.csv": b"x"}), "unsafe path"),
    (b"", "truncated or corrupt"),
], ids=["encrypted", "backslash-dotdot", "drive-letter", "empty"])
def test_unpack_refuses_more_bad_archives(data: bytes, phrase: str, tmp_path: Path) -> None:
    (tmp_path / "a.zip").write_bytes(data)
    with pytest.raises(PipelineError, match=phrase):
        kaggle_api.unpack(tmp_path / "a.zip", tmp_path, ("train.csv", "test.csv"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


@pytest.mark.parametrize(("module", "function"), [("os", "system"), ("pipeline.kaggle.api", "call"),
                                                  ("pipeline.stages.upload", "_child_x")])
def test_the_client_child_runs_only_its_own_functions(module: str, function: str, tmp_path: Path) -> None:
    """The child runs what its request file names: only a `_child_` function of pipeline.kaggle."""
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"module": module, "function": function, "kwargs": {"command": "true"}}))
    kaggle_api._child_main(str(request))
    result = json.loads((tmp_path / "result.json").read_text())
    assert "ok" not in result
    assert f"not a function of the kaggle child: {module}.{function}" in result["error"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["scored-after-the-timeout", "list-hangs"])
def test_the_wait_for_a_score_ends_on_silence_not_on_a_long_wait(case: str, root: Path, env: dict[str, str],
                                                                 fake: FakeKaggle, submission: Path) -> None:
    """TIMEOUT bounds each silence, not the wait: answers every second keep a 4 s wait going past a 2 s
    TIMEOUT; a list call that never answers ends after 2 s, the upload still recorded."""
    fake.score_script = ["pending"] * 4 + ["complete"]
    fake.hang_list = case == "list-hangs"
    started = time.monotonic()
    result = upload(root, env, timeout=2, wait=60)
    assert result.returncode == 0, result.stderr
    scored = case == "scored-after-the-timeout"
    assert ("public score 0.97100" in result.stdout) == scored, result.stdout + result.stderr
    assert ("did not answer for 2 s" in result.stdout + result.stderr) != scored
    assert ledger.uploads(Paths(root))[4242]["status"] == ("complete" if scored else "pending")
    assert time.monotonic() - started < 30
