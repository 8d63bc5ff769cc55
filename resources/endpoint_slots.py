"""An endpoint's limit on requests in flight, shared by every run: lock files under the data root
on one machine, leased rows of the coordination database on a cluster."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import uuid
import weakref
from contextlib import asynccontextmanager
from pathlib import Path

from storage.coordination import Session, advisory_key


class Slots:
    """At most `n` requests in flight to one endpoint from every process that shares its slots: a
    request holds one of `n` locks while it is sent. Concurrent Dagster runs then share the endpoint's
    concurrency instead of multiplying it; a killed process's slots come back (a file lock at once, a
    cluster's slot when its lease runs out).

    While every slot is held, one request of an event loop (a run's) asks for a slot again, backing off
    from 2 to 50 ms, and at once when this process frees one; its other requests wait behind it in turn.
    Each waiting request asking on its own cost 29 coordination queries per request at 32 in flight and
    kept freed slots idle (README: Scale out)."""

    def __init__(self):
        self._queues: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        """Per event loop: the turn to ask for a slot, and the signal that this loop freed one."""

    def _try_take(self) -> int | None:
        """A free slot, now locked by this process; None when every slot is held."""
        raise NotImplementedError

    def _release(self, slot: int) -> None:
        raise NotImplementedError

    async def _take(self) -> int | None:
        return self._try_take()

    async def _give_back(self, slot: int) -> None:
        self._release(slot)

    def _queue(self) -> tuple[asyncio.Lock, asyncio.Event]:
        loop = asyncio.get_running_loop()
        if loop not in self._queues:
            self._queues[loop] = (asyncio.Lock(), asyncio.Event())
        return self._queues[loop]

    @asynccontextmanager
    async def hold(self):
        turn, freed = self._queue()
        async with turn:
            wait = 0.002
            while (slot := await self._take()) is None:
                freed.clear()
                try:
                    await asyncio.wait_for(freed.wait(), wait)
                except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11 on
                    pass
                wait = min(0.05, wait * 2)
        try:
            yield
        finally:
            await self._give_back(slot)
            freed.set()


class EndpointSlots(Slots):
    """The slots of every process on one machine that shares the folder (all runs on one data root):
    `n` slot files, and a request holds an exclusive lock on one of them."""

    def __init__(self, folder: Path, n: int):
        super().__init__()
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = [folder / f"slot-{i:04d}.lock" for i in range(max(1, n))]

    def _try_take(self) -> int | None:
        import fcntl

        for path in random.sample(
            self.paths, len(self.paths)
        ):  # random order: processes rarely try the same slot
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        return None

    def _release(self, fd: int) -> None:
        os.close(fd)  # closing the only descriptor releases its lock


class SharedEndpointSlots(Slots):
    """The slots of every node of a cluster: `n` rows named after the endpoint in the table
    `llm_endpoint_slots` of the coordination database, each held by one request of one process under a
    lease that the process renews while the request is out. A slot is free only when the server says
    so: its holder released it, or its lease ran out (a killed process's slots come back after
    `lease_s`). A dropped session frees nothing, so the limit holds while a node reconnects; advisory
    locks of the session would have been freed by the server at once, for other nodes to take while
    this node's requests were still out. One per process, endpoint and limit (`resources/engines.py`):
    every run in the process shares it. Its queries block, so they run on a thread."""

    def __init__(self, url: str, name: str, n: int, lease_s: float = 15.0):
        super().__init__()
        self.keys = [advisory_key(f"{name} slot {i}") for i in range(max(1, n))]
        self.lease_s = lease_s
        self.holder = (
            f"autointerp process {os.getpid()} on {socket.gethostname()} {uuid.uuid4().hex[:8]}"
        )
        self._out: set[int] = set()
        """Slots this process's requests hold: renewed until released, never given to a second request."""
        self._lost: set[int] = set()
        """Slots of requests still out whose lease ran out and another process took: nothing more is
        sent until they end."""
        self._lock = threading.Lock()
        self._session = Session(url, on_connect=self._create_rows)
        self._closed = threading.Event()
        threading.Thread(
            target=self._renew_until_closed, name="endpoint slot leases", daemon=True
        ).start()

    def _create_rows(self, db) -> None:
        with db.transaction():  # nodes starting together would race to create the table
            db.execute(
                "SELECT pg_advisory_xact_lock(%s)", (advisory_key("llm_endpoint_slots table"),)
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS llm_endpoint_slots (slot BIGINT PRIMARY KEY, "
                "holder TEXT, lease_end TIMESTAMPTZ)"
            )
            db.execute(
                "INSERT INTO llm_endpoint_slots (slot) SELECT unnest(%s::bigint[]) ON CONFLICT DO NOTHING",
                (self.keys,),
            )

    def _try_take(self) -> int | None:
        with self._lock:
            if self._lost:
                return None
            free = [
                key for key in self.keys if key not in self._out
            ]  # ours until released, even where its lease ran out unnoticed
            row = self._session.run(
                lambda db: db.execute(
                    "UPDATE llm_endpoint_slots "
                    "SET holder = %s, lease_end = now() + make_interval(secs => %s) "
                    "WHERE slot = (SELECT slot FROM llm_endpoint_slots "
                    "WHERE slot = ANY(%s) AND (holder IS NULL OR lease_end < now()) "
                    "ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING slot",
                    (self.holder, self.lease_s, free),
                ).fetchone()
            )
            if row is not None:
                self._out.add(row[0])
            return row[0] if row else None

    def _release(self, key: int) -> None:
        with self._lock:
            self._out.discard(key)
            self._lost.discard(key)
            try:
                self._session.run(
                    lambda db: db.execute(
                        "UPDATE llm_endpoint_slots SET holder = NULL WHERE slot = %s AND holder = %s",
                        (key, self.holder),
                    )
                )
            except ConnectionError:
                pass  # no longer renewed: the server frees it when its lease runs out; the answer is not lost for it

    async def _take(self) -> int | None:
        return await asyncio.to_thread(self._try_take)

    async def _give_back(self, key: int) -> None:
        await asyncio.to_thread(self._release, key)

    def _renew_until_closed(self) -> None:
        while not self._closed.wait(self.lease_s / 5):
            with self._lock:
                out = list(self._out)
                if not out:
                    continue
                try:
                    kept = self._extend(out)
                except ConnectionError:
                    continue  # again at the next beat; the leases last a few beats
                self._lost |= set(out) - {key for (key,) in kept}

    def _extend(self, slots: list[int]) -> list[tuple]:
        """Renew the leases of `slots`; the rows of those still ours (one missing was lost to another holder)."""
        return self._session.run(
            lambda db: db.execute(
                "UPDATE llm_endpoint_slots SET lease_end = now() + make_interval(secs => %s) "
                "WHERE holder = %s AND slot = ANY(%s) RETURNING slot",
                (self.lease_s, self.holder, slots),
            ).fetchall()
        )

    def close(self) -> None:
        self._closed.set()
        self._session.close()
