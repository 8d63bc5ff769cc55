"""The cluster deployment under the faults a cluster really has (issue 36, line 10).

Starts what the cluster tests start (`tests/cluster/services.py`), as root inside network namespaces it
makes (the services in one, each of two `llm` worker nodes in its own; nothing on this machine's own
network), with passwords on PostgreSQL and Redis (Redis keeps an append-only file, as a real broker would,
so a restart keeps its queues). Prepares once, as `bench/cluster.py` does (its `--data`, kept): a TopK
SAE of width 6,144 on the tiny subject model, its corpus, activations and the exemplars of `--shards`
shards. Then per round, on a fresh copy of the prepared root with fresh databases: the explanations of
every shard as ranged runs of one shard each (`bench/cluster.py --run-range`), launched at once, their
steps asked of a scripted endpoint that answers after `--latency` s. The first round has no fault: its
tables are the reference. Each other round injects one fault once a quarter of the reference's requests
were asked:

- `worker`: SIGKILL the pool process of a busy worker (as the OOM killer would);
- `postgres`: restart PostgreSQL (fast shutdown, the same data and port): every session ends;
- `redis`: restart Redis: the broker's connections end, its queues survive;
- `lock_sessions`: end every session on the coordination database (`pg_terminate_backend`): locks,
  endpoint slots and the response cache lose their sessions, as when a node's connection drops.

A run that fails is reported with its error (last lines of its log) and launched again once, as an
operator or a retry policy would; a run that neither ends nor fails within `--timeout` s is stopped and
counted as hung. Then every table of the round is compared with the reference. Last line JSON:
`faults` (per fault: runs failed and their errors, runs hung, identical, lost_rows), `identical`
(every round), `lost_rows` (reference rows missing from any round).

    .venv/bin/python bench/cluster_faults.py                       # every fault, 2 shards
    .venv/bin/python bench/cluster_faults.py --faults worker redis # some of them
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dagster import DagsterInstance  # noqa: E402

from assets.partitions import shard_partition_keys  # noqa: E402
from autointerp_defs.instance import POSTGRES_ENV, write_instance  # noqa: E402
from resources.settings import adopt_root  # noqa: E402
from storage.layout import DataRoot  # noqa: E402
from storage.store import TableStore  # noqa: E402
from tests.cluster.services import (  # noqa: E402
    SERVICE_ADDRESS,
    ClusterNetwork,
    cluster_env,
    cluster_network,
    dagster_postgres_url,
    fresh_database,
    joined,
    postgres_server,
    redis_server,
    start_worker,
    stop,
    tiny_cluster_deployment,
    wait_until_ready,
)
from tests.conftest import TINY_CODER  # noqa: E402
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "bench_cluster", Path(__file__).with_name("cluster.py")
)
bench_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_cluster)

FAULTS = ("worker", "postgres", "redis", "lock_sessions")
WORKERS = 2
CONCURRENCY = 2
ENDPOINT_LIMIT = 8


@contextlib.contextmanager
def services(latency_s: float):
    """(PostgreSQL, Redis, the scripted endpoint, each node's command prefix, the launcher's prefix): in namespaces of
    their own as root, else on 127.0.0.1 of this machine."""
    with contextlib.ExitStack() as stack:
        network = stack.enter_context(cluster_network(WORKERS)) if os.geteuid() == 0 else None
        postgres = stack.enter_context(postgres_server(network.services if network else None))
        redis = stack.enter_context(
            redis_server(network.services if network else None, persistent=True)
        )
        if network:
            with joined(network.services):
                server = ScriptedLLMServer(
                    answer_by_prompt, delay_s=latency_s, host=SERVICE_ADDRESS
                )
        else:
            server = ScriptedLLMServer(answer_by_prompt, delay_s=latency_s)
        stack.enter_context(server)
        nodes = (
            [ClusterNetwork.prefix(node) for node in network.nodes] if network else [[]] * WORKERS
        )
        yield (
            postgres,
            redis,
            server,
            nodes,
            ClusterNetwork.prefix(network.services) if network else [],
        )


def inject(fault: str, postgres, redis, coordination, workers: list[subprocess.Popen]) -> str:
    """Do `fault` now; what was done."""
    import psutil
    import psycopg

    if fault == "worker":
        pool = psutil.Process(
            workers[0].pid
        ).children()  # `ip netns exec` execs the worker: its children are its pool processes
        for process in pool:
            process.kill()
        return f"SIGKILL {len(pool)} pool processes of worker llm0"
    if fault == "postgres":
        postgres.daemon.restart()
        return "PostgreSQL restarted"
    if fault == "redis":
        redis.daemon.restart()
        return "Redis restarted"
    with psycopg.connect(coordination.url, autocommit=True) as db:
        ended = db.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    return f"{ended} coordination sessions ended"


def first_error(log: str) -> str:
    """The error a failed run's log names (its exception's line, the project's before Dagster's
    wrappers), else its last lines."""
    named = sorted(
        (
            line.strip()
            for line in log.splitlines()
            if re.match(r"\s*[\w.]*(Error|Lost|Exception)\b.*: ", line)
        ),
        key=lambda line: line.startswith("dagster"),
    )
    return named[0][:400] if named else log[-400:]


def slug(key: str) -> str:
    """A partition key as a file name."""
    return key.replace("|", "_").replace("/", "_")


def tables(root: Path, keys: list[str]) -> dict[str, pd.DataFrame]:
    store = TableStore.at(root)
    return {
        key: store.explanations(*key.split("|")).read()
        for key in keys
        if DataRoot.at(root).explanations_path(*key.split("|")).exists()
    }


def one_round(
    fault: str | None, args, keys: list[str], reference_requests: int, scratch: Path, services_
) -> dict:
    """The explanations of `keys` on the cluster, `fault` injected once a quarter of `reference_requests` were asked."""
    postgres, redis, server, nodes, launcher = services_
    name = fault or "none"
    home, root, logs = (scratch / f"{part}-{name}" for part in ("dagster_home", "root", "logs"))
    shutil.copytree(args.data / "inputs", root)
    home.mkdir()
    logs.mkdir()
    coordination, instance_database = fresh_database(postgres), fresh_database(postgres)
    deployment = tiny_cluster_deployment(
        home,
        root,
        server.base_url,
        coordination.nodes_url,
        max_latents_per_shard=args.latents,
        latents_per_shard=bench_cluster.LATENTS_PER_SHARD,
        llm_concurrency=ENDPOINT_LIMIT,
        corpus=bench_cluster.CORPUS,
    )
    os.environ[POSTGRES_ENV] = dagster_postgres_url(
        instance_database.url
    )  # this process's instance, over the Unix socket as root
    env = cluster_env(
        ROOT, home, deployment, dagster_postgres_url(instance_database.nodes_url), redis.nodes_url
    )
    write_instance(home, max_runs=len(keys), llm_runs=len(keys), gpus=1)
    instance = DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions(
        "shard",
        shard_partition_keys(TINY_CODER, bench_cluster.WIDTH, bench_cluster.LATENTS_PER_SHARD),
    )
    adopt_root(instance, DataRoot.at(root), coordination.url)
    workers = [
        start_worker("llm", env, logs / f"llm{i}.log", CONCURRENCY, f"llm{i}@%h", node=nodes[i])
        for i in range(WORKERS)
    ]
    runs, failed, hung, done, errors, ended = {}, [], [], None, {}, {}

    def launch(key: str, attempt: int) -> subprocess.Popen:
        log = logs / f"run-{slug(key)}-{attempt}.log"
        return subprocess.Popen(
            [
                *launcher,
                sys.executable,
                str(Path(__file__).with_name("cluster.py")),
                "--run-range",
                key,
                key,
            ],
            env=env,
            cwd=home,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )

    def outcome(run: subprocess.Popen, started: float) -> int | None:
        """The run's exit code; None where it neither ended nor failed within `--timeout` s of its launch (stopped)."""
        try:
            return run.wait(timeout=max(1.0, started + args.timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop(run)
            return None

    try:
        for i, worker in enumerate(workers):
            wait_until_ready(logs / f"llm{i}.log", worker)
        asked, launched = len(server.requests), time.monotonic()
        runs = {key: launch(key, 0) for key in keys}
        if fault:
            while (
                len(server.requests) - asked < reference_requests // 4
                and time.monotonic() < launched + args.timeout
                and any(r.poll() is None for r in runs.values())
            ):
                time.sleep(0.05)
            done = inject(fault, postgres, redis, coordination, workers)
        for key, run in runs.items():
            ended[key] = outcome(run, launched)
            if ended[key] != 0:
                (hung if ended[key] is None else failed).append(key)
                errors[key] = first_error(
                    (logs / f"run-{slug(key)}-0.log").read_text(errors="replace")
                )
                runs[key] = launch(key, 1)  # once, as an operator or a retry policy would
                ended[key] = outcome(runs[key], time.monotonic())
        still_failing = [key for key, code in ended.items() if code != 0]
    finally:
        for process in [*runs.values(), *workers]:
            stop(process)
    return {
        "fault": name,
        "injected": done,
        "requests": len(server.requests) - asked,
        "runs_failed": failed,
        "errors": errors,
        "runs_hung": hung,
        "still_failing": still_failing,
        "tables": tables(root, keys),
    }


def compare(reference: dict[str, pd.DataFrame], found: dict[str, pd.DataFrame]) -> tuple[bool, int]:
    """Whether every reference table is found equal, and how many reference rows were not reproduced (missing, or
    with another value in any column: a latent stored as failed where the reference explained it)."""
    same, lost = True, 0
    for key, table in reference.items():
        other = found.get(key)
        if other is None:
            same, lost = False, lost + len(table)
            continue
        if table.equals(other):
            continue
        same = False
        mine = {tuple(map(repr, row)) for row in table.itertuples(index=False)}
        theirs = {tuple(map(repr, row)) for row in other.itertuples(index=False)}
        lost += len(mine - theirs)
    return same, lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bench-cluster",
        help="where the prepared inputs are kept (bench/cluster.py's)",
    )
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument(
        "--latents",
        type=int,
        default=48,
        help="[settings] max_latents_per_shard: explained latents per shard",
    )
    parser.add_argument(
        "--latency", type=float, default=0.3, help="seconds the scripted endpoint takes per answer"
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds a run may take before it counts as hung"
    )
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    args = parser.parse_args()
    keys = shard_partition_keys(TINY_CODER, bench_cluster.WIDTH, bench_cluster.LATENTS_PER_SHARD)[
        : args.shards
    ]
    bench_cluster.prepare(args.data / "inputs", keys)
    rounds = []
    with tempfile.TemporaryDirectory() as scratch, services(args.latency) as services_:
        reference = one_round(None, args, keys, 0, Path(scratch), services_)
        print(
            json.dumps({k: v for k, v in reference.items() if k != "tables"}),
            file=sys.stderr,
            flush=True,
        )
        if reference["runs_failed"] or reference["still_failing"] or not reference["tables"]:
            raise SystemExit(f"the fault-free round failed: {reference['errors']}")
        for fault in args.faults:
            found = one_round(fault, args, keys, reference["requests"], Path(scratch), services_)
            found["identical"], found["lost_rows"] = compare(
                reference["tables"], found.pop("tables")
            )
            rounds.append(found)
            print(json.dumps(found), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "machine": f"{os.cpu_count()} CPU cores",
                "shards": args.shards,
                "latents_per_shard": args.latents,
                "latency_s": args.latency,
                "reference_requests": reference["requests"],
                "faults": rounds,
                "identical": all(r["identical"] for r in rounds),
                "lost_rows": sum(r["lost_rows"] for r in rounds),
            }
        )
    )


if __name__ == "__main__":
    main()
