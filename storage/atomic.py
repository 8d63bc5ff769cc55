"""Atomic file writes: a crash leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj):
    """`obj` with every NaN or infinity as None: JSON has no NaN, and other readers reject a bare `NaN`."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    """Valid JSON always: a NaN or infinite number (an FVU of a broken coder) is written as null."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False))


def read_json(path: Path):
    return json.loads(path.read_text())
