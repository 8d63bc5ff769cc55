"""The cluster's services and workers, started and stopped by process id: a throwaway PostgreSQL server
(coordination, the Dagster instance), Redis (the celery broker), `autointerp worker` processes on a
tiny cluster deployment. Shared by the cluster tests' fixtures and `bench/cluster.py`.

Every server asks for a password (PostgreSQL scram-sha-256, Redis `requirepass` with protected mode on),
and listens either on 127.0.0.1 of this machine or, in `cluster_network`, on an address inside a network
namespace the test made: the machine's own (root) namespace never gets an address, route or link."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from autointerp_defs.deployments import DEPLOYMENTS_DIR
from tests.conftest import TEST_LATENTS_PER_SHARD, TINY_CORPUS_CONFIG, TINY_EXEMPLARS_CONFIG

INSTALL = "apt-get update && apt-get install -y postgresql redis-server iproute2"
NODES_NETWORK = "10.231.0.0/16"
"""The addresses inside a `cluster_network`'s namespaces (never on this machine's own network)."""
SERVICE_ADDRESS = "10.231.255.1"
"""The services' address inside their namespace, which every node of the network reaches over its own link."""
CLONE_NEWNET = 0x40000000


class ServiceMissing(RuntimeError):
    """A service's program is not installed; the message names the fix."""


class Daemon:
    """A server process started and stopped by its PID, which can be restarted on the same data and port (the
    faults of `bench/cluster_faults.py`)."""

    def __init__(
        self, what: str, command: list, ready, log: Path, stop_signal: int = signal.SIGTERM
    ):
        self.what, self.command, self.ready, self.log, self.stop_signal = (
            what,
            command,
            ready,
            log,
            stop_signal,
        )
        self.start()

    def start(self, timeout_s: float = 60) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, cwd=self.log.parent
            )
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.what} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclasses.dataclass(frozen=True)
class Service:
    """A server's URL for this process, and for the nodes of a `cluster_network` (the same where it has none)."""

    url: str
    nodes_url: str
    daemon: Daemon | None = dataclasses.field(default=None, compare=False, repr=False)

    def database(self, name: str) -> Service:
        """The same server, another database (PostgreSQL) or db number (Redis)."""
        return Service(
            *(
                urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
                for url in (self.url, self.nodes_url)
            ),
            self.daemon,
        )


@dataclasses.dataclass(frozen=True)
class ClusterNetwork:
    """Network namespaces made by a test: `services` (PostgreSQL, Redis, the scripted endpoint, the processes that
    launch runs) and one per node, each node joined to the services' namespace by a veth pair whose both ends are
    inside the test's namespaces. Each field's value is the namespace's name."""

    services: str
    nodes: tuple[str, ...]

    @staticmethod
    def prefix(namespace: str) -> list[str]:
        """The command prefix that runs a program in `namespace` (`ip netns exec` execs it: the PID
        is the program's)."""
        return ["ip", "netns", "exec", namespace]


