"""Coordination between the processes of a cluster through one PostgreSQL database, named by
`[settings] coordination_url`: the lock on a coder's activation cache (here), the LLM endpoint's
request limit and the response cache (`resources/endpoint_slots.py`, `resources/response_cache.py`)
then hold across machines. Empty (the default), processes coordinate through files under the data
root, which holds on one machine.

The locks here are PostgreSQL advisory locks of a session: they end with it. When the holding
process exits or is killed the server sees its connection close at once; when its machine vanishes,
TCP keepalives give up on the connection within about half a minute. A long-lived process's session
(`Session`: the response cache's, the endpoint slots') reconnects when dropped; what must outlive a
dropped session (an endpoint slot) is a row the server holds, not a lock of the session.

A lock is a lease: it can be lost while its holder still runs (a server restart, a terminated
backend, a partition longer than the keepalives), and another node then takes it. So every taking
of a lock bumps its generation (the fencing token, in the table `autointerp_leases`), and a holder
calls `Lease.check` right before each commit: its session must still answer and the generation must
still be its own, else `LeaseLost` and nothing is committed.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from storage.atomic import exclusive_lock, locked

T = TypeVar("T")


def connect(url: str):
    """An autocommit session on the coordination database, named after this process and machine
    (what a refused lock names as its holder)."""
    import psycopg  # loaded only where a deployment coordinates through PostgreSQL

    try:
        db = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=10,
            application_name=f"autointerp process {os.getpid()} on {socket.gethostname()}"[:63],
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )  # a lease check never hangs on a vanished server
    except psycopg.OperationalError as error:
        raise ConnectionError(
            "Cannot reach the coordination database of [settings] coordination_url: "
            f"{' '.join(str(error).split())}. Fix: start it or correct the URL "
            "(its password comes from PGPASSWORD or ~/.pgpass); "
            "on one machine, leave coordination_url empty."
        ) from None
    db.execute(
        "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
    )  # a vanished node's session ends in ~25 s
    return db


class Session:
    """A session on the coordination database that outlives its connection, for a long-lived process:
    a query that finds the connection gone (the server restarted, its backend was terminated, the
    network dropped) connects again, backing off from 0.1 s to 5 s with jitter, and runs again, for up
    to `patience_s` before it raises `ConnectionError`; the next query tries afresh. Whatever the
    server kept for the dead session (advisory locks, session settings) is gone with it: `on_connect`
    runs on every new connection before any query does, so the owner can set up or forget state.
    Work given to `run` must be safe to run again. Its calls block: an event loop makes them through a
    thread (`asyncio.to_thread`)."""

    def __init__(
        self,
        url: str,
        on_connect: Callable[[Any], None] = lambda db: None,
        patience_s: float = 60.0,
    ):
        self.url = url
        self.patience_s = patience_s
        self._on_connect = on_connect
        self._lock = threading.Lock()
        self._db, self._set_up = None, False
        with self._lock:
            self._connected()  # a wrong URL or password fails here, at once, not after the backoff

    def _connected(self):
        """The live connection, set up: a setup that failed on a live connection (not a lost one) is
        the caller's error, and is tried again by the next query."""
        if self._db is None:
            self._db, self._set_up = connect(self.url), False
        if not self._set_up:
            self._on_connect(self._db)
            self._set_up = True
        return self._db

    def run(self, work: Callable[[Any], T]) -> T:
        """`work(connection)`'s result, on a live connection (one thread at a time)."""
        with self._lock:
            deadline, wait = time.monotonic() + self.patience_s, 0.1
            while True:
                try:
                    return work(self._connected())
                except Exception as error:
                    if self._db is not None and not self._db.broken and not self._db.closed:
                        raise  # the query's own error, on a live session
                    self._drop()
                    if time.monotonic() + wait > deadline:
                        raise ConnectionError(
                            f"Lost the coordination database and could not reconnect within {self.patience_s:.0f} s: "
                            f"{' '.join(str(error).split())}"
                        ) from error
                time.sleep(wait * random.uniform(0.5, 1.0))
                wait = min(5.0, wait * 2)

    def _drop(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def advisory_key(name: str) -> int:
    """The 64-bit key of the advisory lock called `name`: the same in every process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def create_table(db, name: str, columns: str) -> None:
    """Create the coordination table `name` if it is missing: nodes starting together would race to."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key(f"{name} table"),))
        db.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")


class LeaseLost(RuntimeError):
    """The lock was lost while held (its session ended): another process may hold it and write now."""


@dataclass
class Lease:
    """A held lock: its name and generation (None for a file lock, which the kernel holds until its
    holder exits, so it cannot be lost), and the session that holds it."""

    name: str
    generation: int | None = None
    session: object = None

    @property
    def record(self) -> dict:
        """What a commit made under this lease records beside what it wrote."""
        return {"lock": self.name, "generation": self.generation}

    def check(self) -> None:
        """Raise `LeaseLost` unless this lease still holds: its session answers and no later holder took it."""
        if self.session is None:
            return
        import psycopg

        try:
            row = self.session.execute(
                "SELECT generation FROM autointerp_leases WHERE name = %s", (self.name,)
            ).fetchone()
            current = row[0] if row else None
            why = (
                ""
                if current == self.generation
                else f"its generation {self.generation} was taken over by generation {current}"
            )
        except psycopg.Error as error:
            why = f"its session ended ({' '.join(str(error).split()) or type(error).__name__})"
        if why:
            raise LeaseLost(
                f"The lock {self.name!r} was lost while held: {why}. Nothing was committed; "
                "another process may hold it now. Fix: run again "
                "(it resumes from its last checkpoint)."
            )


def _holder(db, key: int) -> str:
    """Which session holds the advisory lock `key` (pg_locks shows a 64-bit key as two 32-bit halves)."""
    unsigned = key % 2**64
    row = db.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.classid::bigint = %s AND l.objid::bigint = %s",
        (unsigned >> 32, unsigned & 0xFFFFFFFF),
    ).fetchone()
    return row[0] if row and row[0] else "another process"


@contextmanager
def advisory_lock(url: str, name: str, what: str, wait: bool = False) -> Iterator[Lease]:
    """Hold the advisory lock `name` for the block on a session of its own, as the next generation of
    its lease; while another session holds it, wait for it, or (by default) raise `LockedError` at once
    naming `what` and the holder."""
    with connect(url) as db:
        create_table(
            db,
            "autointerp_leases",
            "name TEXT PRIMARY KEY, generation BIGINT NOT NULL, holder TEXT NOT NULL",
        )
        key = advisory_key(name)
        if wait:
            db.execute("SELECT pg_advisory_lock(%s)", (key,))
        elif not db.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            raise locked(what, _holder(db, key))
        generation = db.execute(
            "INSERT INTO autointerp_leases VALUES (%s, 1, current_setting('application_name')) "
            "ON CONFLICT (name) DO UPDATE SET generation = autointerp_leases.generation + 1, "
            "holder = excluded.holder RETURNING generation",
            (name,),
        ).fetchone()[0]
        yield Lease(name, generation, db)


@contextmanager
def _file_lease(path: Path, name: str, what: str, wait: bool) -> Iterator[Lease]:
    with exclusive_lock(path, what, wait):
        yield Lease(name)


def exclusive(coordination_url: str, name: str, path: Path, what: str, wait: bool = False):
    """Hold `name` exclusively for the block across every process of the deployment, yielding its
    `Lease`: an advisory lock in the coordination database when there is one, else a lock on the file `path`."""
    return (
        advisory_lock(coordination_url, name, what, wait)
        if coordination_url
        else _file_lease(path, name, what, wait)
    )
