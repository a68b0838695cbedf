"""A fake Kaggle API on 127.0.0.1 that the real ``kaggle`` client can be pointed at.

The client is aimed here with KAGGLE_API_ENVIRONMENT=LOCALHOST (endpoint http://localhost) and
HTTP_PROXY=http://127.0.0.1:PORT, so its requests arrive in absolute form (``POST http://localhost/...``).
It speaks the protocol seen from kaggle 2.2.5 (see shared/KAGGLE.md); each behaviour a test needs
(errors, a hang, a stalled body) is an attribute set before the client runs.

The submission list (ListSubmissions) shows every submission made to it, newest first, after the
ones in ``listed``. A new submission's status follows ``score_script``: the n-th list call after it
was made shows the n-th state of the script (the last state repeats), e.g. ``["pending",
"complete"]``: pending once, then complete with ``public_score``. ``"error"`` shows
``error_description``; a script of only ``"pending"`` is never scored.

Kernels (KernelsApiService): SaveKernel keeps the pushed script and, as Kaggle does, runs it. The
fake EXECUTES it (``kernel_mode = "execute"``) with this Python in a simulated /kaggle tree of its
own (KAGGLE_ROOT): the competition's files read-only under input/digit-recognizer/, an empty
working/, its own HOME and TMPDIR, no PYTHONPATH (the script must bring its code), no credentials and
no network (every proxy a closed port). The session is QUEUED, then RUNNING while the script runs,
then COMPLETE (exit status 0) or ERROR; its output is what the script left in working/ and its log
the script's output, as Kaggle keeps it (a JSON list of {stream_name, time, data}). Other modes:
"never" (RUNNING for ever), "fail" (ERROR with ``failure_message`` and ``fail_log``) and "replay"
(COMPLETE at once, serving ``replay_files``). ``push_answer`` replaces SaveKernel's answer (a refused
push); ``busy_gpu_sessions`` GPU sessions already running elsewhere count toward the cap of two.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

API = "/api/v1/competitions.CompetitionApiService/"
KERNELS = "/api/v1/kernels.KernelsApiService/"
OUTPUT_PATH = "/kernel-output/"  # + <slug>/<file name>: where the output files are served
SESSION_CAP = "Maximum batch GPU session count of 2 reached."
FAILURE = "Your notebook tried to run, but exited with a non-zero status (1)"
INTROSPECT = "/api/v1/security.OAuthService/IntrospectToken"  # the client's check of an access token
FILE_PATH = "/files/digit-recognizer.zip"
UPLOAD_PATH = "/upload/blob-token-1"
SUBMIT_OK = "Successfully submitted to Digit Recognizer"
NOTHING_INVALID = {f"invalid{k}": [] for k in ("Tags", "DatasetSources", "CompetitionSources",
                                               "KernelSources")}


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@dataclass
class Kernel:
    """A pushed kernel's latest version and its session."""

    owner: str
    slug: str
    version: int
    request: dict[str, Any]
    status: str = "QUEUED"
    failure: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None


