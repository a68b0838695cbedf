"""Kaggle kernels through the official client: push one script as a private kernel, follow its
session, list and fetch its output, delete it, and read the account's GPU quota.

Each call runs the client in a child process through api.call, as api.py's own calls do. pack() makes
the script: the project's code travels inside it as a gzipped tarball, so a push needs no dataset and no
second upload.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import io
import json
import pprint
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import COMPETITION
from pipeline.errors import PipelineError
from pipeline.kaggle import api

SCRIPT = "digits_run.py"
METADATA = "kernel-metadata.json"
# What of the project travels: the package and the files that build and run it; no data, no runs,
# no credentials (nothing outside this list is read).
PACKED_FILES = ("Makefile", "pyproject.toml")
PAGE_SIZE = 20  # output files per listing page, as the client's own `kernels output` asks
MAX_PAGES = 100
SESSION_CAP = "Maximum batch GPU session count"
# A kernel call Kaggle refused with HTTP 403 says what a GPU kernel needs ({detail}: Kaggle's words).
FORBIDDEN = ("Kaggle refused (HTTP 403: {detail}). Running a kernel on a GPU needs a phone-verified account "
             f"(https://www.kaggle.com/settings) and the rules of '{COMPETITION}' accepted "
             f"(https://www.kaggle.com/competitions/{COMPETITION}/rules)")

BOOTSTRAP = '''"""digits: run {run} of the Digit Recognizer pipeline, pushed by `make kaggle-run`.

The project's code travels below as a gzipped tarball (its pipeline/ package, Makefile and
pyproject.toml: no data, no credentials). This script unpacks it into a temporary folder and makes
the run JOB describes in the pipeline's Kaggle-notebook mode; the run's files and a manifest of them
(names, sizes, SHA-256) land in /kaggle/working, the session's output.
"""
import base64
import hashlib
import io
import sys
import tarfile
import tempfile

JOB = {job}

CODE = """
{code}
"""

if sys.version_info < (3, 11):
    sys.exit("kaggle-run: ERROR: this session's Python %s is too old: the pipeline needs 3.11 or newer"
             % sys.version.split()[0])
code = base64.b64decode(CODE)
project = tempfile.mkdtemp(prefix="digits-")
with tarfile.open(fileobj=io.BytesIO(code), mode="r:gz") as tar:
    tar.extractall(project, **({{"filter": "data"}} if hasattr(tarfile, "data_filter") else {{}}))
sys.path.insert(0, project)
from pipeline.kaggle import remote  # noqa: E402  (the unpacked copy: first on the path)

sys.exit(remote.main(JOB, project, hashlib.sha256(code).hexdigest()))
'''


# -- what is pushed --------------------------------------------------------------------------------

def _code_files() -> list[tuple[str, Path]]:
    """(name in the tarball, file) of every file that travels, in a fixed order."""
    root = api.PACKAGE_PARENT
    found = [(p.relative_to(root).as_posix(), p) for p in (root / "pipeline").rglob("*.py")
             if "__pycache__" not in p.parts]
    found += [(name, root / name) for name in PACKED_FILES if (root / name).is_file()]
    return sorted(found)


def code_archive() -> bytes:
    """The project's code as a gzipped tarball, the same bytes for the same files (no times, no
    owners), so its hash names the code."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in _code_files():
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def pack(job: dict[str, Any]) -> tuple[str, str]:
    """The one script Kaggle runs, and the SHA-256 of the code inside it (the remote side writes it
    into its manifest). job: plain values only (it is written as a Python literal)."""
    code = code_archive()
    lines = base64.encodebytes(code).decode("ascii").strip()  # 76 characters a line
    script = BOOTSTRAP.format(run=job["run"], job=pprint.pformat(job, width=100, sort_dicts=False),
                              code=lines)
    return script, hashlib.sha256(code).hexdigest()


# -- the parent side: each call a child process, bounded by the timeout -----------------------------

@dataclass(frozen=True)
class Pushed:
    """A kernel version Kaggle took: who owns it, its slug, version and page."""

    owner: str
    slug: str
    version: int
    url: str

    @property
    def kernel(self) -> str:
        return f"{self.owner}/{self.slug}"


@dataclass(frozen=True)
class Output:
    """What a finished session left in its output: the download address of every file name as listed
    (unsafe ones too), and the session's log as text."""

    urls: dict[str, str]
    log: str


