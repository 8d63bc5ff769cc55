"""A scripted Hugging Face hub on 127.0.0.1: a fake at the edge we do not own, for huggingface_hub's real
download code (point HF_ENDPOINT at `url`).

It answers what huggingface_hub 2.4's `model_info`, `snapshot_download` and `hf_hub_download` ask:
- GET /api/models/{repo}[/revision/{rev}]: the repo's commit and its files (`siblings`);
- GET /api/models/{repo}/tree/{rev}[?recursive=..]: the files with size and blob id (one page);
- HEAD and GET /{repo}/resolve/{rev}/{path}: the file, with X-Repo-Commit, ETag and Content-Length;
- the same under /api/datasets/ and /datasets/ for a dataset repo, added as `add("datasets/{repo}", ...)`.
Errors carry the X-Error-Code header the hub sends (RepoNotFound, RevisionNotFound, EntryNotFound), so
huggingface_hub raises its own error classes. With `token` set, a request without
`Authorization: Bearer <token>` gets the hub's 401 for a private repo. It records each request.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class ScriptedHub:
    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        """repo id → commit → path → content."""
        self.refs: dict[str, dict[str, str]] = {}
        """repo id → branch or tag → commit."""
        self.requests: list[tuple[str, str, str | None]] = []
        """(method, path, Authorization header) of each request."""
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                hub._answer(self, body=True)

            def do_HEAD(self):
                hub._answer(self, body=False)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def add(self, repo: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
        """A new commit of `repo` holding `files`, which `refs` then name; returns its hash."""
        digest = hashlib.sha1(repo.encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha1(files[path]).digest())
        commit = digest.hexdigest()
        self.repos.setdefault(repo, {})[commit] = dict(files)
        for ref in refs:
            self.refs.setdefault(repo, {})[ref] = commit
        return commit

    def add_folder(
        self, repo: str, folder: Path, refs: tuple[str, ...] = ("main",), under: str = ""
    ) -> str:
        """`add` the files below `folder`, at their paths relative to it (below `under` in the repo)."""
        prefix = f"{under}/" if under else ""
        return self.add(
            repo,
            {
                prefix + p.relative_to(folder).as_posix(): p.read_bytes()
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            },
            refs,
        )

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlsplit(handler.path)
        auth = handler.headers.get("Authorization")
        self.requests.append((handler.command, url.path, auth))
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        repo_type = ""
        if parts[:2] == ["api", "datasets"] or parts[:1] == ["datasets"]:
            repo_type = "datasets/"
            parts = ["api", "models", *parts[2:]] if parts[0] == "api" else parts[1:]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo, kind, rev = (
                repo_type + "/".join(parts[2:4]),
                parts[4] if len(parts) > 4 else "revision",
                parts[5] if len(parts) > 5 else "main",
            )
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, kind, rev = repo_type + "/".join(parts[:2]), "resolve", parts[3]
        else:
            return self._send(handler, 404, {"error": "unknown endpoint"}, body)
        if self.token and auth != f"Bearer {self.token}" or repo not in self.repos:
            status = 401 if self.token and auth is None else 404
            return self._send(
                handler,
                status,
                {"error": "Repository not found"},
                body,
                {"X-Error-Code": "RepoNotFound"},
            )
        commit = self.refs[repo].get(rev, rev if rev in self.repos[repo] else None)
        if commit is None:
            return self._send(
                handler,
                404,
                {"error": f"Invalid rev id: {rev}"},
                body,
                {"X-Error-Code": "RevisionNotFound"},
            )
        files = self.repos[repo][commit]
        if kind == "revision":
            return self._send(
                handler,
                200,
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": commit,
                    "private": bool(self.token),
                    "siblings": [{"rfilename": path} for path in sorted(files)],
                },
                body,
            )
        if kind == "tree":
            under = "/".join(parts[6:])
            return self._send(
                handler,
                200,
                [
                    {
                        "type": "file",
                        "path": path,
                        "size": len(data),
                        "oid": hashlib.sha1(data).hexdigest(),
                    }
                    for path, data in sorted(files.items())
                    if not under or path.startswith(f"{under}/")
                ],
                body,
            )
        path = "/".join(parts[4:])
        if path not in files:
            return self._send(
                handler,
                404,
                {"error": f"{path} does not exist"},
                body,
                {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit},
            )
        data = files[path]
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            "Content-Type": "application/octet-stream",
        }
        self._send(handler, 200, data, body, headers)

    @staticmethod
    def _send(handler, status: int, payload, body: bool, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        for key, value in {
            "Content-Type": "application/json",
            **(headers or {}),
            "Content-Length": str(len(data)),
        }.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)


@contextmanager
def hub_environment(
    url: str, home: Path, token: str | None = None, offline: bool = False
) -> Iterator[dict]:
    """The variables huggingface_hub reads (HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_OFFLINE) set for the block,
    and its constants re-read, since it reads them once at import; the environment is restored after. Yields
    the variables set, for a subprocess."""
    import huggingface_hub.constants

    saved = dict(os.environ)
    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    os.environ.update(env)
    os.environ.pop(
        "TRANSFORMERS_OFFLINE", None
    )  # the test session's default (tests/conftest.py) would win over HF_HUB_OFFLINE=0
    if token:
        os.environ["HF_TOKEN"] = token
    else:
        os.environ.pop("HF_TOKEN", None)
    importlib.reload(huggingface_hub.constants)
    try:
        yield env
    finally:
        os.environ.clear()
        os.environ.update(saved)
        importlib.reload(huggingface_hub.constants)