class FakeKaggle:
    """The server's state: what it serves, how it misbehaves and what it received."""

    def __init__(self, zip_bytes: bytes, competition: dict[str, bytes] | None = None) -> None:
        self.zip_bytes = zip_bytes
        self.api_error: tuple[int, str] | None = None  # answer every API call with this status/message
        self.hang_api = False  # never answer API calls (until the server stops)
        self.stall_file_after: int | None = None  # send this many bytes of the zip, then go silent
        self.put_status = 200  # answer to the submission upload (PUT)
        self.submission = {"message": SUBMIT_OK, "ref": 4242}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.hosts: set[str] = set()  # every host the client asked for: only localhost is expected
        self.auth_headers: list[str] = []
        self.uploaded: bytes | None = None
        self.submit_request: dict[str, Any] | None = None
        self.score_script = ["pending", "complete"]  # what successive list calls show (see above)
        self.public_score = "0.97100"
        self.error_description = "Submission CSV Not Found"
        self.hang_list = False  # never answer ListSubmissions (uploads still work)
        self.list_error: tuple[int, str] | None = None  # answer ListSubmissions (only) with this
        self.listed: list[dict[str, Any]] = []  # older submissions, as the API sends them
        self.made: list[dict[str, Any]] = []  # submissions made here, oldest first
        self.list_calls = 0
        # Kernels: the competition's files a session sees, how sessions behave, what was asked.
        self.competition = competition or {}
        self.kernel_mode = "execute"
        self.replay_files: dict[str, bytes] = {}
        self.replay_log: list[dict[str, Any]] = []
        self.failure_message = FAILURE
        self.fail_log = [{"stream_name": "stderr", "time": 1.0, "data": "Traceback: made-up failure\n"}]
        self.push_answer: dict[str, Any] | None = None
        self.busy_gpu_sessions = 0
        self.status_errors = 0  # answer this many status calls with HTTP 503 first
        self.quota = {"timeUsed": "10800s", "timeReserved": "0s", "totalTimeAllowed": "108000s"}
        self.kernels: dict[str, Kernel] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (kernel method, request body)
        self.deleted: list[str] = []
        self.executed: list[Kernel] = []  # every session that ran its script to the end
        self.sandbox = Path(tempfile.mkdtemp(prefix="fake-kaggle-"))
        self._release = threading.Event()  # set at shutdown to free hanging handlers
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        # A short poll interval keeps shutdown, paid once per test, quick.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeKaggle:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        for kernel in self.kernels.values():
            if kernel.process is not None and kernel.process.poll() is None:
                kernel.process.kill()
                kernel.process.wait()
        self._server.shutdown()
        self._server.server_close()
        for folder in [self.sandbox, *self.sandbox.rglob("*")]:  # the read-only inputs, made removable
            if folder.is_dir() and not folder.is_symlink():
                folder.chmod(0o755)
        shutil.rmtree(self.sandbox, ignore_errors=True)

    def methods(self) -> list[str]:
        """The kernel methods called, in order."""
        return [method for method, _ in self.calls]

    def running(self) -> list[str]:
        """The kernels whose session is still queued or running (and not deleted)."""
        return [k.slug for k in self.kernels.values() if k.status in ("QUEUED", "RUNNING")]

    def wait_released(self) -> None:
        self._release.wait(timeout=60)


def _listed(fake: FakeKaggle, made: dict[str, Any]) -> dict[str, Any]:
    """A submission made here as the list shows it now; each call moves it one step on the script."""
    state = fake.score_script[min(made["listed"], len(fake.score_script) - 1)]
    made["listed"] += 1
    shown = {"ref": made["ref"], "date": made["date"], "description": made["description"],
             "fileName": "submission.csv", "status": state.upper(), "submittedBy": "fake-user"}
    if state == "complete":
        shown["publicScore"] = fake.public_score
    if state == "error":
        shown["errorDescription"] = fake.error_description
    return shown


# -- kernels ---------------------------------------------------------------------------------------