def postgres_binaries() -> Path:
    """The folder of `initdb` and `postgres`: on the PATH, or where Debian puts them."""
    found = shutil.which("initdb") or max(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), default=None
    )
    if found is None:
        raise ServiceMissing(
            f"PostgreSQL is not installed: the cluster tests start a throwaway server. Fix: {INSTALL}"
        )
    return Path(found).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def as_user(user: str | None) -> list[str]:
    """The command prefix that runs a program as `user` (PostgreSQL refuses root), execing it so its PID stays."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"] if user else []


@contextlib.contextmanager
def postgres_server(namespace: str | None = None):
    """A throwaway server, superuser `postgres` with a random password (scram-sha-256 on every connection). Without
    `namespace` it listens on 127.0.0.1 of this machine; with it, on `SERVICE_ADDRESS` inside that namespace (open to
    `NODES_NETWORK`), and this process connects over its Unix socket. Yields a `Service`."""
    import psycopg

    binaries = postgres_binaries()
    user = "postgres" if os.geteuid() == 0 else None  # PostgreSQL refuses to run as root
    data = Path(tempfile.mkdtemp(prefix="autointerp-postgres-"))
    password = secrets.token_hex(16)
    (data / "pwfile").write_text(password + "\n")
    if user:
        shutil.chown(data, user)
        shutil.chown(data / "pwfile", user)
    subprocess.run(
        [
            binaries / "initdb",
            "-D",
            data / "db",
            "-U",
            "postgres",
            "-A",
            "scram-sha-256",
            f"--pwfile={data / 'pwfile'}",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        user=user,
        cwd=data,
        check=True,
        capture_output=True,
    )
    port = free_port()
    if namespace:
        with open(data / "db" / "pg_hba.conf", "a") as rules:
            rules.write(f"host all all {NODES_NETWORK} scram-sha-256\n")
        listen = SERVICE_ADDRESS
        here = f"postgresql://postgres:{password}@/postgres?host={data}&port={port}"
        nodes = f"postgresql://postgres:{password}@{SERVICE_ADDRESS}:{port}/postgres"
    else:
        listen = "127.0.0.1"
        here = nodes = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"
    command = [
        binaries / "postgres",
        "-D",
        data / "db",
        "-p",
        str(port),
        "-k",
        data,
        "-c",
        f"listen_addresses={listen}",
        "-c",
        "fsync=off",
    ]

    def ready() -> bool:
        try:
            psycopg.connect(here, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    daemon = Daemon(
        "PostgreSQL",
        [*(ClusterNetwork.prefix(namespace) if namespace else []), *as_user(user), *command],
        ready,
        data / "server.log",
        stop_signal=signal.SIGINT,
    )  # fast shutdown: ends the sessions left open
    try:
        yield Service(here, nodes, daemon)
    finally:
        daemon.stop()
        shutil.rmtree(data, ignore_errors=True)


def fresh_database(server: str | Service) -> str | Service:
    """A new, empty database on the server: its URL (a `Service` for a `Service`)."""
    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(getattr(server, "url", server), autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    if isinstance(server, Service):
        return server.database(name)
    return urlunsplit(urlsplit(server)._replace(path=f"/{name}"))


def dagster_postgres_url(database_url: str) -> str:
    """A database's URL in the scheme dagster-postgres' SQLAlchemy needs (psycopg2)."""
    return database_url.replace("postgresql://", "postgresql+psycopg2://", 1)


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
def redis_server(namespace: str | None = None, persistent: bool = False):
    """A Redis server of its own, `requirepass` set and protected mode on, nothing saved to disk unless `persistent`
    (an append-only file, so a restart keeps the queues). Without `namespace` it listens on 127.0.0.1 of this
    machine; with it, on `SERVICE_ADDRESS` inside that namespace, and this process connects over its Unix socket.
    Yields a `Service` (database 0)."""
    if shutil.which("redis-server") is None:
        raise ServiceMissing(
            f"Redis is not installed: the cluster tests start one as the celery broker. Fix: {INSTALL}"
        )
    port, password = free_port(), secrets.token_hex(16)
    folder = Path(tempfile.mkdtemp(prefix="autointerp-redis-"))
    unix = folder / "redis.sock"
    saving = (
        ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
    )
    options = [
        "--port",
        str(port),
        "--bind",
        SERVICE_ADDRESS if namespace else "127.0.0.1",
        "--protected-mode",
        "yes",
        "--requirepass",
        password,
        "--unixsocket",
        str(unix),
        "--unixsocketperm",
        "700",
        "--save",
        "",
        *saving,
        "--daemonize",
        "no",
        "--dir",
        str(folder),
    ]

    def ready() -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(unix))
            return True
        except OSError:
            return False

    daemon = Daemon(
        "redis-server",
        [*(ClusterNetwork.prefix(namespace) if namespace else []), "redis-server", *options],
        ready,
        folder / "server.log",
    )
    try:
        here = (
            f"redis+socket://:{password}@{unix}?virtual_host=0"
            if namespace
            else f"redis://:{password}@127.0.0.1:{port}/0"
        )
        yield Service(
            here,
            f"redis://:{password}@{SERVICE_ADDRESS if namespace else '127.0.0.1'}:{port}/0",
            daemon,
        )
    finally:
        daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)


def run_ip(*steps: list[str]) -> None:
    for step in steps:
        if (done := subprocess.run(["ip", *step], capture_output=True, text=True)).returncode:
            raise RuntimeError(
                f"ip {' '.join(step)} failed: {done.stderr.strip()} "
                "(network namespaces need root with CAP_SYS_ADMIN and CAP_NET_ADMIN)"
            )


@contextlib.contextmanager
def cluster_network(nodes: int):
    """A network of the test's own: a namespace for the services, with `SERVICE_ADDRESS` on its loopback, and one
    per node, joined to the services' namespace by a veth pair (10.231.<i>.1 there, 10.231.<i>.2 on node i, the
    node's default route through it). Every link and address is created inside these namespaces, none in this
    machine's own; all are removed with them at the end. Yields a `ClusterNetwork`. Needs root."""
    if shutil.which("ip") is None:
        raise ServiceMissing(
            "iproute2's `ip` is not installed: the cluster tests give each worker node a network "
            f"of its own. Fix: {INSTALL}"
        )
    tag = uuid.uuid4().hex[:8]
    network = ClusterNetwork(
        f"autointerp-services-{tag}",
        tuple(f"autointerp-node{i}-{tag}" for i in range(1, nodes + 1)),
    )
    made = []
    try:
        # One `ip netns add` at a time on this machine: the first after boot makes /run/netns a mount point, and two
        # at once (pytest-xdist's workers) can stack two such mounts, hiding the first one's namespace.
        with open(Path(tempfile.gettempdir()) / "autointerp-netns-add.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for namespace in (network.services, *network.nodes):
                run_ip(["netns", "add", namespace])
                made.append(namespace)
                run_ip(["-n", namespace, "link", "set", "lo", "up"])
        run_ip(
            [
                "netns",
                "exec",
                network.services,
                "ip",
                "addr",
                "add",
                f"{SERVICE_ADDRESS}/32",
                "dev",
                "lo",
            ]
        )
        for i, node in enumerate(network.nodes, start=1):
            run_ip(
                [
                    "-n",
                    network.services,
                    "link",
                    "add",
                    f"node{i}",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "uplink",
                    "netns",
                    node,
                ],
                [
                    "netns",
                    "exec",
                    network.services,
                    "ip",
                    "addr",
                    "add",
                    f"10.231.{i}.1/30",
                    "dev",
                    f"node{i}",
                ],
                ["-n", network.services, "link", "set", f"node{i}", "up"],
                ["netns", "exec", node, "ip", "addr", "add", f"10.231.{i}.2/30", "dev", "uplink"],
                ["-n", node, "link", "set", "uplink", "up"],
                ["netns", "exec", node, "ip", "route", "add", "default", "via", f"10.231.{i}.1"],
            )
        yield network
    finally:
        for namespace in made:
            subprocess.run(
                ["ip", "netns", "del", namespace], capture_output=True
            )  # takes its links with it


@contextlib.contextmanager
def joined(namespace: str):
    """This thread inside `namespace`'s network while the block runs (a socket made here stays there), then back."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as own, open(f"/run/netns/{namespace}") as other:
        if libc.setns(other.fileno(), CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns into {namespace} failed")
        try:
            yield
        finally:
            if libc.setns(own.fileno(), CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back to this process's network failed")


def with_mounted(shared: Path, at: Path) -> list[str]:
    """The command prefix that runs a program with `shared` bind-mounted at `at`, in a mount namespace of its own
    (a node's view of the shared filesystem: this machine's `at` stays as it is). Needs root."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        'mount --bind "$1" "$2" && shift 2 && exec "$@"',
        "node",
        str(shared),
        str(at),
    ]


