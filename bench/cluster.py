"""The cluster deployment's LLM stage on 1, 2 and 4 LLM workers (issue 26, line 6).

Starts what the cluster tests start (`tests/cluster/services.py`): a throwaway PostgreSQL server
(the Dagster instance and the coordination database, a fresh one of each per round) and Redis (the
celery broker), and a scripted OpenAI-compatible endpoint in this process that answers each request
after `--latency` s; stops them all at the end. Prepares once, on one machine without Dagster's
cluster (in `--data`, kept between runs): the tests' tiny SAE cut into `--shards` shards of 1152 /
16 = 72 latents, its corpus, activations and exemplars. Then per round (1, 2 and 4 `autointerp
worker --queue llm` processes of `--concurrency` steps each, on a fresh copy of the prepared root):
one `dagster asset materialize --select explanations` per shard, all launched at once, each a run
whose step goes through Redis to a worker; `[llm] max_concurrency = 32` is the endpoint's limit,
shared by every worker through the coordination database. `[settings] max_latents_per_shard` sets
the requests.

Per round: wall time (first launch to last run done), runs, requests, the endpoint's peak in
flight, per-step overhead (the step's wall minus its LLM time, from its "explaining N latents" log
to its "explanations: N/N done" log: resources, reading inputs, writing the table, the search
vectors), when the first and the last step started after the launch (each run's own process
loading the code first), and the ratio to the ideal: ideal / wall, ideal = requests × latency / 32. Prints a JSON
object as its last line with `ratio_to_ideal_4_workers` (target ≥ 0.8).

    .venv/bin/python bench/cluster.py --data /tmp/bench-cluster
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dagster import DagsterEventType, DagsterInstance, materialize  # noqa: E402

from assets.partitions import shard_partition_keys  # noqa: E402
from autointerp_defs.definitions import definitions_for  # noqa: E402
from autointerp_defs.deployments import load_deployment  # noqa: E402
from autointerp_defs.instance import POSTGRES_ENV, write_instance  # noqa: E402
from resources.settings import adopt_root  # noqa: E402
from resources.sparse_coders import save_sparsify  # noqa: E402
from resources.subject_model import SubjectModelResource  # noqa: E402
from storage.layout import DataRoot  # noqa: E402
from tests.cluster.services import (cluster_env, dagster_postgres_url, fresh_database, postgres_server, redis_server, start_worker, stop,  # noqa: E402
                                    tiny_cluster_deployment, wait_until_ready)
from tests.conftest import TINY_CODER, TINY_HOOKPOINT, train_tiny_sae  # noqa: E402
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt  # noqa: E402

WIDTH = 1152
LATENTS_PER_SHARD = WIDTH // 16
ENDPOINT_LIMIT = 32


def prepare(inputs: Path, keys: list[str]) -> None:
    """The tiny SAE, registered; corpus, activations and the exemplars of every shard in `keys` (skipped when done)."""
    done = inputs / "prepared.json"
    if done.exists() and json.loads(done.read_text()) == keys:
        return
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    save_sparsify(train_tiny_sae(SubjectModelResource(batch_size=8)), inputs / "registry" / "tiny-topk" / TINY_HOOKPOINT)
    deployment = tiny_cluster_deployment(inputs, inputs, "http://127.0.0.1:9/v1", None, latents_per_shard=LATENTS_PER_SHARD)
    single = definitions_for(load_deployment(str(deployment)))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shard", keys)
    assets = list(single.assets)
    materialize(assets, selection=["corpus"], resources=single.resources, instance=instance)
    materialize(assets, selection=["activations"], partition_key=keys[0], resources=single.resources, instance=instance)
    for key in keys:
        materialize(assets, selection=["exemplars"], partition_key=key, resources=single.resources, instance=instance)
    done.write_text(json.dumps(keys))


def step_times(instance: DagsterInstance) -> list[dict]:
    """Per explanations step: its wall (start to success) and its LLM time (first to last log of the LLM work)."""
    steps = []
    for run in instance.get_runs():
        records = instance.all_logs(run.run_id)
        started = [r.timestamp for r in records if r.dagster_event and r.dagster_event.event_type == DagsterEventType.STEP_START]
        ended = [r.timestamp for r in records if r.dagster_event and r.dagster_event.event_type == DagsterEventType.STEP_SUCCESS]
        asking = [r.timestamp for r in records if r.user_message.startswith("explaining ")]
        answered = [r.timestamp for r in records if r.user_message.startswith("explanations: ")]
        if started and ended and asking and answered:
            steps.append({"started": started[0], "wall_s": ended[-1] - started[0], "llm_s": answered[-1] - asking[0]})
    return steps


def one_round(workers: int, args, inputs: Path, keys: list[str], postgres: str, redis: str, server: ScriptedLLMServer, scratch: Path) -> dict:
    """The explanations of every shard as one run each, on `workers` LLM workers."""
    home, root, logs = (scratch / f"{name}-{workers}" for name in ("dagster_home", "root", "logs"))
    shutil.copytree(inputs, root)
    home.mkdir()
    logs.mkdir()
    deployment = tiny_cluster_deployment(home, root, server.base_url, fresh_database(postgres), max_latents_per_shard=args.latents,
                                         latents_per_shard=LATENTS_PER_SHARD, llm_concurrency=ENDPOINT_LIMIT)
    instance_url = dagster_postgres_url(fresh_database(postgres))
    os.environ[POSTGRES_ENV] = instance_url  # what the instance's dagster.yaml reads in this process too
    env = cluster_env(ROOT, home, deployment, instance_url, redis)
    write_instance(home, max_runs=len(keys), llm_runs=len(keys), gpus=1)
    instance = DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions("shard", keys)
    adopt_root(instance, DataRoot.at(root))  # as `autointerp adopt-root` does, before the runs (not raced by all of them)
    started = [(logs / f"llm{i}.log", start_worker("llm", env, logs / f"llm{i}.log", args.concurrency, f"llm{i}@%h")) for i in range(workers)]
    runs = []
    try:
        for log, worker in started:
            wait_until_ready(log, worker)
        asked, server.peak_in_flight = len(server.requests), 0
        began = time.time()  # the clock of Dagster's event timestamps
        command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "autointerp_defs", "--select", "explanations", "--partition"]
        runs += [subprocess.Popen(command + [key], env=env, cwd=home, stdout=open(logs / f"run{i}.log", "wb"), stderr=subprocess.STDOUT)
                 for i, key in enumerate(keys)]
        failed = [i for i, run in enumerate(runs) if run.wait(timeout=1800) != 0]
        wall = time.time() - began
    finally:
        for process in runs + [worker for _, worker in started]:
            stop(process)
    if failed:
        raise RuntimeError(f"runs {failed} failed: {(logs / f'run{failed[0]}.log').read_text()[-3000:]}")
    requests = len(server.requests) - asked
    steps = step_times(instance)
    starts = sorted(s["started"] - began for s in steps)
    ideal = requests * args.latency / ENDPOINT_LIMIT
    return {"workers": workers, "steps_at_once": workers * args.concurrency, "runs": len(instance.get_runs()), "requests": requests,
            "peak_in_flight": server.peak_in_flight, "wall_s": round(wall, 1), "ideal_s": round(ideal, 1),
            "step_overhead_s": round(statistics.median(s["wall_s"] - s["llm_s"] for s in steps), 2),
            "step_wall_s": round(statistics.median(s["wall_s"] for s in steps), 1), "first_step_start_s": round(starts[0], 1),
            "last_step_start_s": round(starts[-1], 1), "ratio_to_ideal": round(ideal / wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bench-cluster", help="where the prepared inputs are kept")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--latents", type=int, default=24, help="[settings] max_latents_per_shard: explained latents per shard")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, default=4, help="steps at once per worker (the llm queue's default)")
    parser.add_argument("--latency", type=float, default=1.0)
    args = parser.parse_args()

    keys = shard_partition_keys(TINY_CODER, WIDTH, LATENTS_PER_SHARD)[: args.shards]
    prepare(args.data / "inputs", keys)
    rounds = []
    with tempfile.TemporaryDirectory() as scratch, postgres_server() as postgres, redis_server() as redis, \
            ScriptedLLMServer(answer_by_prompt, delay_s=args.latency) as server:
        for workers in args.workers:
            rounds.append(one_round(workers, args, args.data / "inputs", keys, postgres, redis, server, Path(scratch)))
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    by_workers = {r["workers"]: r for r in rounds}
    print(json.dumps({"shards": args.shards, "latents_per_shard": args.latents, "latency_s": args.latency, "endpoint_limit": ENDPOINT_LIMIT,
                      "rounds": rounds, "ratio_to_ideal_4_workers": by_workers[4]["ratio_to_ideal"] if 4 in by_workers else None}))


if __name__ == "__main__":
    main()
