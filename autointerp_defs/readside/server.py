"""`autointerp view`: the latent browser over HTTP (stdlib `ThreadingHTTPServer`, no network at run time).

Pages are one HTML shell each (`static/page.html`) filled in by `static/app.js` from the JSON API:

| path | what |
| --- | --- |
| `/` | coders: width, dead fraction, mean L0, FVU, latents explained, each scorer beside its control |
| `/coder?coder=C` | the latents of coder C: paginated, sortable, filterable, semantic search |
| `/latent?coder=C&latent=N` | one latent |
| `/api/coders`, `/api/latents?coder=C&...`, `/api/latent?coder=C&latent=N` | the same as JSON |
| `/api/search?coder=C&q=...` | the coder page's semantic search as JSON |
| `/api/logit_lens?coder=C&latent=N` | the latent page's logit lens alone (asked again while it is pending) |
| `POST /api/steer` | the steering box: continuations without and with the latent steered |

Every other route is a GET that only reads. Steering costs the subject model's time, so it is a POST whose
body must be JSON, `{"coder", "latent", "prompt", "strength", "tokens"}` (a cross-site page cannot send
that without a CORS preflight, which this server never grants), and whose Origin, when the browser sends
one, must name this server as its Host must.
"""

from __future__ import annotations

import json
import mimetypes
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from autointerp_defs.readside.app import Viewer, ViewerError, integer
from autointerp_defs.readside.reader import ExportInputError
from storage.store import TableStore

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "coders", "/coder": "coder", "/latent": "latent"}
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def host_allowed(
    host_header: str | None, bound_host: str, port: int, viewer_url: str | None
) -> bool:
    """Whether a request's Host names this server: its bound host, or a loopback name, at its port, or the
    host of the deployment's `viewer_url` (a proxy in front may use any port). Anything else is refused,
    so that a web page whose DNS name was rebound to this machine cannot read the browser through the
    visitor's own browser."""
    if not host_header:
        return False
    try:
        named = urlsplit(f"//{host_header}")
        name, named_port = (named.hostname or "").lower(), named.port or 80
    except ValueError:  # a port that is not a number
        return False
    if viewer_url and name == (urlsplit(viewer_url).hostname or "").lower():
        return True
    return named_port == port and name in {bound_host.lower(), *LOOPBACK}


def origin_allowed(origin: str | None, bound_host: str, port: int, viewer_url: str | None) -> bool:
    """Whether a request's Origin (absent: not sent by a web page) is a page of this server (`host_allowed`)."""
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and host_allowed(
        parts.netloc, bound_host, port, viewer_url
    )


MAX_BODY = 1 << 16
"""Bytes of a POST body read at most: a steering prompt is a line of text."""


