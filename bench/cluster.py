"""The cluster deployment's LLM stage on 1, 2 and 4 LLM workers (issue 26, line 6).

Starts what the cluster tests start (`tests/cluster/services.py`): a throwaway PostgreSQL server
(the Dagster instance and the coordination database, a fresh one of each per round) and Redis (the
celery broker), and a scripted OpenAI-compatible endpoint in this process that answers each request
after `--latency` s; stops them all at the end. Prepares once, on one machine without Dagster's
cluster (in `--data`, kept between runs; untimed): a TopK SAE of width 16 x 384 = 6,144 trained on
the tiny subject model's layer 3, a 24,576-token corpus, its activations, and the exemplars of the
first `--shards` shards of 384 latents (about 280 explainable each, so about 280 requests a shard; a
default shard holds about 9,000 requests of explanations and scorers, README: shard size).
Then per round (1, 2 and 4 `autointerp worker --queue llm` processes of `--concurrency` steps each,
on a fresh copy of the prepared root): the explanations of every shard as ranged runs of
`--shards-per-run` shards (what a backfill under `[settings] partitions_per_run = 4`, the cluster
deployment's, launches), all launched at once, each run its own process whose step goes through
Redis to a worker; `[llm] max_concurrency = 32` is the endpoint's limit, shared by every worker
through the coordination database.

Per round: how long the workers took to be ready (loading the code), wall time (first launch to last
run done), runs, requests, the endpoint's peak in flight, per-step overhead (the step's wall minus
its time asking the LLM: from each shard's "explaining N latents" log to its "explanations: N/N
done" log; the rest is resources, reading inputs, writing the tables, the search vectors), when the
first and the last step started after the launch (each run's own process loading the code first),
the coordination queries per request (transactions on the coordination database: cache lookups and
writes, endpoint slots), the load average (1 min) at the start and end, the endpoint's in-flight
utilisation (mean in flight / 32 from the first request on, sampled every 50 ms: less sensitive to the
machine's load than the wall) with the seconds at half or none in flight (`--timeline` writes them per
second, and the runs' events), and the ratio to the ideal:
ideal / wall, ideal = requests x latency / 32. Prints a JSON object as its last line with
`ratio_to_ideal_4_workers` (target >= 0.8).

    .venv/bin/python bench/cluster.py                               # the full bench: 16 shards, 1, 2 and 4 workers
    .venv/bin/python bench/cluster.py --shards 4 --shards-per-run 1 --workers 1 2   # quick: 4 runs of 1 shard
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dagster import AssetKey, DagsterEventType, DagsterInstance, execute_job, materialize  # noqa: E402
from dagster._core.definitions.reconstruct import ReconstructableRepository  # noqa: E402

from assets.partitions import shard_partition_keys  # noqa: E402
from autointerp_defs.definitions import definitions_for  # noqa: E402
from autointerp_defs.deployments import load_deployment  # noqa: E402
from autointerp_defs.instance import POSTGRES_ENV, write_instance  # noqa: E402
from resources.settings import adopt_root  # noqa: E402
from resources.sparse_coders import save_sparsify  # noqa: E402
from resources.subject_model import SubjectModelResource  # noqa: E402
from storage.layout import DataRoot  # noqa: E402
from tests.cluster.services import (  # noqa: E402
    cluster_env,
    dagster_postgres_url,
    fresh_database,
    postgres_server,
    redis_server,
    start_worker,
    stop,
    tiny_cluster_deployment,
    wait_until_ready,
)
from tests.conftest import TINY_CODER, TINY_CORPUS_CONFIG, TINY_HOOKPOINT, train_tiny_sae  # noqa: E402
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt  # noqa: E402

LATENTS_PER_SHARD = 384
WIDTH = 16 * LATENTS_PER_SHARD
CORPUS = {**TINY_CORPUS_CONFIG, "n_tokens": 64 * 384}
"""Enough text that nearly every latent has the windows to be explained (the tests' tiny corpus has 3,072 tokens)."""
ENDPOINT_LIMIT = 32
RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")
"""Dagster's tags of a ranged run, as its backfill daemon sets them."""


def prepare(inputs: Path, keys: list[str]) -> None:
    """The wide SAE, registered; corpus and activations (once), and the exemplars of every shard
    in `keys` not made yet."""
    deployment = (
        tiny_cluster_deployment(
            inputs,
            inputs,
            "http://127.0.0.1:9/v1",
            None,
            latents_per_shard=LATENTS_PER_SHARD,
            corpus=CORPUS,
        )
        if (inputs / "coder.json").exists()
        else None
    )
    if deployment is None:
        shutil.rmtree(inputs, ignore_errors=True)
        inputs.mkdir(parents=True)
        deployment = tiny_cluster_deployment(
            inputs,
            inputs,
            "http://127.0.0.1:9/v1",
            None,
            latents_per_shard=LATENTS_PER_SHARD,
            corpus=CORPUS,
        )
        save_sparsify(
            train_tiny_sae(
                SubjectModelResource(batch_size=8), width=WIDTH, n_tokens=CORPUS["n_tokens"]
            ),
            inputs / "registry" / "tiny-topk" / TINY_HOOKPOINT,
        )
    single = definitions_for(load_deployment(str(deployment)))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(
        "shard", shard_partition_keys(TINY_CODER, WIDTH, LATENTS_PER_SHARD)
    )
    assets, root = list(single.assets), DataRoot.at(inputs)
    if not (inputs / "coder.json").exists():
        materialize(assets, selection=["corpus"], resources=single.resources, instance=instance)
        materialize(
            assets,
            selection=["activations"],
            partition_key=keys[0],
            resources=single.resources,
            instance=instance,
        )
        (inputs / "coder.json").write_text(
            json.dumps({"coder": TINY_CODER, "width": WIDTH, "corpus": CORPUS})
        )
    for key in keys:
        if not root.exemplars_path(*key.split("|")).exists():
            print(f"preparing the exemplars of {key}", file=sys.stderr, flush=True)
            materialize(
                assets,
                selection=["exemplars"],
                partition_key=key,
                resources=single.resources,
                instance=instance,
            )


def run_range(first: str, last: str) -> None:
    """One run of the explanations of shards `first` to `last`, as the backfill daemon launches one under
    `partitions_per_run` (Dagster's range tags) and as `dagster asset materialize` executes one: in this
    process, loading the code, its step sent to a worker by the celery executor."""
    repository = ReconstructableRepository.for_module("autointerp_defs", "defs")
    job = repository.get_definition().get_implicit_job_def_for_assets([AssetKey("explanations")])
    with DagsterInstance.get() as instance:
        result = execute_job(
            repository.get_reconstructable_job(job.name),
            instance,
            asset_selection=[AssetKey("explanations")],
            tags=dict(zip(RANGE_TAGS, (first, last), strict=False)),
        )
    sys.exit(0 if result.success else 1)


DONE = re.compile(r"explanations: (\d+)/(\d+) done")


def step_times(instance: DagsterInstance) -> list[dict]:
    """Per explanations step: its start, its wall (start to success), its shards and its LLM time (for each shard,
    from its "explaining N latents" log to its last progress log)."""
    steps = []
    for run in instance.get_runs():
        records = instance.all_logs(run.run_id)
        started = [
            r.timestamp
            for r in records
            if r.dagster_event and r.dagster_event.event_type == DagsterEventType.STEP_START
        ]
        ended = [
            r.timestamp
            for r in records
            if r.dagster_event and r.dagster_event.event_type == DagsterEventType.STEP_SUCCESS
        ]
        llm_s, shards, asking = 0.0, 0, None
        for record in records:
            if record.user_message.startswith("explaining "):
                asking, shards = record.timestamp, shards + 1
            elif (
                (done := DONE.match(record.user_message))
                and done[1] == done[2]
                and asking is not None
            ):
                llm_s, asking = llm_s + record.timestamp - asking, None
        if started and ended and shards:
            steps.append(
                {
                    "started": started[0],
                    "wall_s": ended[-1] - started[0],
                    "llm_s": llm_s,
                    "shards": shards,
                }
            )
    return steps


class InFlight:
    """The endpoint's requests in flight, sampled every `every_s` on a thread while in a `with`:
    how much of the endpoint's limit the round kept busy (less sensitive to the machine's CPU load
    than the wall time)."""

    def __init__(self, server: ScriptedLLMServer, every_s: float = 0.05):
        self.server, self.every_s, self.samples, self._stop = server, every_s, [], threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append((time.monotonic(), self.server.in_flight))

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self, limit: int) -> dict:
        """Mean in flight over the limit, and the seconds at or under half of it and at none (from
        the first request on)."""
        counts = [n for _, n in self.samples]
        first = next((i for i, n in enumerate(counts) if n), len(counts))
        asking = counts[first:]
        return {
            "in_flight_utilisation": round(statistics.fmean(asking) / limit, 3) if asking else 0.0,
            "s_before_first_request": round(first * self.every_s, 1),
            "s_at_most_half_in_flight": round(
                sum(n <= limit // 2 for n in asking) * self.every_s, 1
            ),
            "s_none_in_flight": round(sum(n == 0 for n in asking) * self.every_s, 1),
        }

    def timeline(self, path: Path) -> None:
        """Per second from the first sample: the mean in flight (to see where the endpoint idled)."""
        start, seconds = self.samples[0][0] if self.samples else 0.0, {}
        for at, n in self.samples:
            seconds.setdefault(int(at - start), []).append(n)
        path.write_text(
            "".join(f"{s} {statistics.fmean(ns):.1f}\n" for s, ns in sorted(seconds.items()))
        )


def transactions(database_url: str) -> int:
    """Transactions committed on a database so far (each autocommit query is one)."""
    import psycopg

    with psycopg.connect(database_url) as db:
        return db.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]


