"""Everything that touches the official ``kaggle`` client lives in this package.

Importing the client has side effects (it authenticates, may make a network call that never times
out, creates its config folder and prints help on stdout) and, with VERBOSE set, it prints the
Authorization header. So the pipeline never imports it: call() runs each ``_child_*`` function in a
child process that it kills after its own timeout, whose output is captured and scrubbed, and whose
outcome comes back as a small JSON file.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import COMPETITION
from pipeline.errors import PipelineError
from pipeline.store.io import read_json

TOKEN_URL = "https://www.kaggle.com/settings"
# The real files unpack to ~125 MB; anything near this is not the competition's archive.
MAX_UNPACKED_BYTES = 1 << 30
# Read by the client at import; either makes it print the Authorization header.
NOISY_ENV = ("VERBOSE", "VERBOSE_OUTPUT")
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding pipeline/
# `make lb` lists at most this many of the account's submissions (newest first).
LIST_SIZE = 100


# --- where the client finds credentials (mirrors KaggleApi.authenticate, without importing it) --------

def config_dir() -> Path:
    """The client's config folder: KAGGLE_CONFIG_DIR, else ~/.kaggle if present, else XDG."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    home = Path.home() / ".kaggle"
    if sys.platform.startswith("linux") and not home.exists():
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    return home


def _read_json_file(path: Path) -> dict[str, Any]:
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def _text(path: Path | None) -> str:
    """A file's text, stripped; '' when there is none."""
    try:
        return path.read_text(encoding="utf-8").strip() if path and path.is_file() else ""
    except (OSError, ValueError):  # unreadable, not text, or not a usable path at all
        return ""


def notebook_token() -> Path | None:
    """In a Kaggle notebook, the file of the token Kaggle gives the notebook itself, which the client
    tries first (kagglesdk's get_access_token_from_env), when it is there."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") is None or os.environ.get("KAGGLE_DATA_PROXY_URL") is None:
        return None
    path = os.environ.get("KAGGLE_API_V1_TOKEN")
    return Path(path) if path and _text(Path(path)) else None


def credentials_source() -> str | None:
    """Where the client would find credentials, in its own order (None when nowhere)."""
    home = Path.home() / ".kaggle"
    if notebook_token():
        return "KAGGLE_API_V1_TOKEN (the notebook's own token)"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    for token in (home / "access_token", home / "access_token.txt"):
        if _text(token):
            return str(token)
    # Legacy key: username and key each come from the environment or <config dir>/kaggle.json.
    config_file = config_dir() / "kaggle.json"
    values = {k: v for k, v in _read_json_file(config_file).items() if v}
    from_env = {name: bool(os.environ.get(f"KAGGLE_{name.upper()}")) for name in ("username", "key")}
    if all(from_env.values()):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    if all(from_env[name] or name in values for name in from_env):
        return str(config_file)
    if (home / "credentials.json").is_file():
        return str(home / "credentials.json")
    return None


# --- keeping secrets out of anything printed -------------------------------------------------------

def _secret_values() -> list[str]:
    """Every credential value the client could be using, plus the Basic-auth form of each."""
    home = Path.home() / ".kaggle"
    config = _read_json_file(config_dir() / "kaggle.json")
    values = [os.environ.get("KAGGLE_KEY", ""), str(config.get("key", ""))]
    token = os.environ.get("KAGGLE_API_TOKEN", "")
    token_files = (Path(token) if token else None, home / "access_token", home / "access_token.txt",
                   notebook_token())
    values += [token, *(_text(path) for path in token_files)]
    values += [str(v) for v in _read_json_file(home / "credentials.json").values() if isinstance(v, str)]
    users = {os.environ.get("KAGGLE_USERNAME", ""), str(config.get("username", ""))} - {""}
    values += [base64.b64encode(f"{u}:{v}".encode()).decode() for u in users for v in values if v]
    return sorted({v for v in values if len(v) >= 6}, key=len, reverse=True)


# An Authorization header (or JSON field) up to the end of its value, and bare Basic/Bearer tokens.
_AUTH_PATTERN = re.compile(
    r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)[^\r\n\"']*|\b(basic|bearer)\s+[\w+/=.-]{8,}")


def scrub(text: str) -> str:
    """The text with every known credential and any Authorization header value blanked out."""
    for secret in _secret_values():
        text = text.replace(secret, "[redacted]")
    return _AUTH_PATTERN.sub(lambda m: (m.group(1) or m.group(2)) + " [redacted]", text)


# --- the parent side: run the client in a child, bounded by our own timeout ------------------------

def download_competition(dest: Path, timeout: float) -> dict[str, Path]:
    """Download the competition's archive and unpack train.csv and test.csv into dest (a fresh folder)."""
    _warn_if_readable()
    files = dest / "archive"
    files.mkdir()
    call(_child_download, timeout, files, folder=str(files))
    return unpack(_the_archive(files), dest, ("train.csv", "test.csv"))


