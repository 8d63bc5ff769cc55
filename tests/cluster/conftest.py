"""A throwaway PostgreSQL server for the tests of a cluster deployment's coordination
(`storage/coordination.py`): started once per session on a free port of 127.0.0.1 with trust
authentication, stopped by its process id at the end; each test gets a database of its own. Without
PostgreSQL the tests fail with the command that installs it: they never skip."""
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

INSTALL = "apt-get update && apt-get install -y postgresql"


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
    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server.rsplit('/', 1)[0]}/{name}"
