"""The LLM response cache: answers keyed by a hash of the backend, model, messages and sampling
parameters, on disk (SQLite under the data root) or, for a cluster, in the coordination database."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from resources.llm_protocol import Completion
from storage.coordination import Session, create_table


class ResponseCache:
    """Responses on disk (SQLite), keyed by a hash of the backend, model, messages and sampling parameters."""

    def __init__(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(path.parent, os.W_OK) or (
                path.exists() and not os.access(path, os.W_OK)
            ):
                raise PermissionError(13, "permission denied")
        except (
            PermissionError
        ) as error:  # else SQLite says only "attempt to write a readonly database"
            raise PermissionError(
                f"Cannot write the LLM response cache {path}: {error.strerror or error}. "
                "Fix: make the data root writable by this user, or set llm.cache_dir to a "
                "writable folder ('' turns the cache off)."
            ) from None
        self.path = path
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db as db:
            db.execute(
                "PRAGMA journal_mode=WAL"
            )  # readers never block the one writer; other processes share it safely
            db.execute(
                "PRAGMA synchronous=NORMAL"
            )  # no fsync per answer: a crash of the app loses nothing, a power cut the last few
            db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, completion TEXT NOT NULL)"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _connect(self):
        """A transaction on the one connection, serialized: SQLite connections are not safe to share unguarded."""
        with self._lock, self._db:
            yield self._db

    @staticmethod
    def key(model_id: str, messages: list[dict], params: dict) -> str:
        payload = json.dumps(
            {"model": model_id, "messages": messages, "params": params},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> Completion | None:
        with self._connect() as db:
            row = db.execute("SELECT completion FROM responses WHERE key = ?", (key,)).fetchone()
        return Completion(**json.loads(row[0])) if row else None

    def put(self, key: str, completion: Completion) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, completion_json(completion))
            )

    def forget(self, key: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM responses WHERE key = ?", (key,))


class SharedResponseCache:
    """The response cache of a cluster: the same keys and answers as `ResponseCache`, in the table
    `llm_responses` of the coordination database, so no node asks what another already asked. One
    per process (`resources/engines.py`): every run in the process shares its session, which
    reconnects when dropped (`Session`) so one lost connection does not fail every later step."""

    def __init__(self, url: str):
        self._session = Session(url, on_connect=self._create_table)

    @staticmethod
    def _create_table(db) -> None:
        create_table(db, "llm_responses", "key TEXT PRIMARY KEY, completion TEXT NOT NULL")

    def close(self) -> None:
        self._session.close()

    def get(self, key: str) -> Completion | None:
        row = self._session.run(
            lambda db: db.execute(
                "SELECT completion FROM llm_responses WHERE key = %s", (key,)
            ).fetchone()
        )
        return Completion(**json.loads(row[0])) if row else None

    def put(self, key: str, completion: Completion) -> None:
        self._session.run(
            lambda db: db.execute(
                "INSERT INTO llm_responses VALUES (%s, %s) ON CONFLICT (key) "
                "DO UPDATE SET completion = EXCLUDED.completion",
                (key, completion_json(completion)),
            )
        )

    def forget(self, key: str) -> None:
        self._session.run(lambda db: db.execute("DELETE FROM llm_responses WHERE key = %s", (key,)))


def completion_json(completion: Completion) -> str:
    """How a response cache stores an answer: its fields as asdict gives them, without its deep copy."""
    return json.dumps(vars(completion), default=_plain_number)


def _plain_number(value):
    """A numpy scalar (a backend's logprob or count) as the Python number JSON writes; anything else is
    still an error."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