def toml_table(name: str, values: dict) -> str:
    def literal(value):
        return str(value).lower() if isinstance(value, bool) else repr(value).replace("'", '"')

    return f"[{name}]\n" + "".join(f"{key} = {literal(value)}\n" for key, value in values.items())


def tiny_cluster_deployment(
    folder: Path,
    data_dir: Path,
    llm_url: str,
    coordination_url: str | None,
    max_latents_per_shard: int = 2,
    latents_per_shard: int = TEST_LATENTS_PER_SHARD,
    llm_concurrency: int = 2,
    scorers: tuple[str, ...] = ("detection",),
    corpus: dict = TINY_CORPUS_CONFIG,
) -> Path:
    """deployments/cluster.toml on the tests' tiny inputs: the embedded subject model on the CPU, the scripted LLM."""
    text = (
        (DEPLOYMENTS_DIR / "cluster.toml")
        .read_text()
        .split("\n[settings]")[0]
        .replace(
            'automated_scorers = ["detection", "embedding", "fuzzing", "intruder", "simulation", "surprisal"]',
            f"automated_scorers = {json.dumps(list(scorers))}",
        )
    )
    on_nodes = (
        {"shared_data_root": True, "coordination_url": coordination_url} if coordination_url else {}
    )  # else one machine, files
    tables = {
        "settings": {
            "data_dir": str(data_dir),
            **on_nodes,
            "max_latents_per_shard": max_latents_per_shard,
            "latents_per_shard": latents_per_shard,
        },
        "subject_model": {"batch_size": 8},
        "llm": {
            "backend": "openai",
            "base_url": llm_url,
            "model": "m",
            "max_concurrency": llm_concurrency,
        },
        "embedder": {"device": "cpu"},
        "corpus": corpus,
        "exemplars": TINY_EXEMPLARS_CONFIG,
    }
    path = folder / "tiny-cluster.toml"
    path.write_text(
        text + "\n" + "\n".join(toml_table(name, values) for name, values in tables.items())
    )
    return path


