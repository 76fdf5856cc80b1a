"""A small Hugging Face hub on 127.0.0.1: enough of the HTTP API for huggingface_hub to probe
a repo, fetch file metadata and download files.

* `GET /api/models/{repo}[/revision/{rev}]` - repo info (canonical id, commit, files + sizes),
* `GET /api/models/{repo}/tree/{rev}` - the file list,
* `HEAD|GET /{repo}/resolve/{rev}/{path}` - ETag, X-Repo-Commit, Content-Length; the body,
* unknown repo -> 404 `X-Error-Code: RepoNotFound`; gated repo without (or with a wrong) token
  -> 401/403 `X-Error-Code: GatedRepo`.

Repo ids match case-insensitively and the answers carry the canonical casing, like the hub.
Every request is counted; `fail_next` makes the next API calls answer 500; `throttle` slows
one file's body down (for cancellation tests).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    gated_token: str | None = None  # gated: only this token gets in
    sha: str = field(default="")

    def __post_init__(self) -> None:
        if not self.sha:
            digest = hashlib.sha1(self.repo_id.encode())
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha256(self.files[name]).digest())
            self.sha = digest.hexdigest()


@dataclass
class Throttle:
    chunk: int
    delay_s: float


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.failures = 0  # the next API calls that answer 500
        self.throttles: dict[str, Throttle] = {}
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self, body=True)

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, repo_id: str, files: dict[str, bytes], gated_token: str | None = None) -> Repo:
        repo = Repo(repo_id, files, gated_token)
        self.repos[repo_id.casefold()] = repo
        return repo

    def fail_next(self, count: int = 1) -> None:
        self.failures = count

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    @contextmanager
    def counting(self) -> Iterator[list[tuple[str, str]]]:
        """The requests made inside the block."""
        start = self.count()
        seen: list[tuple[str, str]] = []
        try:
            yield seen
        finally:
            with self._lock:
                seen.extend(self.requests[start:])

    # --- serving ------------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        with self._lock:
            self.requests.append((req.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            if self.failures > 0:
                self.failures -= 1
                return _reply(req, 500, {"error": "internal error"}, body=body)
            repo = self._access(req, f"{parts[2]}/{parts[3]}", body=body)
            if repo is None:
                return None
            if len(parts) >= 6 and parts[4] == "tree":
                listing = [
                    {"type": "file", "path": n, "size": len(d), "oid": _etag(d)}
                    for n, d in sorted(repo.files.items())
                ]
                return _reply(req, 200, listing, body=body)
            return _reply(req, 200, _info(repo), body=body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._access(req, f"{parts[0]}/{parts[1]}", body=body)
            if repo is None:
                return None
            revision, name = parts[3], "/".join(parts[4:])
            data = repo.files.get(name)
            if revision not in ("main", repo.sha) or data is None:
                code = "RevisionNotFound" if data is not None else "EntryNotFound"
                return _reply(req, 404, {"error": code}, body=body, error_code=code)
            headers = {
                "ETag": f'"{_etag(data)}"',
                "X-Repo-Commit": repo.sha,
                "Content-Length": str(len(data)),
                "Content-Type": "application/octet-stream",
            }
            return self._send_file(req, data, headers, self.throttles.get(name), body=body)
        return _reply(req, 404, {"error": "no such route"}, body=body)

    def _access(self, req: BaseHTTPRequestHandler, repo_id: str, *, body: bool) -> Repo | None:
        repo = self.repos.get(repo_id.casefold())
        if repo is None:
            _reply(
                req, 404, {"error": "Repository not found"}, body=body, error_code="RepoNotFound"
            )
            return None
        if repo.gated_token is not None:
            auth = req.headers.get("Authorization", "")
            if auth != f"Bearer {repo.gated_token}":
                status = 403 if auth else 401
                _reply(req, status, {"error": "gated"}, body=body, error_code="GatedRepo")
                return None
        return repo

    def _send_file(
        self,
        req: BaseHTTPRequestHandler,
        data: bytes,
        headers: dict[str, str],
        throttle: Throttle | None,
        *,
        body: bool,
    ) -> None:
        req.send_response(200)
        for name, value in headers.items():
            req.send_header(name, value)
        req.end_headers()
        if not body:
            return
        step = throttle.chunk if throttle else len(data) or 1
        try:
            for offset in range(0, len(data), step):
                req.wfile.write(data[offset : offset + step])
                req.wfile.flush()
                if throttle:
                    time.sleep(throttle.delay_s)
        except (BrokenPipeError, ConnectionResetError):
            req.close_connection = True  # the client gave up (a cancelled download)


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _info(repo: Repo) -> dict[str, object]:
    return {
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "sha": repo.sha,
        "private": False,
        "gated": "manual" if repo.gated_token else False,
        "siblings": [
            {"rfilename": n, "size": len(d), "blobId": _etag(d)[:40]}
            for n, d in sorted(repo.files.items())
        ],
    }


def _reply(
    req: BaseHTTPRequestHandler,
    status: int,
    payload: object,
    *,
    body: bool,
    error_code: str | None = None,
) -> None:
    data = json.dumps(payload).encode()
    req.send_response(status)
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(data)))
    if error_code:
        req.send_header("X-Error-Code", error_code)
        req.send_header("X-Error-Message", str(payload))
    req.end_headers()
    if body:
        req.wfile.write(data)
