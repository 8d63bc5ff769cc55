"""A model file's identity is a hash of all of its bytes, computed once per version of the file."""

import os
import time

import pytest

from storage import content_identity
from storage.content_identity import content_digest


@pytest.fixture
def digests(tmp_path, monkeypatch):
    """A digest cache of this test's own, and no digest remembered by this process."""
    monkeypatch.setattr(content_identity, "DIGEST_CACHE", tmp_path / "digests")
    content_identity._file_digest.cache_clear()
    yield tmp_path / "digests"
    content_identity._file_digest.cache_clear()


def checkpoint(path, middle: bytes) -> None:
    """8 MiB whose first and last 3 MiB are the same for every `middle`: two checkpoints of one architecture."""
    path.write_bytes(b"h" * (3 << 20) + middle * (2 << 20) + b"t" * (3 << 20))


def test_checkpoints_that_differ_only_in_the_middle_have_different_identities(tmp_path, digests):
    for folder, middle in (("a", b"a"), ("b", b"b"), ("copy_of_a", b"a")):
        (tmp_path / folder).mkdir()
        checkpoint(tmp_path / folder / "model.gguf", middle)
    assert content_digest(tmp_path / "a" / "model.gguf") != content_digest(
        tmp_path / "b" / "model.gguf"
    )
    assert content_digest(tmp_path / "a") != content_digest(
        tmp_path / "b"
    )  # a checkpoint folder, too
    assert content_digest(tmp_path / "copy_of_a" / "model.gguf") == content_digest(
        tmp_path / "a" / "model.gguf"
    )  # the content names it, not the path


def test_a_file_is_hashed_once_and_again_when_it_changes_even_with_its_old_mtime(
    tmp_path, digests, monkeypatch
):
    path = tmp_path / "model.gguf"
    checkpoint(path, b"a")
    first = content_digest(path)
    # another process: the digest comes from the cache, the file is not read
    content_identity._file_digest.cache_clear()
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda file, *args, **kwargs: (
            pytest.fail(f"read {file}")
            if str(file) == str(path)
            else real_open(file, *args, **kwargs)
        ),
    )
    assert content_digest(path) == first and len(list(digests.iterdir())) == 1
    monkeypatch.setattr("builtins.open", real_open)

    stat = path.stat()
    time.sleep(0.05)  # the kernel's file times tick every few milliseconds
    with open(
        path, "r+b"
    ) as handle:  # rewritten in place, same size, its mtime put back (`cp -p`, `rsync -t`)
        handle.seek(4 << 20)
        handle.write(b"b" * 1024)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert content_digest(path) != first