def cluster_env(
    repo: Path, dagster_home: Path, deployment_file: Path, postgres_url: str, redis_url: str
) -> dict:
    """The environment of every node's process: the instance, the deployment, the broker."""
    return {
        **os.environ,
        "PYTHONPATH": str(repo),
        "DAGSTER_HOME": str(dagster_home),
        "AUTOINTERP_DEPLOYMENT": str(deployment_file),
        "AUTOINTERP_POSTGRES_URL": postgres_url,
        "AUTOINTERP_BROKER_URL": redis_url,
    }


def start_worker(
    queue: str,
    env: dict,
    log: Path,
    concurrency: int | None = None,
    name: str | None = None,
    node: list[str] = (),
) -> subprocess.Popen:
    """`autointerp worker --queue QUEUE`, its output in `log`; `node`: the command prefix that runs it on a node
    (`network_namespace`, `with_mounted`), each of which execs the next, so the process is the worker's."""
    options = (["--concurrency", str(concurrency)] if concurrency else []) + (
        ["--name", name] if name else []
    )
    return subprocess.Popen(
        [*node, sys.executable, "-m", "autointerp_defs.cli", "worker", "--queue", queue, *options],
        env=env,
        cwd=env["DAGSTER_HOME"],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


def wait_until_ready(log: Path, worker: subprocess.Popen, timeout_s: float = 600) -> None:
    """Until the worker says it is ready: after it loaded the code (tens of seconds; minutes on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise AssertionError(
                f"worker exited with {worker.returncode}:\n{log.read_text()[-3000:]}"
            )
        if " ready." in log.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"worker not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")
