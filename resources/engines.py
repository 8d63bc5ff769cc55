"""Long-lived engines: the subject model, the embedder, llama.cpp models and vLLM engines. Loading one
takes seconds to minutes and holds (GPU) memory, so each exists once per process and settings,
shared by every resource and run in the process, and is closed when the process ends. Dagster runs
each run in its own process, so there a run's engines live exactly as long as the run."""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_ENGINES: dict[tuple, object] = {}
_LOCK = threading.RLock()


def engine(kind: str, settings: tuple, build: Callable[[], T]) -> T:
    """The process's engine of `kind` for `settings`, built by `build` the first time (one at a time:
    two threads asking at once get the same engine)."""
    key = (kind, *settings)
    with _LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = build()
        return _ENGINES[key]


def close_engines(kind: str | None = None) -> int:
    """Close and forget the engines (of one kind, or all); returns how many were closed."""
    with _LOCK:
        keys = [k for k in _ENGINES if kind is None or k[0] == kind]
        for key in keys:
            held = _ENGINES.pop(key)
            for method in ("close", "shutdown"):
                if callable(getattr(held, method, None)):
                    try:
                        getattr(held, method)()
                    except Exception:  # closing at exit must not turn a finished run into a failure
                        pass
                    break
        return len(keys)


atexit.register(close_engines)
