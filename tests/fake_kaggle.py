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
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

API = "/api/v1/competitions.CompetitionApiService/"
INTROSPECT = "/api/v1/security.OAuthService/IntrospectToken"  # the client's check of an access token
FILE_PATH = "/files/digit-recognizer.zip"
UPLOAD_PATH = "/upload/blob-token-1"
SUBMIT_OK = "Successfully submitted to Digit Recognizer"


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


class FakeKaggle:
    """The server's state: what it serves, how it misbehaves and what it received."""

    def __init__(self, zip_bytes: bytes) -> None:
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
        self._server.shutdown()
        self._server.server_close()

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
                code, message = fake.api_error
                self._json(code, {"code": code, "message": message})
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
            elif path == API + "ListSubmissions":
                fake.list_calls += 1
                if fake.hang_list:
                    fake.wait_released()
                    return
                if fake.list_error:
                    code, message = fake.list_error
                    self._json(code, {"code": code, "message": message})
                    return
                self._json(200, {"submissions": [_listed(fake, m) for m in reversed(fake.made)]
                                 + fake.listed, "nextPageToken": ""})
            else:
                self._json(404, {"code": 404, "message": f"no such method {path}"})

        def do_GET(self) -> None:
            if self._record() != FILE_PATH:
                self._json(404, {"code": 404, "message": "not found"})
                return
            data = fake.zip_bytes
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Last-Modified", formatdate(usegmt=True))
            self.end_headers()
            if fake.stall_file_after is None:
                self.wfile.write(data)
                return
            self.wfile.write(data[: fake.stall_file_after])
            self.wfile.flush()
            fake.wait_released()

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

        def _json(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