def submit(csv_path: Path, message: str, timeout: float) -> tuple[int, str]:
    """Submit a CSV; returns Kaggle's (reference, message). A reference of 0 means it was refused."""
    _warn_if_readable()
    result = call(_child_submit, timeout, csv_path=str(csv_path), message=message)
    return int(result.get("ref") or 0), str(result.get("message") or "")


def submissions(timeout: float) -> list[dict[str, Any]]:
    """The competition's submissions of this account, newest first (see _submission_record)."""
    return [s for s in call(_child_submissions, timeout).get("submissions", []) if isinstance(s, dict)]


def wait_for_score(ref: int, wait: float, timeout: float) -> dict[str, Any]:
    """Poll the submission list until submission ref is scored or fails, or wait seconds pass.

    Returns its record (status "pending" when time ran out; "found": False when the list never
    showed it). The child polls in one process; each answer it gets counts as progress, so a list
    call that hangs still ends after timeout seconds of silence.
    """
    # Polls come at least twice per timeout: the silence between two answers must never look like a hang.
    interval = min(10.0, max(0.5, wait / 20), timeout / 2)
    result = call(_child_wait, timeout, ref=ref, wait=wait, interval=interval)
    return dict(result.get("submission") or {"ref": ref, "status": "pending", "found": False})


def _warn_if_readable() -> None:
    """The client's own warning is swallowed with the rest of its output, so repeat it."""
    config_file = config_dir() / "kaggle.json"
    with contextlib.suppress(OSError):
        if os.name != "nt" and config_file.stat().st_mode & 0o077:
            print(f"warning: {config_file} is readable by other users; run: chmod 600 {config_file}",
                  file=sys.stderr)


def call(child: Callable[..., dict[str, Any]], timeout: float, progress_dir: Path | None = None,
         forbidden: str = "", **kwargs: Any) -> dict[str, Any]:
    """child(**kwargs), a ``_child_*`` function of this package, run in a child process; returns what it
    returned. A PipelineError when the child is silent for timeout seconds (progress_dir, else its own
    folder, growing counts as news), returns nothing, or tells of an error (an HTTP 403 in forbidden's
    words, when given, with Kaggle's {detail}), its words scrubbed of every credential."""
    if not timeout > 0:
        raise PipelineError(f"timeout must be a positive number of seconds, got {timeout}")
    # The user's environment as is (credentials, proxies...), less the switches that print secrets.
    env = {k: v for k, v in os.environ.items() if k not in NOISY_ENV}
    # The child must import this package even when it is not installed (e.g. run from a checkout).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    # The child's request, result and cwd; its output goes to a file outside that folder (a file never
    # fills up and blocks a chatty client, as a pipe would, and its growth is no progress).
    with tempfile.TemporaryDirectory(prefix="digits-kaggle-") as tmp, tempfile.TemporaryFile() as output:
        Path(tmp, "request.json").write_text(json.dumps({"module": child.__module__, "kwargs": kwargs,
                                                         "function": child.__name__, "forbidden": forbidden}))
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.kaggle.api", "request.json"], cwd=tmp,
                                env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        try:
            _wait(proc, timeout, progress_dir or Path(tmp))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        result = _read_json_file(Path(tmp, "result.json"))
        output.seek(0)
        said = output.read().decode("utf-8", "replace")
    if not result:
        tail = scrub(said).strip().splitlines()[-5:]
        raise PipelineError(f"the kaggle client stopped unexpectedly (exit code {proc.returncode})"
                            + (":\n  " + "\n  ".join(tail) if tail else ""))
    if result.get("error"):
        raise PipelineError(scrub(str(result["error"])))
    return result


