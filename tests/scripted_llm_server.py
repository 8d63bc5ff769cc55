"""A scripted OpenAI-compatible chat server on 127.0.0.1: a fake at the edge we do not own.

It answers every /v1/chat/completions request by calling `reply(messages)`: a string is the
answer, an int is an HTTP error status to send instead (429, 500, 400...), and a dict
`{"content": ..., "logprobs": [{"token", "logprob", "top_logprobs": [...]}, ...]}` an answer with
OpenAI-format token logprobs. It records the requests
it saw and serves /v1/models, so the real `openai` SDK path can be tested end to end.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedLLMServer:
    def __init__(self, reply, delay_s: float = 0.0):
        self.reply = reply
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args):
                pass

            def _send(self, payload: dict, status: int = 200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.endswith("/stats"):
                    self._send({"requests": len(server.requests)})
                    return
                self._send({"object": "list", "data": [{"id": "scripted", "object": "model", "owned_by": "test"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(request)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                if server.delay_s:
                    time.sleep(server.delay_s)
                text = server.reply(request["messages"])
                if isinstance(text, int):
                    self._send({"error": {"message": f"scripted {text}", "type": "scripted", "code": text}}, status=text)
                    return
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if isinstance(text, dict):
                    choice = {**choice, "message": {"role": "assistant", "content": text["content"]}, "logprobs": {"content": text["logprobs"]}}
                self._send(
                    {
                        "id": f"cmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": request["model"],
                        "choices": [choice],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                    }
                )

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


def main() -> None:
    """Serve a fixed answer after a fixed delay until killed; prints the base URL first (for benches)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--answer", default="Explanation: a scripted answer")
    args = parser.parse_args()
    with ScriptedLLMServer(lambda messages: args.answer, delay_s=args.delay) as server:
        print(server.base_url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