def one_round(
    workers: int,
    args,
    inputs: Path,
    keys: list[str],
    postgres: str,
    redis: str,
    server: ScriptedLLMServer,
    scratch: Path,
) -> dict:
    """The explanations of every shard as ranged runs of `args.shards_per_run` shards, on `workers` LLM workers."""
    home, root, logs = (scratch / f"{name}-{workers}" for name in ("dagster_home", "root", "logs"))
    shutil.copytree(inputs, root)
    home.mkdir()
    logs.mkdir()
    coordination = fresh_database(postgres)
    deployment = tiny_cluster_deployment(
        home,
        root,
        server.base_url,
        coordination,
        max_latents_per_shard=args.latents,
        latents_per_shard=LATENTS_PER_SHARD,
        llm_concurrency=ENDPOINT_LIMIT,
        corpus=CORPUS,
    )
    instance_url = dagster_postgres_url(fresh_database(postgres))
    os.environ[POSTGRES_ENV] = (
        instance_url  # what the instance's dagster.yaml reads in this process too
    )
    env = cluster_env(ROOT, home, deployment, instance_url, redis)
    ranges = [keys[i : i + args.shards_per_run] for i in range(0, len(keys), args.shards_per_run)]
    write_instance(home, max_runs=len(ranges), llm_runs=len(ranges), gpus=1)
    instance = DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions(
        "shard", shard_partition_keys(TINY_CODER, WIDTH, LATENTS_PER_SHARD)
    )
    adopt_root(
        instance, DataRoot.at(root), coordination
    )  # as `autointerp adopt-root` does, before the runs (not raced by all of them)
    launched = time.monotonic()
    started = [
        (
            logs / f"llm{i}.log",
            start_worker("llm", env, logs / f"llm{i}.log", args.concurrency, f"llm{i}@%h"),
        )
        for i in range(workers)
    ]
    runs = []
    try:
        for log, worker in started:
            wait_until_ready(log, worker)
        ready_s = time.monotonic() - launched
        asked, server.peak_in_flight, queries = len(server.requests), 0, transactions(coordination)
        load = os.getloadavg()[0]
        began = time.time()  # the clock of Dagster's event timestamps
        with InFlight(server) as in_flight:
            runs += [
                subprocess.Popen(
                    [sys.executable, __file__, "--run-range", shards[0], shards[-1]],
                    env=env,
                    cwd=home,
                    stdout=open(logs / f"run{i}.log", "wb"),
                    stderr=subprocess.STDOUT,
                )
                for i, shards in enumerate(ranges)
            ]
            failed = [i for i, run in enumerate(runs) if run.wait(timeout=3600) != 0]
            wall = time.time() - began
        load = (load, os.getloadavg()[0])
    finally:
        for process in runs + [worker for _, worker in started]:
            stop(process)
    if failed:
        raise RuntimeError(
            f"runs {failed} failed: {(logs / f'run{failed[0]}.log').read_text()[-3000:]}"
        )
    time.sleep(1)  # the workers' sessions ended: the server has counted their transactions
    requests = len(server.requests) - asked
    steps = step_times(instance)
    starts = sorted(s["started"] - began for s in steps)
    ideal = requests * args.latency / ENDPOINT_LIMIT
    if args.timeline:
        in_flight.timeline(args.timeline.parent / f"{args.timeline.name}-{workers}")
        (args.timeline.parent / f"{args.timeline.name}-{workers}-events").write_text(
            "".join(
                f"{record.timestamp - began:.1f} {run.run_id[:8]} "
                f"{record.dagster_event.event_type_value if record.dagster_event else ''} "
                f"{record.user_message[:100]}\n"
                for run in instance.get_runs()
                for record in instance.all_logs(run.run_id)
            )
        )
    return {
        "workers": workers,
        "workers_ready_s": round(ready_s, 1),
        "steps_at_once": workers * args.concurrency,
        "runs": len(instance.get_runs()),
        "shards": len(keys),
        "requests": requests,
        "peak_in_flight": server.peak_in_flight,
        "wall_s": round(wall, 1),
        "ideal_s": round(ideal, 1),
        "step_overhead_s": round(statistics.median(s["wall_s"] - s["llm_s"] for s in steps), 2),
        "step_wall_s": round(statistics.median(s["wall_s"] for s in steps), 1),
        "first_step_start_s": round(starts[0], 1),
        "last_step_start_s": round(starts[-1], 1),
        "coordination_queries_per_request": round(
            (transactions(coordination) - queries) / max(requests, 1), 1
        ),
        "load_avg_1min": [round(value, 1) for value in load],
        **in_flight.summary(ENDPOINT_LIMIT),
        "ratio_to_ideal": round(ideal / wall, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bench-cluster",
        help="where the prepared inputs are kept",
    )
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument(
        "--shards-per-run",
        type=int,
        default=4,
        help="shards per run ([settings] partitions_per_run of the cluster deployment)",
    )
    parser.add_argument(
        "--latents",
        type=int,
        default=0,
        help="[settings] max_latents_per_shard: explained latents per shard (0 = every explainable one)",
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="steps at once per worker (the llm queue's default)",
    )
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument(
        "--timeline",
        type=Path,
        help="write the endpoint's mean in flight per second of each round to TIMELINE-<workers>",
    )
    parser.add_argument(
        "--run-range", nargs=2, metavar=("FIRST", "LAST"), help=argparse.SUPPRESS
    )  # one run's process (one_round starts it)
    args = parser.parse_args()
    if args.run_range:
        return run_range(*args.run_range)

    keys = shard_partition_keys(TINY_CODER, WIDTH, LATENTS_PER_SHARD)[: args.shards]
    prepare(args.data / "inputs", keys)
    rounds = []
    with (
        tempfile.TemporaryDirectory() as scratch,
        postgres_server() as postgres,
        redis_server() as redis,
        ScriptedLLMServer(answer_by_prompt, delay_s=args.latency) as server,
    ):
        for workers in args.workers:
            rounds.append(
                one_round(
                    workers,
                    args,
                    args.data / "inputs",
                    keys,
                    postgres.url,
                    redis.url,
                    server,
                    Path(scratch),
                )
            )
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    by_workers = {r["workers"]: r for r in rounds}
    print(
        json.dumps(
            {
                "machine": f"{os.cpu_count()} CPU cores",
                "shards": args.shards,
                "latents_per_shard": LATENTS_PER_SHARD,
                "shards_per_run": args.shards_per_run,
                "latency_s": args.latency,
                "endpoint_limit": ENDPOINT_LIMIT,
                "rounds": rounds,
                "ratio_to_ideal_4_workers": by_workers[4]["ratio_to_ideal"]
                if 4 in by_workers
                else None,
            }
        )
    )


if __name__ == "__main__":
    main()
