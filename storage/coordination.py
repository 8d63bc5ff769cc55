"""Coordination between the processes of a cluster through one PostgreSQL database, named by
`[settings] coordination_url`: the lock on a coder's activation cache (here), the LLM endpoint's
request limit and the response cache (`resources/llm.py`) then hold across machines. Empty (the
default), processes coordinate through files under the data root, which holds on one machine.

The locks are PostgreSQL advisory locks of a session: they end with it. When the holding process
exits or is killed the server sees its connection close at once; when its machine vanishes, TCP
keepalives give up on the connection within about half a minute.
"""
from __future__ import annotations

import hashlib
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from storage.atomic import exclusive_lock, locked


def connect(url: str):
    """An autocommit session on the coordination database, named after this process and machine
    (what a refused lock names as its holder)."""
    import psycopg  # loaded only where a deployment coordinates through PostgreSQL

    try:
        db = psycopg.connect(url, autocommit=True, connect_timeout=10, application_name=f"autointerp process {os.getpid()} on {socket.gethostname()}"[:63])
    except psycopg.OperationalError as error:
        raise ConnectionError(f"Cannot reach the coordination database of [settings] coordination_url: {' '.join(str(error).split())}. Fix: start it "
                              f"or correct the URL (its password comes from PGPASSWORD or ~/.pgpass); on one machine, leave coordination_url empty.") from None
    db.execute("SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3")  # a vanished node's session ends in ~25 s
    return db


def advisory_key(name: str) -> int:
    """The 64-bit key of the advisory lock called `name`: the same in every process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _holder(db, key: int) -> str:
    """Which session holds the advisory lock `key` (pg_locks shows a 64-bit key as two 32-bit halves)."""
    unsigned = key % 2**64
    row = db.execute("SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                     "AND l.objsubid = 1 AND l.classid::bigint = %s AND l.objid::bigint = %s", (unsigned >> 32, unsigned & 0xFFFFFFFF)).fetchone()
    return row[0] if row and row[0] else "another process"


@contextmanager
def advisory_lock(url: str, name: str, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the advisory lock `name` for the block on a session of its own; while another session
    holds it, wait for it, or (by default) raise `LockedError` at once naming `what` and the holder."""
    with connect(url) as db:
        key = advisory_key(name)
        if wait:
            db.execute("SELECT pg_advisory_lock(%s)", (key,))
        elif not db.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            raise locked(what, _holder(db, key))
        yield


def exclusive(coordination_url: str, name: str, path: Path, what: str, wait: bool = False):
    """Hold `name` exclusively for the block across every process of the deployment: an advisory
    lock in the coordination database when there is one, else a lock on the file `path`."""
    return advisory_lock(coordination_url, name, what, wait) if coordination_url else exclusive_lock(path, what, wait)