def _kernel_call(fake: FakeKaggle, method: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The answer (HTTP status, JSON) to one KernelsApiService call."""
    fake.calls.append((method, body))
    if method == "SaveKernel":
        return 200, _save_kernel(fake, body)
    if method == "GetAcceleratorQuotaStatistics":
        return 200, {"quotaRefreshTime": "2026-12-07T00:00:00Z", "gpuQuota": fake.quota,
                     "tpuQuota": {"timeUsed": "0s", "totalTimeAllowed": "72000s"}}
    kernel = fake.kernels.get(str(body.get("kernelSlug")))
    if kernel is None or body.get("userName") != kernel.owner:
        return 404, {"code": 404, "message": f"Kernel {body.get('userName')}/{body.get('kernelSlug')} "
                     "not found"}
    if method == "DeleteKernel":
        if kernel.process is not None and kernel.process.poll() is None:
            kernel.process.kill()
        del fake.kernels[kernel.slug]
        fake.deleted.append(kernel.slug)
        return 200, {}
    if body.get("versionLabel") not in (None, f"v{kernel.version}"):
        return 404, {"code": 404, "message": f"no version {body.get('versionLabel')}"}
    if method == "GetKernelSessionStatus" and fake.status_errors > 0:
        fake.status_errors -= 1
        return 503, {"code": 503, "message": "The service is unavailable"}
    if method == "GetKernelSessionStatus":
        answer = {"status": kernel.status}
        return 200, {**answer, "failureMessage": kernel.failure} if kernel.failure else answer
    if method == "ListKernelSessionOutput":
        return 200, _listing(kernel, body)
    return 404, {"code": 404, "message": f"no such method {method}"}


def _save_kernel(fake: FakeKaggle, body: dict[str, Any]) -> dict[str, Any]:
    owner, _, slug = str(body.get("slug", "")).partition("/")
    if fake.push_answer is not None:
        return fake.push_answer
    gpu = bool(body.get("machineShape")) or bool(body.get("enableGpu"))
    busy = fake.busy_gpu_sessions + sum(1 for k in fake.kernels.values()
                                        if k.status in ("QUEUED", "RUNNING")
                                        and (k.request.get("machineShape") or k.request.get("enableGpu")))
    if gpu and busy >= 2:
        return {"ref": "", "url": "", "error": SESSION_CAP, **NOTHING_INVALID}
    version = fake.kernels[slug].version + 1 if slug in fake.kernels else 1
    kernel = Kernel(owner, slug, version, body)
    fake.kernels[slug] = kernel
    if fake.kernel_mode == "never":
        kernel.status = "RUNNING"
    elif fake.kernel_mode == "fail":
        kernel.status, kernel.failure, kernel.log = "ERROR", fake.failure_message, fake.fail_log
    elif fake.kernel_mode == "replay":
        kernel.status, kernel.files, kernel.log = "COMPLETE", dict(fake.replay_files), fake.replay_log
    else:
        threading.Thread(target=_execute, args=(fake, kernel), daemon=True).start()
    return {"ref": f"/code/{owner}/{slug}", "url": f"https://www.kaggle.com/code/{owner}/{slug}",
            "versionNumber": version, "error": "", **NOTHING_INVALID, "kernelId": 4242}


def _listing(kernel: Kernel, body: dict[str, Any]) -> dict[str, Any]:
    """One page of a session's output, with its log, as ListKernelSessionOutput answers."""
    names = sorted(kernel.files)
    start = int(body.get("pageToken") or 0)
    size = int(body.get("pageSize") or 20)
    page = names[start:start + size]
    more = start + size < len(names)
    where = f"http://localhost{OUTPUT_PATH}{kernel.slug}/"
    return {"files": [{"fileName": n, "url": where + quote(n, safe="")} for n in page],
            "log": json.dumps(kernel.log), "nextPageToken": str(start + size) if more else ""}


def _execute(fake: FakeKaggle, kernel: Kernel) -> None:
    """Run the pushed script as a Kaggle session would: a /kaggle tree of its own, the competition
    read-only, no network, no credentials, not this repository's code."""
    home = fake.sandbox / f"{kernel.slug}-v{kernel.version}"
    root = home / "kaggle"
    attached = root / "input" / "digit-recognizer"
    attached.mkdir(parents=True)
    (root / "working").mkdir()
    (home / "tmp").mkdir()
    for name, data in fake.competition.items():
        (attached / name).write_bytes(data)
        (attached / name).chmod(0o444)
    for folder in (attached, attached.parent):
        folder.chmod(0o555)
    script = home / "__script__.py"
    script.write_text(str(kernel.request.get("text", "")), encoding="utf-8")
    closed = "http://127.0.0.1:9"  # the discard port: nothing answers there
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "TMPDIR": str(home / "tmp"),
           "KAGGLE_ROOT": str(root), "KAGGLE_KERNEL_RUN_TYPE": "Batch", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LANG": "C.UTF-8",
           **{name: closed for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}}
    started = time.monotonic()
    kernel.process = subprocess.Popen([sys.executable, str(script)], cwd=root / "working", env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT)
    kernel.status = "RUNNING"
    for line in kernel.process.stdout or []:
        kernel.log.append({"stream_name": "stdout", "time": round(time.monotonic() - started, 3),
                           "data": line.decode("utf-8", "replace")})
    code = kernel.process.wait()
    kernel.files = {str(p.relative_to(root / "working")): p.read_bytes()
                    for p in sorted((root / "working").rglob("*")) if p.is_file()}
    if kernel.status == "RUNNING":  # not deleted meanwhile
        kernel.status = "COMPLETE" if code == 0 else "ERROR"
        kernel.failure = "" if code == 0 else fake.failure_message
    fake.executed.append(kernel)