def make_handler(viewer: Viewer, viewer_url: str | None = None):
    class Handler(BaseHTTPRequestHandler):
        server_version = "autointerp-viewer"
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # one quiet line per error only
            pass

        def do_GET(self):
            self._answer(self._get)

        def do_POST(self):
            self._answer(self._post)

        def _answer(self, route):
            url = urlsplit(self.path)
            with viewer.answering():  # background work pauses meanwhile
                try:
                    host, port = self.server.server_address[:2]
                    if not host_allowed(self.headers.get("Host"), host, port, viewer_url):
                        raise ViewerError(
                            403,
                            f"Misdirected request: Host {self.headers.get('Host')!r} is not this "
                            f"server ({host}:{port}). Fix: open http://127.0.0.1:{port}/, "
                            "or set [settings] viewer_url to the address you use.",
                        )
                    return route(url)
                except ViewerError as error:
                    self._json({"error": str(error)}, error.status, error.headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                except (
                    Exception
                ) as error:  # a bug must show as a 500 with its reason, not kill the server
                    traceback.print_exc(file=sys.stderr)
                    self._json({"error": f"{type(error).__name__}: {error}"}, 500)

        def _get(self, url):
            params = dict(parse_qsl(url.query, keep_blank_values=True))
            if url.path in PAGES:
                shell = (STATIC / "page.html").read_text().replace("{{page}}", PAGES[url.path])
                return self._send(200, shell.encode(), "text/html; charset=utf-8")
            if url.path.startswith("/static/"):
                return self._static(url.path[len("/static/") :])
            if url.path.startswith("/graphs/"):
                slug = url.path[len("/graphs/") :].removesuffix(".json")
                return self._send(200, viewer.labelled_graph(slug), "application/json")
            if url.path == "/api/coders":
                return self._json(viewer.coders())
            if url.path == "/api/latents":
                return self._json(viewer.latent_list(params.get("coder", ""), params))
            if url.path == "/api/search":
                return self._json(
                    viewer.search(
                        params.get("coder", ""), params.get("q", ""), integer(params, "limit", 20)
                    )
                )
            if url.path == "/api/latent":
                return self._json(viewer.latent(params.get("coder", ""), params.get("latent", "")))
            if url.path == "/api/logit_lens":
                return self._json(
                    viewer.logit_lens(params.get("coder", ""), params.get("latent", ""))
                )
            if url.path == "/api/steer":
                raise ViewerError(
                    405,
                    "Steering is a POST with a JSON body (coder, latent, prompt, strength, "
                    "tokens). Fix: use the latent page's steering box.",
                    {"Allow": "POST"},
                )
            if url.path == "/healthz":
                return self._json({"ok": True})
            raise ViewerError(404, f"No page {url.path}. Fix: start at / (the coders).")

        def _post(self, url):
            given = self.headers.get("Content-Length") or "0"
            length = int(given) if given.isdigit() else -1
            if not 0 <= length <= MAX_BODY:
                self.close_connection = True  # its body is left unread
                raise ViewerError(
                    413,
                    f"Content-Length {given!r}. Fix: send a JSON object of at most {MAX_BODY} bytes.",
                )
            raw = self.rfile.read(length)
            if url.path != "/api/steer":
                raise ViewerError(
                    405,
                    f"{url.path} is read with a GET. Fix: only /api/steer takes a POST.",
                    {"Allow": "GET"},
                )
            host, port = self.server.server_address[:2]
            origin = self.headers.get("Origin")
            if not origin_allowed(origin, host, port, viewer_url):
                raise ViewerError(
                    403,
                    f"Cross-site request: Origin {origin!r} is not this server ({host}:{port}). "
                    "Fix: steer from this server's own latent page, "
                    "or set [settings] viewer_url to the address you use.",
                )
            if self.headers.get_content_type() != "application/json":
                raise ViewerError(
                    415,
                    "The body must be JSON (Content-Type: application/json). "
                    'Fix: send {"coder": ..., "latent": ..., "prompt": ...}.',
                )
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise ViewerError(
                    400,
                    'The body is not a JSON object. Fix: send {"coder": ..., "latent": ..., "prompt": ...}.',
                )
            return self._json(
                viewer.steer(str(body.get("coder", "")), {k: str(v) for k, v in body.items()})
            )

        def _static(self, name: str):
            path = (STATIC / name).resolve()
            if STATIC.resolve() not in path.parents or not path.is_file():
                raise ViewerError(404, f"No static file {name}.")
            self._send(
                200,
                path.read_bytes(),
                mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            )

        def _json(self, data, status: int = 200, headers: dict[str, str] | None = None):
            self._send(
                status, json.dumps(data, allow_nan=False).encode(), "application/json", headers
            )

        def _send(self, status: int, body: bytes, kind: str, headers: dict[str, str] | None = None):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

    return Handler


def make_server(
    data_dir: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    viewer: Viewer | None = None,
    viewer_url: str | None = None,
    **options,
) -> ThreadingHTTPServer:
    """The server, bound but not yet serving (port 0 picks a free one: see `server.server_port`); it answers
    requests addressed to its own host and port, a loopback name at its port, or the host of `viewer_url`
    (the deployment's `[settings] viewer_url`); `options` go to the `Viewer` (embedder, dagster_url, subject)."""
    store = TableStore.at(data_dir)
    if not store.layout.root.exists():
        raise ExportInputError(
            f"No data root at {store.layout.root}. Fix: pass --data, "
            "or set [settings] data_dir in the deployment file, "
            "to the folder `make demo` filled, e.g. ./data."
        )
    server = ThreadingHTTPServer(
        (host, port), make_handler(viewer or Viewer(store, **options), viewer_url)
    )
    server.daemon_threads = True
    return server


def serve(
    data_dir: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    warm: bool = True,
    viewer_url: str | None = None,
    **options,
) -> None:
    """Serve until Ctrl-C; with `warm`, load the embedder and build or open every cached index in the background
    (`Viewer.start_warm_up`), so that no first answer waits on them. `options` go to the `Viewer`: the CLI passes
    the deployment's embedder, Dagster URL and subject-model resource."""
    import torch

    # requests run on threads of their own; intra-op threads on a busy 2-core machine made a query's
    # embedding 20x slower
    torch.set_num_threads(1)
    viewer = Viewer(TableStore.at(data_dir), **options)
    server = make_server(data_dir, host, port, viewer, viewer_url)
    if warm:
        viewer.start_warm_up()
    print(
        f"autointerp viewer on http://{host}:{server.server_port} (data {viewer.store.layout.root}); Ctrl-C stops it",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
