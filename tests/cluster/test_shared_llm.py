"""With `[settings] coordination_url`, two nodes (processes with data roots of their own, so nothing
on disk is shared) share the LLM endpoint's request limit and the response cache through
PostgreSQL, against one scripted server that records what it was sent and its peak in flight; the
limit holds and every request is answered while a node's sessions are terminated and reconnect."""

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.scripted_llm_server import ScriptedLLMServer

REPO = Path(__file__).resolve().parents[2]
NODE = """
import asyncio, json, sys, time
from pathlib import Path
from resources.llm import LLMResource
from storage.layout import DataRoot

base_url, data, url = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
ready, together, contents = Path(sys.argv[4]), int(sys.argv[5]), json.loads(sys.argv[6])
resource = LLMResource(backend="openai", base_url=base_url, model="scripted", max_concurrency=4)
client = resource.client(DataRoot(data), coordination_url=url)
(ready / data.name).touch()
while len(list(ready.iterdir())) < together:  # start together, however long each took to import
    time.sleep(0.01)

async def main():
    async with client.session():
        await asyncio.gather(
            *(client.complete([{"role": "user", "content": text}], max_tokens=4) for text in contents)
        )

asyncio.run(main())
"""


def run_nodes(
    server: ScriptedLLMServer, url: str, folder: Path, work: dict[str, list[str]], meanwhile=None
) -> None:
    """One process per node of `work` (node name → the prompts it asks), started together, each on its own data root;
    `meanwhile(nodes)` runs on a thread of its own while they work."""
    ready = folder / f"ready-{len(list(folder.glob('ready-*')))}"
    ready.mkdir()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                NODE,
                server.base_url,
                str(folder / name),
                url,
                str(ready),
                str(len(work)),
                json.dumps(contents),
            ],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, contents in work.items()
    ]
    if meanwhile is not None:
        threading.Thread(target=meanwhile, args=(nodes,), daemon=True).start()
    for node in nodes:
        assert node.wait(timeout=120) == 0, node.stderr.read()[-2000:]


def test_two_nodes_share_the_endpoint_limit(tmp_path, coordination_url):
    lock, in_flight, together = threading.Lock(), [], [False]

    def reply(messages):
        node = messages[-1]["content"].split()[0]
        with lock:
            in_flight.append(node)
            together[0] |= len(set(in_flight)) == 2
        time.sleep(0.25)
        with lock:
            in_flight.remove(node)
        return "ok"

    with ScriptedLLMServer(reply) as server:
        run_nodes(
            server,
            coordination_url,
            tmp_path,
            {node: [f"{node} request {i}" for i in range(16)] for node in ("a", "b")},
        )
    assert len(server.requests) == 2 * 16
    assert (
        together[0] and server.peak_in_flight == 4
    )  # both sent at once, never more than the one limit of 4, and it was reached


def test_a_second_node_resends_nothing_the_first_asked(tmp_path, coordination_url):
    with ScriptedLLMServer(lambda messages: f"answer to {messages[-1]['content']}") as server:
        run_nodes(server, coordination_url, tmp_path, {"a": [f"question {i}" for i in range(8)]})
        run_nodes(server, coordination_url, tmp_path, {"b": [f"question {i}" for i in range(12)]})
        asked = [request["messages"][-1]["content"] for request in server.requests]
    assert sorted(asked) == sorted(
        f"question {i}" for i in range(12)
    )  # each asked once, by whichever node asked first
    assert not list(tmp_path.rglob("*.sqlite")) and not list(
        tmp_path.rglob("slots")
    )  # nothing coordinated through the nodes' disks


