"""With `[settings] coordination_url`, the lock on a coder's activation cache is a PostgreSQL
advisory lock: a second node is refused at once, naming the holder, and a holder killed by SIGKILL
lets the next one in within moments (its session ends with its connection)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.atomic import LockedError
from storage.coordination import exclusive

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from pathlib import Path
from storage.coordination import exclusive

with exclusive(
    sys.argv[1],
    "activations rand/model.layers.1",
    Path(sys.argv[2]),
    "Caching the activations of rand/model.layers.1",
):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(url: str, lock_file: Path) -> subprocess.Popen:
    """Another node: a process that takes the coder's lock and keeps it until it is killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, str(lock_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    return holder


def test_a_second_node_caching_the_same_coder_is_refused_naming_the_holder(
    tmp_path, coordination_url
):
    from assets.activations import cache_activations
    from resources.subject_model import SubjectModelResource
    from storage.layout import DataRoot
    from tests.conftest import random_coder

    holder = start_holder(
        coordination_url, tmp_path / "elsewhere.lock"
    )  # a lock file no other process looks at: the database decides
    try:
        with pytest.raises(LockedError) as refused:
            cache_activations(
                [random_coder()],
                SubjectModelResource(),
                DataRoot.at(tmp_path),
                coordination_url=coordination_url,
            )
        assert str(refused.value).startswith(
            f"Caching the activations of rand/model.layers.1 is already running in autointerp process {holder.pid} "
            f"on {socket.gethostname()}. Fix: wait"
        )
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_releases_the_lock_within_moments(tmp_path, coordination_url):
    holder = start_holder(coordination_url, tmp_path / "a.lock")
    with pytest.raises(LockedError):
        with exclusive(
            coordination_url, "activations rand/model.layers.1", tmp_path / "b.lock", "Caching"
        ):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    killed = time.monotonic()
    while True:
        try:
            with exclusive(
                coordination_url, "activations rand/model.layers.1", tmp_path / "b.lock", "Caching"
            ):
                break
        except LockedError:
            assert time.monotonic() - killed < 2.0, "the killed holder's lock was not released"
            time.sleep(0.05)


def test_other_coders_are_not_held_up(tmp_path, coordination_url):
    holder = start_holder(coordination_url, tmp_path / "a.lock")
    try:
        with exclusive(
            coordination_url, "activations other/model.layers.1", tmp_path / "b.lock", "Caching"
        ):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_tables_write_lock_holds_across_nodes_through_the_coordination_database(
    tmp_path, coordination_url
):
    import threading

    from storage.store import TableStore

    node_a, node_b = (
        TableStore(TableStore.at(tmp_path / name).layout, coordination_url=coordination_url)
        for name in ("a", "b")
    )  # two nodes' views of one table
    table_a, table_b = node_a.explanations("c/h", "00"), node_b.explanations("c/h", "00")
    with table_a.lock("Explaining c/h shard 00"):
        with pytest.raises(
            LockedError,
            match=rf"Importing .* is already running in autointerp process {os.getpid()} on {socket.gethostname()}",
        ):
            with table_b.lock("Importing delphi's explanations"):
                pass
        entered = threading.Event()

        def write_after_the_holder():
            with table_b.lock("Explaining c/h shard 00", wait=True):
                entered.set()

        waiter = threading.Thread(target=write_after_the_holder)
        waiter.start()
        time.sleep(0.5)
        assert not entered.is_set()  # a waiting writer waits for the holder
    waiter.join(timeout=10)
    assert entered.is_set()
    assert not list(tmp_path.rglob("*.lock"))  # no lock file on the (shared) data root
