"""Names for what a model's files hold, so that results can say which model made them.

A model named by a path (the embedded GGUF, a local checkpoint, a sentence-transformers folder) is
named by its content, not by its path or modification time: a reinstall of the same wheel keeps the
name, another file of the same name changes it. The digest covers every byte of every file (two
checkpoints of one architecture can differ only in the middle: sampling the ends named both the same).
Reading gigabytes of weights at every definitions load is too slow, so each file's digest is computed
once and kept in `DIGEST_CACHE`, keyed by what changes whenever the file does: its device, inode,
size, modification and change times (a file rewritten in place, even with its old mtime put back,
has a new ctime; one replaced by another has a new inode).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from storage.atomic import atomic_path

CHUNK_BYTES = 1 << 20
DIGEST_CACHE = Path.home() / ".cache" / "autointerp" / "file-digests"
"""One small file per (file, stat) holding the file's digest; safe to delete (each file is hashed again once)."""


def file_digest(path: Path) -> str:
    """blake2b of the whole file, computed once per version of the file (`DIGEST_CACHE`)."""
    stat = os.stat(path)
    return _file_digest(
        str(Path(path).resolve()),
        stat.st_dev,
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
    )


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, *version: int) -> str:
    cached = DIGEST_CACHE / hashlib.sha256(f"{path}|{version}".encode()).hexdigest()[:32]
    try:
        return cached.read_text()
    except OSError:
        pass
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    try:
        with atomic_path(cached) as tmp:
            tmp.write_text(digest.hexdigest())
    except OSError:  # a cache that cannot be written only costs hashing again
        pass
    return digest.hexdigest()


def content_digest(path: Path) -> str:
    """Short hash of a file's content, or of every file under a folder with its relative name."""
    path = Path(path)
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    )
    digest = hashlib.sha256()
    for file in files:
        name = file.name if file == path else str(file.relative_to(path))
        digest.update(f"{name}:{file_digest(file)}\n".encode())
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