def _tree_size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):  # the client renamed or removed it meanwhile
            total += path.stat().st_size
    return total


def _wait(proc: subprocess.Popen, timeout: float, progress_dir: Path) -> None:
    """Wait for the child; give up once it has made no progress (bytes downloaded) for timeout s."""
    size, last_progress = -1, time.monotonic()
    while proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)
        now_size = _tree_size(progress_dir)
        if now_size != size:
            size, last_progress = now_size, time.monotonic()
        elif time.monotonic() - last_progress > timeout:
            raise PipelineError(f"Kaggle did not answer for {timeout:g} s, so the pipeline gave up. "
                                "Check your network connection and retry; on a slow link allow "
                                "longer with TIMEOUT=<seconds> (--timeout)")


# --- the archive: trust nothing in it ---------------------------------------------------------------

def _the_archive(folder: Path) -> Path:
    expected = folder / f"{COMPETITION}.zip"
    if expected.is_file():
        return expected
    found = [p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".kaggle-partial")]
    if len(found) != 1:
        raise PipelineError(f"Kaggle sent {len(found)} files where one archive {expected.name} was expected")
    return found[0]


def unsafe(name: str) -> bool:
    """Absolute paths, drive letters and '..' could write outside the target folder."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts


def unpack(archive: Path, dest: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Extract the named top-level members after checking the whole archive; returns their paths."""
    try:
        with zipfile.ZipFile(archive) as zf:
            _check_members(zf.infolist(), names)
            for name in names:
                _extract(zf, name, dest / name)
    # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method.
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError,
            NotImplementedError) as exc:
        raise PipelineError(f"the archive Kaggle sent is truncated or corrupt ({exc}); "
                            "nothing was changed in input/, retry the download") from exc
    return {name: dest / name for name in names}


def _extract(zf: zipfile.ZipFile, name: str, target: Path) -> None:
    # zipfile stops at the member's declared size and checks its CRC, so no member can unpack
    # to more than the sizes _check_members accepted.
    with zf.open(name) as src:
        try:
            with open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except OSError as exc:  # our side (disk full, permissions), not the archive's fault
            raise PipelineError(f"{target.parent}: cannot unpack here ({exc.strerror or exc})") from exc


def _check_members(infos: list[zipfile.ZipInfo], names: tuple[str, ...]) -> None:
    if bad := [i.filename for i in infos if unsafe(i.filename)]:
        raise PipelineError(f"the archive Kaggle sent has a member with an unsafe path ({bad[0]!r}); "
                            "refusing to unpack it")
    total = sum(i.file_size for i in infos)
    if total > MAX_UNPACKED_BYTES:
        raise PipelineError(f"the archive Kaggle sent would unpack to {total:,} bytes, far more than "
                            "the competition's files; refusing to unpack it")
    present = {i.filename for i in infos}
    if missing := [n for n in names if n not in present]:
        raise PipelineError(f"the archive Kaggle sent has no {' or '.join(missing)} "
                            f"(it holds: {', '.join(sorted(present)) or 'nothing'}); "
                            "is this the right competition?")


# --- the child side: the only code that imports the client ------------------------------------------

def _child_download(folder: str) -> dict[str, Any]:
    client().competition_download_files(COMPETITION, path=folder, force=True, quiet=True, unzip=False)
    return {}


def _child_submit(csv_path: str, message: str) -> dict[str, Any]:
    response = client().competition_submit(csv_path, message, COMPETITION, quiet=True)
    return {"ref": response.ref or 0, "message": response.message or ""}


def _child_submissions() -> dict[str, Any]:
    listed = client().competition_submissions(COMPETITION, page_size=LIST_SIZE) or []
    return {"submissions": [_submission_record(s) for s in listed if s is not None]}


