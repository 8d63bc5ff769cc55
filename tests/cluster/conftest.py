"""The cluster's services for its tests: a throwaway PostgreSQL server (coordination, the Dagster
instance) and Redis (the celery broker), each started once per session on a free port of 127.0.0.1
and stopped by its process id at the end; each test gets a database of its own. Without them, or
without the `cluster` extra, the tests fail with the command that installs them: they never skip."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

INSTALL = "apt-get update && apt-get install -y postgresql redis-server"


def postgres_binaries() -> Path:
    """The folder of `initdb` and `postgres`: on the PATH, or where Debian puts them."""
    found = shutil.which("initdb") or max(glob.glob("/usr/lib/postgresql/*/bin/initdb"), default=None)
    if found is None:
        pytest.fail(f"PostgreSQL is not installed: the cluster tests start a throwaway server. Fix: {INSTALL}", pytrace=False)
    return Path(found).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """The URL of the session's server, as the superuser `postgres`."""
    import psycopg

    binaries = postgres_binaries()
    user = "postgres" if os.geteuid() == 0 else None  # PostgreSQL refuses to run as root
    data = Path(tempfile.mkdtemp(prefix="autointerp-postgres-"))
    if user:
        shutil.chown(data, user)
    subprocess.run([binaries / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"], user=user, cwd=data, check=True, capture_output=True)
    port = free_port()
    log = open(data / "server.log", "w")
    server = subprocess.Popen([binaries / "postgres", "-D", data, "-p", str(port), "-k", data, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              user=user, cwd=data, stdout=log, stderr=subprocess.STDOUT)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"PostgreSQL did not start: {(data / 'server.log').read_text()[-2000:]}", pytrace=False)
                time.sleep(0.1)
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown: ends the sessions left open
        server.wait(timeout=60)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture()
def coordination_url(postgres_server):
    """A fresh database on the session's server: what `[settings] coordination_url` names."""
    return fresh_database(postgres_server)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the session's server; its psycopg URL."""
    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return f"{server_url.rsplit('/', 1)[0]}/{name}"


@pytest.fixture()
def postgres_url(postgres_server):
    """A fresh database for a Dagster instance, in the scheme dagster-postgres' SQLAlchemy needs (psycopg2)."""
    return fresh_database(postgres_server).replace("postgresql://", "postgresql+psycopg2://", 1)


def needs_the_cluster_extra() -> None:
    """Fail the calling test module, naming the fix, where the `cluster` extra is not installed."""
    import importlib.util

    missing = [module for module in ("dagster_celery", "dagster_postgres") if importlib.util.find_spec(module) is None]
    if missing:
        pytest.fail(f"the cluster tests need the `cluster` extra ({', '.join(missing)} missing). Fix: pip install -e '.[test,cluster]' (make test does)", pytrace=False)


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
def redis_url():
    """A Redis server of its own, nothing saved to disk; its URL."""
    if shutil.which("redis-server") is None:
        pytest.fail(f"Redis is not installed: the cluster tests start one as the celery broker. Fix: {INSTALL}", pytrace=False)
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, server, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(server)
