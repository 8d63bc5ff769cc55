"""Which data root this is: an identity file made once in the root, so that a node can tell the shared
root (NFS, Lustre, EFS mounted on every node) from an empty or private folder at the same path. The
instance records the identity its runs use; each step compares (`resources/settings.py`)."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

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
                json.dump({"id": uuid.uuid4().hex, "created_on": socket.gethostname(), "path": str(root.root)}, handle)
                handle.flush()
                os.fsync(handle.fileno())
    if not path.exists():
        return None
    for _ in range(50):  # a file another process has just created may not hold its text yet
        text = path.read_text()
        if text:
            return json.loads(text)["id"]
        time.sleep(0.05)
    raise RuntimeError(f"The data root identity {path} is empty. Fix: delete it and run again (it is made anew).")


def mount_of(path: Path) -> Path:
    """The mount point `path` is on (its nearest existing ancestor's)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path