def test_the_limit_holds_and_every_request_is_answered_while_a_node_reconnects(
    tmp_path, coordination_url
):
    """Node a's sessions (its response cache's and its endpoint slots') are terminated while it has requests
    out: its slots stay its own on the server, so node b, waiting for one, does not get them; node a
    reconnects and finishes."""
    import psycopg

    lock, in_flight, killed, killed_at = threading.Lock(), [], [], []

    def reply(messages):
        node = messages[-1]["content"].split()[0]
        with lock:
            in_flight.append(node)
        time.sleep(0.25)
        with lock:
            in_flight.remove(node)
        return "ok"

    def terminate_sessions_of_a(nodes):
        deadline = time.monotonic() + 60
        while not ("a" in in_flight and len(in_flight) == 4) and time.monotonic() < deadline:
            time.sleep(0.005)
        killed_at.append(len(server.requests))
        with psycopg.connect(coordination_url, autocommit=True) as db:
            killed.extend(
                db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
                    (f"autointerp process {nodes[0].pid} %",),
                ).fetchall()
            )

    with ScriptedLLMServer(reply) as server:
        run_nodes(
            server,
            coordination_url,
            tmp_path,
            {node: [f"{node} request {i}" for i in range(16)] for node in ("a", "b")},
            terminate_sessions_of_a,
        )
    assert (
        len(killed) == 2 and all(ok for (ok,) in killed) and killed_at[0] < 24
    )  # its cache's session and its slots' session, mid-run
    assert len(server.requests) == 2 * 16 and server.peak_in_flight == 4


def test_a_query_the_database_holds_up_leaves_the_event_loop_free(tmp_path, coordination_url):
    """While another session holds the response cache's table, a request waits for it without stopping the
    event loop: the run's other coroutines go on (a ticker here), and it is answered once the table is free."""
    import psycopg

    from resources.llm import LLMResource
    from storage.layout import DataRoot

    with ScriptedLLMServer(lambda messages: "ok") as server:
        client = LLMResource(backend="openai", base_url=server.base_url, model="scripted").client(
            DataRoot(tmp_path), coordination_url=coordination_url
        )
        blocker, ticks = psycopg.connect(coordination_url), []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        async def main():
            async with client.session():
                await client.complete(
                    [{"role": "user", "content": "warm up"}], max_tokens=2
                )  # the SDK loaded, its connection open
                blocker.execute("LOCK TABLE llm_responses IN ACCESS EXCLUSIVE MODE")
                threading.Timer(1.0, blocker.commit).start()  # let go after a second
                ticks.append(time.monotonic())  # asked: from here on
                ticking = asyncio.ensure_future(ticker())
                answer = await client.complete([{"role": "user", "content": "hello"}], max_tokens=2)
                ticks.append(time.monotonic())  # answered: until here
                ticking.cancel()
            return answer

        answer = asyncio.run(main())
        blocker.close()
    assert answer.text == "ok" and ticks[-1] - ticks[0] >= 1.0  # it did wait for the table
    assert (
        max(later - earlier for earlier, later in zip(ticks, ticks[1:], strict=False)) < 0.5
    )  # and the loop ran meanwhile


def test_an_endpoint_slot_is_free_only_when_the_server_says_so(coordination_url):
    """A slot stays its holder's through a dropped session and for as long as it renews the lease; it is
    free once released, or once its holder stops renewing (a killed process) and the lease runs out."""
    import psycopg

    from resources.endpoint_slots import SharedEndpointSlots

    holder, other = (
        SharedEndpointSlots(coordination_url, "endpoint x", 1, lease_s=2.0) for _ in range(2)
    )
    slot = holder._try_take()
    with psycopg.connect(coordination_url, autocommit=True) as db:
        assert db.execute(
            "SELECT pg_terminate_backend(%s)",
            (holder._session.run(lambda session: session.info.backend_pid),),
        ).fetchone()[0]
    time.sleep(5.0)  # two and a half leases: renewed meanwhile, on a new session
    assert slot is not None and other._try_take() is None
    holder._release(slot)
    assert other._try_take() == slot
    other.close()  # gone while holding it: nobody renews it
    assert holder._try_take() is None
    time.sleep(2.5)
    assert holder._try_take() == slot
    holder.close()