def _child_wait(ref: int, wait: float, interval: float) -> dict[str, Any]:
    api = client()
    deadline = time.monotonic() + wait
    record: dict[str, Any] = {"ref": ref, "status": "pending", "found": False}
    while True:
        # The newest submissions come first: the one just made is on the first page.
        for submission in api.competition_submissions(COMPETITION) or []:
            if submission is not None and int(submission.ref or 0) == ref:
                record = {**_submission_record(submission), "found": True}
        with open("beat", "a", encoding="utf-8") as handle:  # in its folder: progress, for call's timeout
            handle.write(".")
        if record["status"] != "pending" or time.monotonic() + interval > deadline:
            return {"submission": record}
        time.sleep(interval)


def _submission_record(submission: Any) -> dict[str, Any]:
    """An ApiSubmission as plain data: ref, date, description, status (pending, complete or error),
    public_score and private_score (floats or None), error (Kaggle's error description) and file_name."""
    status = getattr(submission.status, "name", str(submission.status or "PENDING"))
    return {"ref": int(submission.ref or 0),
            "date": submission.date.isoformat(timespec="seconds") if submission.date else "",
            "description": submission.description or "", "status": status.lower(),
            "public_score": _score(submission.public_score),
            "private_score": _score(submission.private_score),
            "error": submission.error_description or "", "file_name": submission.file_name or ""}


def _score(text: Any) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except (TypeError, ValueError):
        return None


def client() -> Any:
    """The official client, authenticated (in a child process only)."""
    import kaggle  # authenticates at import, swallowing any failure

    api = kaggle.api
    if not getattr(api, "_authenticated", False):
        api.authenticate()  # again, to see the failure: SystemExit when there are no credentials
    return api


def _failure(exc: BaseException, forbidden: str) -> str:
    """What went wrong, in the user's words (the parent scrubs them of credentials before showing them)."""
    import requests

    if isinstance(exc, SystemExit) and (found := credentials_source()):
        return (f"Kaggle did not accept the credentials in {found} (an expired or invalid token?). "
                f"Create a new API token at {TOKEN_URL}")
    if isinstance(exc, SystemExit):
        # ~/.kaggle is the folder users know; the client prefers it over XDG as soon as it exists.
        folder = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
        return ("no Kaggle credentials found. Create an API token at "
                f"{TOKEN_URL} (section API) and save kaggle.json as {folder / 'kaggle.json'} "
                "(chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN. Without an "
                "account: make download SOURCE=sample (built-in sample) or SOURCE=dir DIR=<folder>")
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return (f"cannot reach Kaggle ({type(exc).__name__}). Check your network connection "
                "(and HTTP_PROXY/HTTPS_PROXY if you use a proxy), then retry")
    if not isinstance(exc, requests.exceptions.HTTPError):
        return f"the kaggle client failed: {type(exc).__name__}: {exc}"
    status, detail = exc.response.status_code if exc.response is not None else None, str(exc).strip()
    if status == 401:
        found = credentials_source() or "your Kaggle credentials"
        return (f"Kaggle rejected the credentials (HTTP 401) from {found}: the username or key is wrong "
                f"or expired. Create a new API token at {TOKEN_URL} and replace the old one")
    if status == 403:
        return forbidden.format(detail=detail or "no detail") or (
            f"Kaggle refused access to '{COMPETITION}' (HTTP 403): accept the competition rules at "
            f"https://www.kaggle.com/competitions/{COMPETITION}/rules (signed in as the account of your "
            "API token), then retry")
    return f"Kaggle answered HTTP {status}: {detail or 'no detail'}; retry later"


def _child_main(request_file: str) -> None:
    """Run the function call() asked for and write its outcome where call() reads it."""
    for name in NOISY_ENV:  # the parent removed them already; never rely on one guard alone
        os.environ.pop(name, None)
    request = json.loads(Path(request_file).read_text(encoding="utf-8"))
    try:
        module, function = request["module"], request["function"]
        if not (module.startswith("pipeline.kaggle.") and function.startswith("_child_")):
            raise ValueError(f"not a function of the kaggle child: {module}.{function}")
        result = {"ok": True, **getattr(importlib.import_module(module), function)(**request["kwargs"])}
    except BaseException as exc:  # SystemExit included: the client exits when it has no credentials
        result = {"error": _failure(exc, request.get("forbidden", ""))}
    Path(request_file).with_name("result.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    _child_main(sys.argv[1])