def _handler_for(fake: FakeKaggle) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def do_POST(self) -> None:
            path = self._record()
            body = json.loads(self._body() or b"{}")
            if fake.hang_api:
                fake.wait_released()
                return
            if fake.api_error:
                self._error(*fake.api_error)
            elif path == INTROSPECT:
                self._json(200, {"active": True, "username": "fake-user"})
            elif path == API + "DownloadDataFiles":
                self._redirect("http://localhost" + FILE_PATH)
            elif path == API + "StartSubmissionUpload":
                self._json(200, {"token": "blob-token-1", "createUrl": "http://localhost" + UPLOAD_PATH})
            elif path == API + "CreateSubmission":
                fake.submit_request = body
                if fake.submission.get("ref"):
                    fake.made.append({"ref": fake.submission["ref"], "listed": 0,
                                      "description": body.get("submissionDescription", ""),
                                      "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")})
                self._json(200, fake.submission)
            elif path.startswith(KERNELS):
                code, answer = _kernel_call(fake, path[len(KERNELS):], body)
                self._json(code, answer)
            elif path == API + "ListSubmissions":
                fake.list_calls += 1
                if fake.hang_list:
                    fake.wait_released()
                    return
                if fake.list_error:
                    self._error(*fake.list_error)
                    return
                self._json(200, {"submissions": [_listed(fake, m) for m in reversed(fake.made)]
                                 + fake.listed, "nextPageToken": ""})
            else:
                self._error(404, f"no such method {path}")

        def do_GET(self) -> None:
            path = self._record()
            if path.startswith(OUTPUT_PATH):
                self._output_file(path[len(OUTPUT_PATH):])
                return
            if path != FILE_PATH:
                self._error(404, "not found")
                return
            data = fake.zip_bytes
            self._send(200, "application/zip", data[:fake.stall_file_after], len(data),
                       {"Last-Modified": formatdate(usegmt=True)})
            if fake.stall_file_after is not None:
                self.wfile.flush()
                fake.wait_released()

        def _output_file(self, rest: str) -> None:
            slug, _, name = rest.partition("/")
            kernel = fake.kernels.get(slug)
            data = kernel.files.get(unquote(name)) if kernel else None
            if data is None:
                self._error(404, "no such output file")
            else:
                self._send(200, "application/octet-stream", data)

        def do_CONNECT(self) -> None:
            """An HTTPS tunnel: the client tried to reach a real host. Recorded, and refused."""
            fake.hosts.add(self.path)
            self.send_error(403)

        def do_PUT(self) -> None:
            path = self._record()
            data = self._body()
            if path == UPLOAD_PATH:
                fake.uploaded = data
            self.send_response(fake.put_status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _record(self) -> str:
            fake.requests.append((self.command, urlsplit(self.path).path))
            fake.hosts.add(urlsplit(self.path).netloc or self.headers.get("Host", ""))
            fake.auth_headers.append(self.headers.get("Authorization", ""))
            return urlsplit(self.path).path

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, code: int, kind: str, data: bytes, length: int | None = None,
                  headers: dict[str, str] | None = None) -> None:
            """data with its headers; length: the Content-Length promised, when more than is sent."""
            self.send_response(code)
            for name, value in {"Content-Type": kind, "Content-Length": str(length or len(data)),
                                **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _json(self, code: int, payload: dict[str, Any]) -> None:
            self._send(code, "application/json", json.dumps(payload).encode())

        def _error(self, code: int, message: str) -> None:
            self._json(code, {"code": code, "message": message})

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
