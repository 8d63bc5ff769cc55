"""Benchmark the production LLM client: concurrency against a slow endpoint, and the response cache.

Starts a scripted OpenAI-compatible server on 127.0.0.1 that answers each request after
`--latency` seconds, sends `--requests` distinct explanation requests through `ProductionClient`
at `--concurrency`, then the same requests again. Prints a JSON object as its last line:
requests, concurrency, latency_s, wall_s, ideal_s (= requests × latency / concurrency) and
repeat_requests (requests the server saw during the second pass; the cache should answer all).
A third pass, on fresh prompts without a cache, measures the SDK's default httpx transport in the same
run as the baseline for the aiohttp transport the client uses (wall and client CPU per request).

    .venv/bin/python bench/llm_throughput.py
"""

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assets.prompts import explainer_messages  # noqa: E402
from resources.llm import LLMResource  # noqa: E402
from storage.layout import DataRoot  # noqa: E402


def timed_pass(
    llm: LLMResource, root: DataRoot | None, prompts: list, transport: str = "aiohttp"
) -> dict:
    """One pass as an asset runs it: open the client's session (connect, check the endpoint), then send all
    prompts at once and let the client bound them. The clock and the CPU meter start after the session opens:
    what is measured is the client's throughput, not its one-time setup (reported as setup_s)."""
    client = llm.client(root)
    client.inner.transport = transport

    async def run() -> dict:
        opened = time.perf_counter()
        async with client.session():
            started, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(client.complete(p, max_tokens=48) for p in prompts))
            return {
                "setup_s": started - opened,
                "wall_s": time.perf_counter() - started,
                "cpu_s": time.process_time() - cpu,
                "ledger": client.ledger,
            }

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()

    def prompts(tag: str) -> list:
        return [
            explainer_messages([([" latent", f" {i}", " fires", tag], [0.0, 1.0, 0.2, 0.0])], 1.0)
            for i in range(args.requests)
        ]

    # The server runs in its own process, as a real endpoint would, so it does not share our GIL.
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.scripted_llm_server", "--delay", str(args.latency)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    base_url = server.stdout.readline().strip()

    def server_requests() -> int:
        with urllib.request.urlopen(f"{base_url}/stats") as response:
            return json.loads(response.read())["requests"]

    try:
        with tempfile.TemporaryDirectory() as cache:
            llm = LLMResource(
                backend="openai",
                base_url=base_url,
                model="scripted",
                max_concurrency=args.concurrency,
            )
            first = timed_pass(llm, DataRoot(Path(cache)), prompts("a"))
            seen = server_requests()
            second = timed_pass(llm, DataRoot(Path(cache)), prompts("a"))
            repeat_requests = server_requests() - seen
            # Baseline in the same run: the SDK's default httpx transport, fresh prompts, no cache.
            httpx = timed_pass(llm, None, prompts("b"), transport="httpx")
    finally:
        server.kill()
    ideal_s = args.requests * args.latency / args.concurrency
    print(
        json.dumps(
            {
                "requests": args.requests,
                "concurrency": args.concurrency,
                "latency_s": args.latency,
                "wall_s": round(first["wall_s"], 3),
                "ideal_s": round(ideal_s, 3),
                "wall_over_ideal": round(first["wall_s"] / ideal_s, 3) if ideal_s else None,
                "setup_s": round(first["setup_s"], 3),
                "client_cpu_ms_per_request": round(1000 * first["cpu_s"] / args.requests, 2),
                "first_pass_requests": first["ledger"].requests,
                "repeat_requests": repeat_requests,
                "repeat_cache_hits": second["ledger"].cache_hits,
                "repeat_wall_s": round(second["wall_s"], 3),
                "httpx_wall_over_ideal": round(httpx["wall_s"] / ideal_s, 3) if ideal_s else None,
                "httpx_client_cpu_ms_per_request": round(1000 * httpx["cpu_s"] / args.requests, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
