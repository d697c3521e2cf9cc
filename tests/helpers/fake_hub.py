"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for huggingface_hub itself to talk to (HF_ENDPOINT):
the few routes a model's file list and downloads use, and a log of every file whose content was sent.

Routes: ``GET /api/models/<repo>[/revision/<rev>]`` (model info with its file list), ``GET /api/models/<repo>/tree/
<rev>`` (the recursive tree), ``HEAD`` / ``GET /<repo>/resolve/<rev>/<path>`` (a file). An unknown repo or revision
answers 404 with the ``X-Error-Code`` the Hub sends (``RepoNotFound``, ``RevisionNotFound``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    """``repos``: {repo id: {"commit": 40 hex, "files": {path: bytes}}} (the default branch ``main``)."""

    def __init__(self, repos: dict[str, dict]):
        self.repos = repos
        self.downloaded: list[str] = []  # "repo/path" of each file whose content was sent (GET)
        self.authorization: set[str] = set()  # the Authorization headers seen (HF_TOKEN)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _repo(self, parts: list[str]) -> tuple[str | None, dict | None, list[str]]:
        repo_id = "/".join(parts[:2])
        return repo_id, self.repos.get(repo_id), parts[2:]

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        if h.headers.get("Authorization"):
            self.authorization.add(h.headers["Authorization"])
        parts = [unquote(p) for p in urlparse(h.path).path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        repo_id, repo, rest = self._repo(parts[2:] if api else parts)
        if repo is None:
            return self._send(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, body)
        if api and (not rest or rest[0] == "revision"):
            if rest and rest[1] not in ("main", repo["commit"]):
                return self._send(h, 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}, body)
            info = {"id": repo_id, "modelId": repo_id, "sha": repo["commit"], "private": False,
                    "siblings": [{"rfilename": p} for p in sorted(repo["files"])]}
            return self._send(h, 200, info, {}, body)
        if api and rest[0] == "tree":
            tree = [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                    for p, d in sorted(repo["files"].items())]
            return self._send(h, 200, tree, {}, body)
        if rest[:1] == ["resolve"] and "/".join(rest[2:]) in repo["files"]:
            path = "/".join(rest[2:])
            data = repo["files"][path]
            headers = {"X-Repo-Commit": repo["commit"], "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
            if body:
                self.downloaded.append(f"{repo_id}/{path}")
            return self._send(h, 200, data, headers, body)
        return self._send(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, body)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload, headers: dict, body: bool) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()
        if body:
            h.wfile.write(data)