@dataclass(frozen=True)
class Quota:
    """The account's weekly GPU hours, in seconds; refresh: when they are given back (ISO time)."""

    used: float
    allowed: float
    refresh: str

    @property
    def left(self) -> float:
        return max(0.0, self.allowed - self.used)

    def text(self) -> str:
        when = f"; refreshes {self.refresh}" if self.refresh else ""
        return (f"{self.used / 3600:.2f} h used of {self.allowed / 3600:.2f} h "
                f"({self.left / 3600:.2f} h left){when}")


_call = functools.partial(api.call, forbidden=FORBIDDEN)


def push(script: str, slug: str, accelerator: str, deadline: float, timeout: float) -> Pushed:
    """Push the script as a new private kernel with the competition attached, internet off, on the
    accelerator ("none": no accelerator) with a session limit of deadline seconds. A refusal (an
    `error`, no version number, a competition Kaggle would not attach) is a PipelineError in
    Kaggle's own words."""
    with tempfile.TemporaryDirectory(prefix="digits-kernel-") as folder:
        Path(folder, SCRIPT).write_text(script, encoding="utf-8")
        result = _call(_child_push, timeout, folder=folder, slug=slug, accelerator=accelerator,
                       deadline=int(deadline))
    error, version = str(result.get("answer_error") or ""), result.get("version")
    if error:
        hint = (" (wait until one of your sessions ends, or stop one at https://www.kaggle.com/code)"
                if SESSION_CAP.lower() in error.lower() else "")
        raise PipelineError(f"Kaggle refused the kernel: {error}{hint}")
    if refused := [str(s) for s in result.get("invalid_competition_sources") or []]:
        raise PipelineError(f"Kaggle would not attach the competition ({', '.join(refused)}): accept its "
                            f"rules at https://www.kaggle.com/competitions/{COMPETITION}/rules")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PipelineError(f"Kaggle's answer to the push has no version number (it said: ref "
                            f"{result.get('ref') or 'none'}, url {result.get('url') or 'none'}), so "
                            "no session can be followed; nothing was started here")
    return Pushed(str(result["owner"]), slug, version, str(result.get("url") or ""))


def status(pushed: Pushed, timeout: float) -> tuple[str, str]:
    """The session's status (QUEUED, RUNNING, COMPLETE, ERROR, CANCEL_REQUESTED, ...) and Kaggle's
    failure message ('' when none)."""
    result = _call(_child_status, timeout, slug=pushed.slug, version=pushed.version)
    return str(result.get("status") or "QUEUED"), str(result.get("failure") or "")


def output(pushed: Pushed, timeout: float, first: tuple[str, Path, int] | None = None) -> Output:
    """The session's output listing and log. first: (a listed name, a file, most bytes) to fetch in
    the same call when the listing has that name (the manifest, before anything else is fetched)."""
    fetch = {"name": first[0], "path": str(first[1]), "most": first[2]} if first else None
    result = _call(_child_output, timeout, slug=pushed.slug, version=pushed.version, first=fetch,
                   timeout_s=timeout)
    files = [f for f in result.get("files") or [] if isinstance(f, dict)]
    return Output({str(f.get("name") or ""): str(f.get("url")) for f in files}, log_text(result.get("log")))


def fetch(plan: list[tuple[str, Path, int]], timeout: float) -> None:
    """Download each (url, file, most bytes) with a plain GET; a file larger than its most is cut
    just past it (for the caller's size check to refuse). Stops after timeout s without a byte."""
    if not plan:
        return
    _call(_child_fetch, timeout, plan[0][1].parent, timeout_s=timeout,
          plan=[{"url": u, "path": str(p), "most": n} for u, p, n in plan])


def delete(slug: str, timeout: float) -> tuple[str, bool, str]:
    """Delete the kernel, which stops its session. Returns (owner, whether Kaggle had it, Kaggle's
    complaint or '')."""
    result = _call(_child_delete, timeout, slug=slug)
    return str(result.get("owner") or ""), bool(result.get("found")), str(result.get("message") or "")


def quota(timeout: float) -> Quota | None:
    """The account's GPU quota; None when Kaggle's answer has none."""
    result = _call(_child_quota, timeout)
    gpu = result.get("gpu")
    if not isinstance(gpu, dict):
        return None
    return Quota(float(gpu["used"]), float(gpu["allowed"]), str(result.get("refresh") or ""))


def log_text(log: Any) -> str:
    """A session's log as text: Kaggle keeps it as a JSON list of {stream_name, time, data}."""
    if not isinstance(log, str):
        return ""
    with contextlib.suppress(ValueError):  # not JSON: the log as it is
        if isinstance(entries := json.loads(log), list):
            return "".join(str(e.get("data", "")) for e in entries if isinstance(e, dict))
    return log


SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def safe_name(name: str) -> bool:
    """A plain file name that stays in the folder it is saved to: no separator, no '..', no leading dot."""
    return bool(SAFE_NAME.fullmatch(name)) and ".." not in name


def escapes(name: str) -> bool:
    """Whether a listed name, joined to a folder, could point outside it (absolute, a drive, '..')."""
    return not name or api.unsafe(name)


# -- the child side: the only code here that imports the client -------------------------------------

def _owner(client: Any) -> str:
    return str(client.get_config_value(client.CONFIG_NAME_USER) or "")


def _child_push(folder: str, slug: str, accelerator: str, deadline: int) -> dict[str, Any]:
    client = api.client()
    owner = _owner(client)
    gpu = accelerator != "none"
    metadata = {"id": f"{owner}/{slug}", "title": slug, "code_file": SCRIPT, "language": "python",
                "kernel_type": "script", "is_private": True, "enable_gpu": gpu, "enable_tpu": False,
                "enable_internet": False, "competition_sources": [COMPETITION],
                "dataset_sources": [], "kernel_sources": [], "model_sources": []}
    if gpu:
        metadata["machine_shape"] = accelerator
    Path(folder, METADATA).write_text(json.dumps(metadata, indent=1), encoding="utf-8")
    answer = client.kernels_push(folder, timeout=str(deadline), acc=accelerator if gpu else None)
    return {"owner": owner, "ref": answer.ref or "", "url": answer.url or "",
            "version": answer.version_number, "answer_error": answer.error or "",
            "invalid_competition_sources": list(answer.invalid_competition_sources or [])}


def _child_status(slug: str, version: int) -> dict[str, Any]:
    client = api.client()
    answer = client.kernels_status(f"{_owner(client)}/{slug}/{version}")
    state = getattr(answer.status, "name", str(answer.status or "QUEUED"))
    return {"status": state, "failure": answer.failure_message or ""}


def _child_output(slug: str, version: int, first: dict[str, Any] | None, timeout_s: float) -> dict[str, Any]:
    from kagglesdk.kernels.types.kernels_api_service import ApiListKernelSessionOutputRequest

    client = api.client()
    files: list[dict[str, str]] = []
    log, token = "", ""
    with client.build_kaggle_client() as kaggle:
        for _ in range(MAX_PAGES):
            request = ApiListKernelSessionOutputRequest()
            request.user_name, request.kernel_slug = _owner(client), slug
            request.version_label, request.page_size, request.page_token = f"v{version}", PAGE_SIZE, token
            answer = kaggle.kernels.kernels_api_client.list_kernel_session_output(request)
            files += [{"name": f.file_name or "", "url": f.url or ""} for f in answer.files or []]
            log, token = log or answer.log or "", answer.next_page_token or ""
            if not token:
                break
    if first and (urls := [f["url"] for f in files if f["name"] == first["name"]]):
        _child_fetch([{**first, "url": urls[0]}], timeout_s)
    return {"files": files, "log": log}


def _child_fetch(plan: list[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    """A plain GET of each url into its path; no more than most + 1 bytes are kept (for a size check
    to refuse)."""
    import requests

    for item in plan:
        with requests.get(item["url"], stream=True, timeout=timeout_s) as answer:
            answer.raise_for_status()
            written, most = 0, item["most"]
            with open(item["path"], "wb") as out:
                for chunk in answer.iter_content(1 << 20):
                    out.write(chunk[:most + 1 - written])
                    written += len(chunk)
                    if written > most:
                        break
    return {}


def _child_delete(slug: str) -> dict[str, Any]:
    import requests
    from kagglesdk.kernels.types.kernels_api_service import ApiDeleteKernelRequest

    client = api.client()
    request = ApiDeleteKernelRequest()
    request.user_name, request.kernel_slug = _owner(client), slug
    try:
        with client.build_kaggle_client() as kaggle:
            answer = kaggle.kernels.kernels_api_client.delete_kernel(request)
    except requests.exceptions.HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:  # never made, or gone
            return {"owner": request.user_name, "found": False, "message": ""}
        raise
    return {"owner": request.user_name, "found": True, "message": answer.error_message or ""}


def _child_quota() -> dict[str, Any]:
    answer = api.client().quota_view()
    gpu, refresh = answer.gpu_quota, answer.quota_refresh_time
    known = gpu is not None and gpu.total_time_allowed is not None
    return {"refresh": refresh.strftime("%Y-%m-%d %H:%M UTC") if refresh else "",
            "gpu": {"used": gpu.time_used.total_seconds() if gpu.time_used else 0.0,
                    "allowed": gpu.total_time_allowed.total_seconds()} if known else None}
