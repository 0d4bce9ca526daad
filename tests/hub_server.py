"""A loopback HTTP server that answers the Hugging Face Hub's file-download requests.

It speaks the part of the Hub protocol ``huggingface_hub.snapshot_download`` and
``hf_hub_download`` use: ``GET /api/models/{repo_id}/revision/{revision}`` (which commit a revision
is), ``GET /api/models/{repo_id}/tree/{commit}`` (its files), and ``HEAD``/``GET
/{repo_id}/resolve/{revision}/{filename}`` with the ``X-Repo-Commit`` and ``ETag`` headers; 404s are
tagged with ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound). Point ``HF_ENDPOINT``
at it and the real client code runs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


class FakeHub:
    """Model repos kept in memory: ``repos[repo_id][commit] = {filename: bytes}`` plus branch refs."""

    def __init__(self, port: int):
        self.port = port
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.refs: dict[str, dict[str, str]] = {}
        self.fail_with: int | None = None  # answer every request with this status (e.g. 500)
        self.requests: list[str] = []
        self.after_next_request: Callable[[], None] | None = None  # runs once, after the next answer
        self.server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def publish(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Add a commit holding ``files`` and point ``branch`` at it; returns the commit hash."""
        digest = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode())
        commit = digest.hexdigest()
        self.repos.setdefault(repo_id, {})[commit] = dict(files)
        self.refs.setdefault(repo_id, {})[branch] = commit
        return commit

    def start(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                hub.requests.append(f"{self.command} {self.path}")
                try:
                    self.route(body)
                finally:
                    hook, hub.after_next_request = hub.after_next_request, None
                    if hook:
                        hook()

            def route(self, body: bool):
                if hub.fail_with:
                    return self.error(hub.fail_with, None)
                parts = unquote(self.path.split("?")[0]).strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                    return self.api(parts[4], "/".join(parts[2:4]), parts[5])
                if len(parts) < 5 or parts[2] != "resolve":
                    return self.error(404, "RepoNotFound")
                repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                commit, files = self.lookup(repo_id, revision)
                if files is None:
                    return
                if filename not in files:
                    return self.error(404, "EntryNotFound", commit)
                self.send(files[filename], "application/octet-stream", body, commit)

            def lookup(self, repo_id: str, revision: str) -> tuple[str | None, dict | None]:
                """The commit a revision names and its files, or (None, None) after answering a 404."""
                if repo_id not in hub.repos:
                    self.error(404, "RepoNotFound")
                    return None, None
                commit = hub.refs[repo_id].get(revision, revision)
                if commit not in hub.repos[repo_id]:
                    self.error(404, "RevisionNotFound")
                    return None, None
                return commit, hub.repos[repo_id][commit]

            def api(self, kind: str, repo_id: str, revision: str):
                commit, files = self.lookup(repo_id, revision)
                if files is None:
                    return
                if kind == "revision":
                    info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": name} for name in files]}
                else:
                    info = [
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in files.items()
                    ]
                self.send(json.dumps(info).encode(), "application/json", True, commit)

            def send(self, data: bytes, content_type: str, body: bool, commit: str):
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", content_type)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def error(self, status: int, code: str | None, commit: str | None = None):
                message = b'{"error": "fake hub error"}'
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(message)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(message)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
