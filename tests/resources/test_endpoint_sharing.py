"""Runs on one data root share the endpoint's concurrency limit instead of multiplying it: two
processes (as two Dagster runs are), each allowed 4 requests in flight, against one scripted server
that records how many it was answering at once and from whom."""

import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.scripted_llm_server import ScriptedLLMServer

REPO = Path(__file__).resolve().parents[2]
SENDER = """
import asyncio, sys, time
from pathlib import Path
from resources.llm import LLMResource
from storage.layout import DataRoot

tag, base_url, root, ready = sys.argv[1], sys.argv[2], DataRoot(Path(sys.argv[3])), Path(sys.argv[4])
client = LLMResource(backend="openai", base_url=base_url, model="scripted", max_concurrency=4).client(root)
(ready / tag).touch()
while len(list(ready.iterdir())) < 2:  # start together, however long each took to import
    time.sleep(0.01)

async def main():
    async with client.session():
        await asyncio.gather(
            *(
                client.complete([{"role": "user", "content": f"{tag} request {i}"}], max_tokens=4)
                for i in range(16)
            )
        )

asyncio.run(main())
"""


def run_two_senders(roots: tuple[Path, Path], ready: Path) -> tuple[int, bool]:
    """(most requests answered at once, whether both processes had requests in flight together)."""
    lock, in_flight, most, together = threading.Lock(), [], [0], [False]

    def reply(messages):
        tag = messages[-1]["content"].split()[0]
        with lock:
            in_flight.append(tag)
            most[0] = max(most[0], len(in_flight))
            together[0] |= len(set(in_flight)) == 2
        time.sleep(0.25)
        with lock:
            in_flight.remove(tag)
        return "ok"

    ready.mkdir()
    with ScriptedLLMServer(reply) as server:
        senders = [
            subprocess.Popen(
                [sys.executable, "-c", SENDER, tag, server.base_url, str(root), str(ready)],
                cwd=REPO,
                stderr=subprocess.PIPE,
                text=True,
            )
            for tag, root in zip(("first", "second"), roots, strict=False)
        ]
        for sender in senders:
            assert sender.wait(timeout=120) == 0, sender.stderr.read()[-2000:]
        assert len(server.requests) == 2 * 16  # every request answered once
    return most[0], together[0]


def test_two_runs_on_one_data_root_share_the_endpoint_limit(tmp_path):
    most, together = run_two_senders((tmp_path, tmp_path), tmp_path / "ready")
    assert together and most == 4  # both sent at the same time, and never more than the one limit


def test_runs_on_different_data_roots_each_have_their_own_limit(tmp_path):
    most, together = run_two_senders((tmp_path / "a", tmp_path / "b"), tmp_path / "ready")
    assert together and most == 8  # what sharing prevents: the limits add up


def test_a_run_waiting_for_its_first_answer_holds_no_slot_of_the_endpoint(tmp_path):
    """While a run's first request is out alone, its other requests wait without taking one of the
    endpoint's shared slots, so another run on the same endpoint is not held up by them."""
    import asyncio

    from resources.llm import LLMResource
    from storage.layout import DataRoot

    def reply(messages):
        time.sleep(1.0 if messages[-1]["content"].startswith("slow") else 0.0)
        return "ok"

    with ScriptedLLMServer(reply) as server:
        resource = LLMResource(
            backend="openai", base_url=server.base_url, model="scripted", max_concurrency=2
        )
        starting, running = (
            resource.client(DataRoot(tmp_path)),
            resource.client(DataRoot(tmp_path)),
        )  # two runs on one data root: 2 slots in all

        async def main():
            async with starting.session(), running.session():
                await running.complete(
                    [{"role": "user", "content": "warm"}], max_tokens=4
                )  # this run is past its first answer
                first = asyncio.ensure_future(
                    starting.complete([{"role": "user", "content": "slow first"}], max_tokens=4)
                )
                rest = [
                    asyncio.ensure_future(
                        starting.complete([{"role": "user", "content": f"slow {i}"}], max_tokens=4)
                    )
                    for i in range(3)
                ]
                await asyncio.sleep(0.2)
                began = time.monotonic()
                await running.complete([{"role": "user", "content": "quick"}], max_tokens=4)
                waited = time.monotonic() - began
                await asyncio.gather(first, *rest)
                return waited

        waited = asyncio.run(main())
    assert waited < 0.6  # it did not wait for the other run's first answer (1 s) to free a slot


def test_requests_waiting_for_a_slot_ask_for_one_in_turn(tmp_path):
    """20 requests on 2 slots, each held 0.2 s: the waiting ones ask one at a time (and at once when this run
    frees a slot), so the asks do not grow with the queue: about 90 here, where each of the 18 waiting requests
    asking on its own made about 450. On a cluster each ask is a coordination query."""
    import asyncio

    from resources.endpoint_slots import EndpointSlots

    slots, asks, most, held = EndpointSlots(tmp_path / "slots", 2), [0], [0], [0]
    take = slots._try_take

    def counted():
        asks[0] += 1
        return take()

    slots._try_take = counted

    async def request():
        async with slots.hold():
            held[0] += 1
            most[0] = max(most[0], held[0])
            await asyncio.sleep(0.2)
            held[0] -= 1

    async def main():
        await asyncio.gather(*(request() for _ in range(20)))

    asyncio.run(main())
    assert most[0] == 2
    assert asks[0] < 150, asks[0]
