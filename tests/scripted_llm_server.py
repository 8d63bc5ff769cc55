"""A scripted OpenAI-compatible chat server on 127.0.0.1: a fake at the edge we do not own.

It answers every /v1/chat/completions request by calling `reply(messages)`: a string is the
answer, an int is an HTTP error status to send instead (429, 500, 400...), a tuple
`(status, headers)` or `(status, headers, message)` an error status with extra headers (e.g.
Retry-After) and the server's error message, and a dict
`{"content": ..., "logprobs": [{"token", "logprob", "top_logprobs": [...]}, ...]}` an answer with
OpenAI-format token logprobs. A `Fault` breaks the transport instead: a reset connection, a body
cut short, a 200 that is not JSON, or an answer that comes too late. It records the requests it saw
and serves /v1/models, so the real `openai` SDK path can be tested end to end.

It is an asyncio server (HTTP/1.1 keep-alive) on its own thread: `delay_s` is an `asyncio.sleep`,
so a request is answered `delay_s` after it arrived however many are waiting, as a real endpoint's
latency would be; a thread-per-request server adds its own queueing under load, which a throughput
benchmark would then charge to the client. `reply` runs on a worker thread, so it may block.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus


@dataclass(frozen=True)
class Fault:
    """A broken answer: `reset` (connection dropped, no answer), `truncated` (half the body, then
    closed), `not_json` (200 with an HTML body) or `stall` (the answer after `seconds`)."""

    kind: str
    seconds: float = 0.0


class ScriptedLLMServer:
    def __init__(
        self,
        reply,
        delay_s: float = 0.0,
        models_status: int = 200,
        port: int = 0,
        host: str = "127.0.0.1",
        usage=None,
    ):
        self.reply = reply
        self.usage = usage
        """`usage(messages, answer) -> dict` of the answer's token counts; without it every answer counts 10 + 3."""
        self.delay_s = delay_s
        self.models_status = models_status
        """The status /v1/models answers with (401 for a server that checks the key there too)."""
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.arrivals: list[float] = []
        """`time.monotonic()` at each request's arrival, to see how long a client waited between them."""
        self.in_flight = self.peak_in_flight = 0
        """Completion requests being answered now, and the most there ever were at once."""
        self._loop = asyncio.new_event_loop()
        self._replies = ThreadPoolExecutor(max_workers=64, thread_name_prefix="scripted-reply")
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, host, port, backlog=512)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        """Another server on the same port has the same base URL, so it shares a response cache's keys."""
        self.base_url = f"http://{host}:{self.port}/v1"
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        async def close():
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._replies.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One keep-alive connection: requests in order until the client closes it."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in header_lines if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                answer = await self._answer(method, path, headers, body)
                if isinstance(answer, Fault):
                    if await self._break(answer, writer):
                        return
                    continue
                status, payload, extra_headers = answer
                data = json.dumps(payload).encode()
                extra = "".join(f"{k}: {v}\r\n" for k, v in extra_headers.items())
                writer.write(
                    f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n{extra}"
                    f"Content-Length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client hung up (or timed out and left); nothing to answer
        finally:
            writer.close()

    async def _break(self, fault: Fault, writer: asyncio.StreamWriter) -> bool:
        """Answer with `fault`; True when the connection is gone afterwards."""
        if fault.kind == "reset":
            writer.transport.abort()
            return True
        if fault.kind == "stall":
            await asyncio.sleep(fault.seconds)  # the client has given up by now
            writer.transport.abort()
            return True
        if fault.kind == "truncated":
            data = json.dumps(
                {
                    "id": "cut",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "[1, 0"}}],
                }
            ).encode()
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                + data[: len(data) // 2]
            )
            await writer.drain()
            writer.transport.abort()
            return True
        if fault.kind == "not_json":
            data = b"<html><body>502 upstream hiccup</body></html>"
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
            return False
        raise ValueError(f"unknown fault {fault.kind!r}")

    async def _answer(self, method: str, path: str, headers: dict, body: bytes):
        if method == "GET":
            if path.endswith("/stats"):
                return 200, {"requests": len(self.requests)}, {}
            if self.models_status != 200:
                return (
                    self.models_status,
                    {"error": {"message": f"scripted {self.models_status}", "type": "scripted"}},
                    {},
                )
            return (
                200,
                {
                    "object": "list",
                    "data": [{"id": "scripted", "object": "model", "owned_by": "test"}],
                },
                {},
            )
        request = json.loads(body)
        self.arrivals.append(time.monotonic())
        self.requests.append(request)
        self.headers.append(headers)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            text = await self._loop.run_in_executor(self._replies, self.reply, request["messages"])
        finally:
            self.in_flight -= 1
        if isinstance(text, Fault):
            return text
        if isinstance(text, (int, tuple)):
            status, extra_headers, *said = text if isinstance(text, tuple) else (text, {})
            return (
                status,
                {
                    "error": {
                        "message": said[0] if said else f"scripted {status}",
                        "type": "scripted",
                        "code": status,
                    }
                },
                extra_headers,
            )
        message = {
            "role": "assistant",
            "content": text["content"] if isinstance(text, dict) else text,
        }
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        if isinstance(text, dict):
            choice["logprobs"] = {"content": text["logprobs"]}
        return (
            200,
            {
                "id": f"cmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": 0,
                "model": request["model"],
                "choices": [choice],
                "usage": self.usage(request["messages"], message["content"])
                if self.usage
                else {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
            },
            {},
        )


def answer_by_prompt(messages) -> str:
    """A well-formed answer to any of our prompts: an explanation for explainers (its own for each
    prompt, so controls differ), a list of the asked length for scorers (alternating 1, 0 for 0/1
    lists, 1, 2 for the output judge's pairs, 1 for the intruder, 5 for simulation), and for SAEBench's
    question the odd-numbered texts."""
    if "comma-separated list of the numbers of the texts" in messages[0]["content"]:
        return ", ".join(
            map(
                str,
                range(1, len(re.findall(r"^\d+\. ", messages[-1]["content"], re.MULTILINE)) + 1, 2),
            )
        )
    asked = re.search(r"Answer with (\d+|one) (numbers|integers|number)", messages[-1]["content"])
    if asked is None:
        return (
            f"Explanation: scripted explanation {zlib.crc32(messages[-1]['content'].encode()):08x}"
        )
    if asked.group(1) == "one":
        return "[1]"
    n = int(asked.group(1))
    if (
        "each 1 or 2" in messages[-1]["content"]
    ):  # the output-side judge: which continuation of each pair
        return str([1 + i % 2 for i in range(n)])
    return str([5] * n if asked.group(2) == "integers" else [1 - i % 2 for i in range(n)])


def good_answers(messages) -> str:
    """A fixed explanation, and for a judge's question a well-formed list (alternating 1 and 0) of the
    length it asks for: answers that are always readable, whatever they mean."""
    user = messages[-1]["content"]
    if "Description:" not in user:
        return "Explanation: the word table"
    n = user.count("\nExample ")
    return str([1, 0] * (n // 2) + [1] * (n % 2))


def main() -> None:
    """Serve a fixed answer (or, with --by-prompt, `answer_by_prompt`) after a fixed delay until killed;
    prints the base URL first (for benches and the live `dagster dev` test)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--answer", default="Explanation: a scripted answer")
    parser.add_argument(
        "--by-prompt", action="store_true", help="answer each prompt in the form it asks for"
    )
    args = parser.parse_args()
    reply = answer_by_prompt if args.by_prompt else (lambda messages: args.answer)
    with ScriptedLLMServer(reply, delay_s=args.delay) as server:
        print(server.base_url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
