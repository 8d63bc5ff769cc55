"""The cluster's services and workers, started and stopped by process id: a throwaway PostgreSQL server
(coordination, the Dagster instance), Redis (the celery broker), `autointerp worker` processes on a
tiny cluster deployment. Shared by the cluster tests' fixtures and `bench/cluster.py`."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from autointerp_defs.deployments import DEPLOYMENTS_DIR
from tests.conftest import TEST_LATENTS_PER_SHARD, TINY_CORPUS_CONFIG, TINY_EXEMPLARS_CONFIG

INSTALL = "apt-get update && apt-get install -y postgresql redis-server iproute2"
NODES_NETWORK = "10.231.0.0/16"
"""The addresses of `network_namespace`s' links and of `service_address`."""
SERVICE_ADDRESS = "10.231.255.1"


class ServiceMissing(RuntimeError):
    """A service's program is not installed; the message names the fix."""


def postgres_binaries() -> Path:
    """The folder of `initdb` and `postgres`: on the PATH, or where Debian puts them."""
    found = shutil.which("initdb") or max(glob.glob("/usr/lib/postgresql/*/bin/initdb"), default=None)
    if found is None:
        raise ServiceMissing(f"PostgreSQL is not installed: the cluster tests start a throwaway server. Fix: {INSTALL}")
    return Path(found).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres_server(also_on: tuple[str, ...] = ()):
    """A throwaway server on a free port; yields its URL on 127.0.0.1, as the superuser `postgres`. `also_on`: more
    addresses of this machine it listens on (`service_address`), open to the nodes of `network_namespace`s."""
    import psycopg

    binaries = postgres_binaries()
    user = "postgres" if os.geteuid() == 0 else None  # PostgreSQL refuses to run as root
    data = Path(tempfile.mkdtemp(prefix="autointerp-postgres-"))
    if user:
        shutil.chown(data, user)
    subprocess.run([binaries / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"], user=user, cwd=data, check=True, capture_output=True)
    if also_on:
        with open(data / "pg_hba.conf", "a") as rules:
            rules.write(f"host all all {NODES_NETWORK} trust\n")
    port = free_port()
    log = open(data / "server.log", "w")
    server = subprocess.Popen([binaries / "postgres", "-D", data, "-p", str(port), "-k", data, "-c", f"listen_addresses={','.join(('127.0.0.1', *also_on))}", "-c", "fsync=off"],
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
                    raise RuntimeError(f"PostgreSQL did not start: {(data / 'server.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown: ends the sessions left open
        server.wait(timeout=60)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the server; its psycopg URL."""
    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return f"{server_url.rsplit('/', 1)[0]}/{name}"


def dagster_postgres_url(database_url: str) -> str:
    """A database's URL in the scheme dagster-postgres' SQLAlchemy needs (psycopg2)."""
    return database_url.replace("postgresql://", "postgresql+psycopg2://", 1)


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
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def redis_server(also_on: tuple[str, ...] = ()):
    """A Redis server of its own on a free port, nothing saved to disk; yields its URL on 127.0.0.1. `also_on`:
    more addresses of this machine it listens on (those of `network_namespace`s' links), open to their nodes."""
    if shutil.which("redis-server") is None:
        raise ServiceMissing(f"Redis is not installed: the cluster tests start one as the celery broker. Fix: {INSTALL}")
    port = free_port()
    reachable = ["--protected-mode", "no"] if also_on else []  # else Redis answers only loopback clients
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", *also_on, *reachable, "--save", "", "--daemonize", "no"],
                              stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, server, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(server)


@contextlib.contextmanager
def network_namespace(subnet: int):
    """A node's network of its own: a network namespace joined to this machine by a veth pair, this end
    10.231.<subnet>.1, the node's 10.231.<subnet>.2. Yields this end's address and the command prefix that
    runs a program in the namespace. The node's every other address goes over its link (so it reaches
    `service_address`). Needs root; removed (with its link) at the end."""
    if shutil.which("ip") is None:
        raise ServiceMissing(f"iproute2's `ip` is not installed: the cluster tests give each worker node a network of its own. Fix: {INSTALL}")
    name, link, here = f"autointerp-node{subnet}", f"ai{subnet}", f"10.231.{subnet}.1"
    inside = ["ip", "netns", "exec", name]
    steps = [["ip", "netns", "add", name], ["ip", "link", "add", f"{link}h", "type", "veth", "peer", "name", f"{link}n"],
             ["ip", "link", "set", f"{link}n", "netns", name], ["ip", "addr", "add", f"{here}/30", "dev", f"{link}h"], ["ip", "link", "set", f"{link}h", "up"],
             [*inside, "ip", "addr", "add", f"10.231.{subnet}.2/30", "dev", f"{link}n"], [*inside, "ip", "link", "set", f"{link}n", "up"],
             [*inside, "ip", "link", "set", "lo", "up"], [*inside, "ip", "route", "add", "default", "via", here]]
    try:
        for step in steps:
            if (done := subprocess.run(step, capture_output=True, text=True)).returncode:
                raise RuntimeError(f"{' '.join(step)} failed: {done.stderr.strip()} (network namespaces need root with CAP_SYS_ADMIN and CAP_NET_ADMIN)")
        yield here, inside
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # takes the node's end of the link, and so both ends, with it
        subprocess.run(["ip", "link", "del", f"{link}h"], capture_output=True)  # where a step failed before the node's end moved in


@contextlib.contextmanager
def service_address():
    """`SERVICE_ADDRESS`, an address of this machine that every `network_namespace` node reaches over its own link
    (its default route) and this machine reaches too: services listening on it have one URL for every node. Needs root."""
    added = subprocess.run(["ip", "addr", "add", f"{SERVICE_ADDRESS}/32", "dev", "lo"], capture_output=True, text=True)
    if added.returncode and "exists" not in added.stderr:
        raise RuntimeError(f"ip addr add {SERVICE_ADDRESS}/32 dev lo failed: {added.stderr.strip()} (needs root with CAP_NET_ADMIN)")
    try:
        yield SERVICE_ADDRESS
    finally:
        if not added.returncode:
            subprocess.run(["ip", "addr", "del", f"{SERVICE_ADDRESS}/32", "dev", "lo"], capture_output=True)


def with_mounted(shared: Path, at: Path) -> list[str]:
    """The command prefix that runs a program with `shared` bind-mounted at `at`, in a mount namespace of its own
    (a node's view of the shared filesystem: this machine's `at` stays as it is). Needs root."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "node", str(shared), str(at)]


def toml_table(name: str, values: dict) -> str:
    def literal(value):
        return str(value).lower() if isinstance(value, bool) else repr(value).replace("'", '"')

    return f"[{name}]\n" + "".join(f"{key} = {literal(value)}\n" for key, value in values.items())


def tiny_cluster_deployment(folder: Path, data_dir: Path, llm_url: str, coordination_url: str | None, max_latents_per_shard: int = 2,
                            latents_per_shard: int = TEST_LATENTS_PER_SHARD, llm_concurrency: int = 2, scorers: tuple[str, ...] = ("detection",),
                            corpus: dict = TINY_CORPUS_CONFIG) -> Path:
    """deployments/cluster.toml on the tests' tiny inputs: the embedded subject model on the CPU, the scripted LLM."""
    text = (DEPLOYMENTS_DIR / "cluster.toml").read_text().split("\n[settings]")[0].replace(
        'automated_scorers = ["detection", "embedding", "fuzzing", "intruder", "simulation", "surprisal"]', f"automated_scorers = {json.dumps(list(scorers))}")
    on_nodes = {"shared_data_root": True, "coordination_url": coordination_url} if coordination_url else {}  # else one machine, files
    tables = {"settings": {"data_dir": str(data_dir), **on_nodes, "max_latents_per_shard": max_latents_per_shard, "latents_per_shard": latents_per_shard},
              "subject_model": {"batch_size": 8}, "llm": {"backend": "openai", "base_url": llm_url, "model": "m", "max_concurrency": llm_concurrency},
              "embedder": {"device": "cpu"}, "corpus": corpus, "exemplars": TINY_EXEMPLARS_CONFIG}
    path = folder / "tiny-cluster.toml"
    path.write_text(text + "\n" + "\n".join(toml_table(name, values) for name, values in tables.items()))
    return path


def cluster_env(repo: Path, dagster_home: Path, deployment_file: Path, postgres_url: str, redis_url: str) -> dict:
    """The environment of every node's process: the instance, the deployment, the broker."""
    return {**os.environ, "PYTHONPATH": str(repo), "DAGSTER_HOME": str(dagster_home), "AUTOINTERP_DEPLOYMENT": str(deployment_file),
            "AUTOINTERP_POSTGRES_URL": postgres_url, "AUTOINTERP_BROKER_URL": redis_url}


def start_worker(queue: str, env: dict, log: Path, concurrency: int | None = None, name: str | None = None, node: list[str] = ()) -> subprocess.Popen:
    """`autointerp worker --queue QUEUE`, its output in `log`; `node`: the command prefix that runs it on a node
    (`network_namespace`, `with_mounted`), each of which execs the next, so the process is the worker's."""
    options = (["--concurrency", str(concurrency)] if concurrency else []) + (["--name", name] if name else [])
    return subprocess.Popen([*node, sys.executable, "-m", "autointerp_defs.cli", "worker", "--queue", queue, *options], env=env, cwd=env["DAGSTER_HOME"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def wait_until_ready(log: Path, worker: subprocess.Popen, timeout_s: float = 600) -> None:
    """Until the worker says it is ready: after it loaded the code (tens of seconds; minutes on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise AssertionError(f"worker exited with {worker.returncode}:\n{log.read_text()[-3000:]}")
        if " ready." in log.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"worker not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")
