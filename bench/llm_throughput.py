"""Benchmark the production LLM client: concurrency against a slow endpoint, and the response cache.

Starts a scripted OpenAI-compatible server on 127.0.0.1 that answers each request after
`--latency` seconds, sends `--requests` distinct explanation requests through `ProductionClient`
at `--concurrency`, then the same requests again. Prints a JSON object as its last line:
requests, concurrency, latency_s, wall_s, ideal_s (= requests × latency / concurrency) and
repeat_requests (requests the server saw during the second pass; the cache should answer all).

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()

    prompts = [explainer_messages([([" latent", f" {i}", " fires"], [0.0, 1.0, 0.2])], 1.0) for i in range(args.requests)]
    # The server runs in its own process, as a real endpoint would, so it does not share our GIL.
    server = subprocess.Popen([sys.executable, "-m", "tests.scripted_llm_server", "--delay", str(args.latency)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    base_url = server.stdout.readline().strip()

    def server_requests() -> int:
        with urllib.request.urlopen(f"{base_url}/stats") as response:
            return json.loads(response.read())["requests"]

    try:
        with tempfile.TemporaryDirectory() as cache:
            llm = LLMResource(backend="openai", base_url=base_url, model="scripted", max_concurrency=args.concurrency)

            async def one_pass():
                client = llm.client(Path(cache))
                await asyncio.gather(*(client.complete(p, max_tokens=48) for p in prompts))
                return client

            started = time.perf_counter()
            first = asyncio.run(one_pass())
            wall_s = time.perf_counter() - started
            seen = server_requests()
            second = asyncio.run(one_pass())
            repeat_requests = server_requests() - seen
    finally:
        server.kill()
    ideal_s = args.requests * args.latency / args.concurrency
    print(json.dumps({
        "requests": args.requests,
        "concurrency": args.concurrency,
        "latency_s": args.latency,
        "wall_s": round(wall_s, 3),
        "ideal_s": round(ideal_s, 3),
        "wall_over_ideal": round(wall_s / ideal_s, 3) if ideal_s else None,
        "first_pass_requests": first.ledger.requests,
        "repeat_requests": repeat_requests,
        "repeat_cache_hits": second.ledger.cache_hits,
    }))


if __name__ == "__main__":
    main()
