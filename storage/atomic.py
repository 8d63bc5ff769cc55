"""Atomic file writes (a crash leaves either the old file or the new one, never half of one) and
exclusive locks between processes."""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path: Path, before_replace: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds, and
    `before_replace` (a lock's lease check, the last moment to refuse) does not raise."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except PermissionError as error:
        raise not_writable(path.parent, error) from None
    os.close(fd)
    try:
        yield Path(tmp)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def not_writable(folder: Path, error: OSError) -> PermissionError:
    """The error for a data folder this user cannot write, with the fix (not a library's traceback)."""
    return PermissionError(
        f"Cannot write under {folder}: {error.strerror or error}. Fix: make the data root writable by this user, "
        f"or set the deployment's [settings] data_dir (or `autointerp --data`) to a folder that is."
    )


def json_safe(value):
    """`value` as plain JSON: every NaN or infinity as None (JSON has no NaN, and other readers reject
    a bare `NaN`), numpy scalars and arrays as Python numbers and lists, keys as strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_json(path: Path, obj) -> None:
    """Valid JSON always: a NaN or infinite number (an FVU of a broken coder) is written as null."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False))


def read_json(path: Path):
    return json.loads(path.read_text())


def read_json_or_empty(path: Path) -> dict:
    """The JSON object at `path`, or {} where there is none or it is not JSON: a cache's stamp, whose
    absence only means that the cache is built again."""
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError):
        return {}


class LockedError(RuntimeError):
    """Another process holds the lock: the work it guards is being done right now."""


def locked(what: str, holder: str) -> LockedError:
    """The one wording of a refused lock, whoever holds it (a process here, or on another node)."""
    return LockedError(
        f"{what} is already running in {holder}. Fix: wait for it to finish; "
        f"or stop it and run again, which resumes from its last checkpoint."
    )


@contextmanager
def exclusive_lock(path: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold `path` exclusively for the block, across processes: wait for it, or (by default) raise
    `LockedError` at once naming `what` and the holder's process id. The kernel releases the lock when
    its holder dies, even by SIGKILL, so a crash never leaves it stuck."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise locked(what, f"process {handle.read().strip() or 'another process'}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
