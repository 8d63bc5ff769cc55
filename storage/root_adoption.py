"""Which data root the runs adopt: an identity file made once in the root, so that a node can tell the shared
root (NFS, Lustre, EFS mounted on every node) from an empty or private folder at the same path. The
instance records the identity its runs use; each step compares (`resources/settings.py`). With a
coordination database the record is a row there, claimed by one compare-and-set, so that of two nodes
starting together with different roots exactly one adopts its own."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from storage.coordination import connect, create_table
from storage.layout import DataRoot


def root_identity(root: DataRoot, create: bool) -> str | None:
    """The root's identity; with `create`, made now if it has none (the first of two processes to make
    it wins, and the other reads it). None when it has none and `create` is off."""
    path = root.identity_path
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                json.dump(
                    {
                        "id": uuid.uuid4().hex,
                        "created_on": socket.gethostname(),
                        "path": str(root.root),
                    },
                    handle,
                )
                handle.flush()
                os.fsync(handle.fileno())
    if not path.exists():
        return None
    for _ in range(50):  # a file another process has just created may not hold its text yet
        text = path.read_text()
        if text:
            return json.loads(text)["id"]
        time.sleep(0.05)
    raise RuntimeError(
        f"The data root identity {path} is empty. Fix: delete it and run again (it is made anew)."
    )


def mount_of(path: Path) -> Path:
    """The mount point `path` is on (its nearest existing ancestor's)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def root_record(root: DataRoot) -> dict:
    """What the coordination database records of an adopted root: its identity (made now if it has
    none), and where it was seen, for the message of a node that sees another root."""
    return {
        "identity": root_identity(root, create=True),
        "path": str(root.root),
        "mount": str(mount_of(root.root)),
        "node": socket.gethostname(),
    }


_COLUMNS = (
    "one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), identity TEXT NOT NULL, "
    "path TEXT NOT NULL, mount TEXT NOT NULL, node TEXT NOT NULL"
)


def claimed_root(url: str, root: DataRoot) -> dict:
    """The root recorded in the coordination database; where none is, `root` claims it by one
    compare-and-set (an insert that does nothing where another node's insert came first)."""
    with connect(url) as db:
        create_table(db, "autointerp_data_root", _COLUMNS)
        found = db.execute(
            "SELECT identity, path, mount, node FROM autointerp_data_root"
        ).fetchone()
        if found is None:
            record = root_record(root)
            db.execute(
                "INSERT INTO autointerp_data_root (identity, path, mount, node) VALUES "
                "(%(identity)s, %(path)s, %(mount)s, %(node)s) ON CONFLICT (one) DO NOTHING",
                record,
            )
            found = db.execute(
                "SELECT identity, path, mount, node FROM autointerp_data_root"
            ).fetchone()
    return dict(zip(("identity", "path", "mount", "node"), found, strict=False))


def replace_root(url: str, root: DataRoot) -> str:
    """Record `root` in the coordination database whatever was recorded (`autointerp adopt-root`); its identity."""
    record = root_record(root)
    with connect(url) as db:
        create_table(db, "autointerp_data_root", _COLUMNS)
        db.execute(
            "INSERT INTO autointerp_data_root (identity, path, mount, node) VALUES "
            "(%(identity)s, %(path)s, %(mount)s, %(node)s) ON CONFLICT (one) "
            "DO UPDATE SET identity = excluded.identity, path = excluded.path, "
            "mount = excluded.mount, node = excluded.node",
            record,
        )
    return record["identity"]
