"""The cluster's services, started for the tests and stopped by their PIDs: PostgreSQL (the instance) and
Redis (the celery broker), each on a free port of 127.0.0.1 in a temporary folder."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def needs_the_cluster_extra() -> None:
    """Skip the calling test module where the `cluster` extra is not installed."""
    for module in ("dagster_celery", "dagster_postgres"):
        pytest.importorskip(module, reason="the cluster tests need the `cluster` extra (pip install -e '.[cluster]')")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout_s} s")


def stop(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """Stop a process this test started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server of its own (trust auth, as the `postgres` user when the tests run as root); its URL."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bin_dir = Path(binaries[-1]).parent
    as_user = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
    data = Path(tempfile.mkdtemp(prefix="autointerp-pg-"))
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    subprocess.run([bin_dir / "initdb", "-D", data / "db", "-A", "trust", "-U", "postgres"], check=True, capture_output=True, **as_user)
    server = subprocess.Popen([bin_dir / "postgres", "-D", data / "db", "-p", str(port), "-k", data, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              stdout=subprocess.DEVNULL, stderr=open(data / "server.log", "wb"), **as_user)
    try:
        wait_for_port(port, server, "postgres")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        stop(server)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url():
    """A Redis server of its own, nothing saved to disk; its URL."""
    if shutil.which("redis-server") is None:
        pytest.skip("Redis is not installed (apt-get install redis-server)")
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, server, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(server)
