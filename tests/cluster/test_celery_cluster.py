"""The cluster deployment end to end: the instance on PostgreSQL, Redis as broker,
`autointerp worker` processes (two on the `llm` queue) on two nodes; every step runs on a worker of
its queue, the `llm` pool's limit holds across workers, the step of a worker process killed mid-step
is run again, and the tables equal a single-machine run's. As root (CI) each node has a network of
its own, reaching PostgreSQL, Redis and the LLM endpoint (in a namespace of their own, asking for
passwords) over a veth pair, and a mount namespace in which the shared data root is bind-mounted at
the deployment's `data_dir`: on this machine that folder stays empty, so every table was written
through a node's mount."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from dagster import DagsterEventType, DagsterInstance, materialize

from assets.automation import LLM_POOL
from autointerp_defs.definitions import definitions_for
from autointerp_defs.deployments import load_deployment
from autointerp_defs.instance import write_instance
from storage.activations import read_shard, shard_keys
from storage.layout import DataRoot
from storage.store import TableStore
from tests.cluster.conftest import failing_where_missing, needs_the_cluster_extra
from tests.cluster.services import (
    SERVICE_ADDRESS,
    Service,
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
    with_mounted,
)
from tests.conftest import TEST_LATENTS_PER_SHARD, TINY_CODER, add_coders
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt

needs_the_cluster_extra()

REPO = Path(__file__).resolve().parents[2]
PARTITION = f"{TINY_CODER}|00"
SCORERS = ("detection", "fuzzing")
RUNS = [
    ("corpus", None),
    ("activations", PARTITION),
    ("exemplars,explanations,scores/detection,scores/fuzzing", PARTITION),
]
QUEUE_OF_STEP = {
    "corpus": "cpu",
    "activations": "gpu",
    "exemplars": "cpu",
    "explanations": "llm",
    "scores__detection": "llm",
    "scores__fuzzing": "llm",
}
WORKERS = {"gpu@node1": "gpu", "cpu@node1": "cpu", "llm@node1": "llm", "llm@node2": "llm"}
NODES = ("node1", "node2")
LLM_STEPS = ("explanations", "scores__detection", "scores__fuzzing")
"""The `llm` pool's steps: the pool allows one at a time, and the two scorers are ready together
with two `llm` workers idle (the celery executor logs no "blocked by limit" event, so the step times
are the evidence)."""


class FirstAnswerHeld:
    """`answer_by_prompt`, holding the first question until `released` is set: until then the step asking it is
    in progress (and cannot end), so its worker can be killed mid-step."""

    def __init__(self):
        self.asked, self.released = threading.Event(), threading.Event()

    def __call__(self, messages) -> str:
        if not self.asked.is_set():
            self.asked.set()
            self.released.wait(300)
        return answer_by_prompt(messages)


def workers_of_steps(instance: DagsterInstance) -> dict[str, list[str]]:
    """Which celery workers ran each step, in order, from the engine event each worker writes as it starts one."""
    ran = {}
    for run in reversed(instance.get_runs()):
        for record in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT):
            metadata = record.dagster_event.engine_event_data.metadata
            if "Celery worker" in metadata:
                ran.setdefault(record.step_key, []).append(metadata["Celery worker"].value)
    return ran


def kill_mid_step(
    instance: DagsterInstance, step: str, workers: dict[str, psutil.Process], held: FirstAnswerHeld
) -> str:
    """SIGKILL the worker process running `step` while it waits on its first LLM answer (as the OOM killer
    would: the pool process, not the worker's main process); the name of its worker."""
    assert held.asked.wait(300), "no step asked the LLM"
    name = workers_of_steps(instance)[step][-1]
    (process,) = workers[
        name
    ].children()  # a worker of concurrency 1: its one pool process runs the step
    process.send_signal(signal.SIGKILL)
    held.released.set()
    return name


def most_at_once(instance: DagsterInstance, run_id: str, steps: tuple[str, ...]) -> int:
    """The most of `steps` that were in progress at once in a run (a step from its last start to its success)."""
    start, end = {}, {}
    for record in instance.all_logs(
        run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}
    ):
        if record.step_key in steps:
            (start if record.dagster_event.event_type == DagsterEventType.STEP_START else end)[
                record.step_key
            ] = record.timestamp
    assert start.keys() == end.keys() == set(steps), (start, end)
    return max(sum(start[other] <= start[step] < end[other] for other in steps) for step in steps)


def tables(root: Path) -> dict[str, object]:
    """Every table the runs wrote, in comparable form."""
    data, store = DataRoot.at(root), TableStore.at(root)
    coder, shard = TINY_CODER, "00"
    found = {"corpus": data.corpus_tokens_path.read_bytes()}
    for key in shard_keys(1152 // TEST_LATENTS_PER_SHARD):
        pairs = read_shard(data.activations_dir(coder), key)
        found[f"activations {key}"] = (pairs.locations, pairs.activations)
    found.update(
        exemplars=store.exemplars(coder, shard).read(),
        latent_profiles=store.latent_profiles(coder, shard).read(),
        explanations=store.explanations(coder, shard).read(),
    )
    for scorer in SCORERS:
        found.update(
            {
                f"scores {scorer}": store.scores(coder, shard, scorer).read(),
                f"scored_examples {scorer}": store.scored_examples(coder, shard, scorer).read(),
            }
        )
    return found


def assert_same_tables(cluster: dict, single: dict) -> None:
    assert cluster.keys() == single.keys()
    for name, table in cluster.items():
        if isinstance(table, pd.DataFrame):
            pd.testing.assert_frame_equal(table, single[name], obj=name)
        elif isinstance(table, tuple):
            assert all(np.array_equal(a, b) for a, b in zip(table, single[name], strict=False)), (
                name
            )
        else:
            assert table == single[name], name


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The services (`Service`s: this process's URL, the nodes'), each node's command prefix, the prefix of the
    processes that launch runs, the deployment's data_dir, and the services' namespace (None: this machine's)."""

    postgres: Service
    redis: Service
    nodes: dict[str, list[str]]
    launcher: list[str]
    data_dir: Path
    namespace: str | None

    def llm_server(self, reply) -> ScriptedLLMServer:
        """The scripted endpoint beside the other services, where every node reaches it."""
        if self.namespace is None:
            return ScriptedLLMServer(reply)
        with joined(self.namespace):  # its listening socket is made inside the services' namespace
            return ScriptedLLMServer(reply, host=SERVICE_ADDRESS)


@contextlib.contextmanager
def nodes_and_services(shared_root: Path, mount_point: Path):
    """The cluster. As root: a network of the test's own (`cluster_network`), the services and the processes that
    launch runs in its services' namespace, each node in a namespace of its own with the shared root bind-mounted at
    `mount_point`. Else plain processes on this machine, sharing `shared_root` itself. Yields a `Cluster`."""
    with contextlib.ExitStack() as stack:
        if os.geteuid() != 0:
            yield Cluster(
                stack.enter_context(failing_where_missing(postgres_server())),
                stack.enter_context(failing_where_missing(redis_server())),
                {node: [] for node in NODES},
                [],
                shared_root,
                None,
            )
            return
        network = stack.enter_context(failing_where_missing(cluster_network(len(NODES))))
        nodes = {
            node: [*network.prefix(namespace), *with_mounted(shared_root, mount_point)]
            for node, namespace in zip(NODES, network.nodes, strict=False)
        }
        postgres = stack.enter_context(failing_where_missing(postgres_server(network.services)))
        redis = stack.enter_context(failing_where_missing(redis_server(network.services)))
        yield Cluster(
            postgres, redis, nodes, network.prefix(network.services), mount_point, network.services
        )


@pytest.mark.slow(120)
def test_cluster_runs_each_step_on_its_queue_within_its_pool_reruns_a_killed_step_and_matches_a_single_machine_run(
    registered, tmp_path_factory, monkeypatch
):
    """Minutes: four worker processes and three runs, each loading the code (the killed step's second attempt
    too), on two cores; the one test of steps on real workers over a real broker."""
    home, logs, reference, mount_point = (
        tmp_path_factory.mktemp(name)
        for name in ("dagster_home", "worker_logs", "reference", "mount_point")
    )
    shutil.copytree(registered / "registry", reference / "registry")
    workers, runs = {}, []
    held = FirstAnswerHeld()
    with nodes_and_services(registered, mount_point) as cluster, cluster.llm_server(held) as server:
        data_dir, nodes = cluster.data_dir, cluster.nodes
        instance_database, coordination = (
            fresh_database(cluster.postgres),
            fresh_database(cluster.postgres),
        )
        deployment_file = tiny_cluster_deployment(
            home, data_dir, server.base_url, coordination.nodes_url, scorers=SCORERS
        )
        env = cluster_env(
            REPO,
            home,
            deployment_file,
            dagster_postgres_url(instance_database.nodes_url),
            cluster.redis.nodes_url,
        )
        monkeypatch.setenv(
            "AUTOINTERP_POSTGRES_URL", dagster_postgres_url(instance_database.url)
        )  # what the instance's dagster.yaml reads here
        try:
            write_instance(home, max_runs=2, llm_runs=1, gpus=1)
            instance = DagsterInstance.from_config(str(home))
            add_coders(instance, registered, TINY_CODER)
            for name, queue in WORKERS.items():
                workers[name] = start_worker(
                    queue,
                    env,
                    logs / f"{name}.log",
                    concurrency=1,
                    name=name,
                    node=nodes[name.split("@")[1]],
                )
            for name, worker in workers.items():
                wait_until_ready(logs / f"{name}.log", worker)
                if (
                    data_dir == mount_point
                ):  # as root: the worker (each prefix execs the next) sees the network and mounts of its node
                    assert os.readlink(f"/proc/{worker.pid}/ns/net") != os.readlink(
                        "/proc/self/ns/net"
                    ), name
                    assert (
                        f" {mount_point} " in Path(f"/proc/{worker.pid}/mountinfo").read_text()
                    ), name
            for selection, partition in RUNS:
                command = [
                    sys.executable,
                    "-m",
                    "dagster",
                    "asset",
                    "materialize",
                    "-m",
                    "autointerp_defs",
                    "--select",
                    selection,
                ]
                run = subprocess.Popen(
                    [
                        *cluster.launcher,
                        *command,
                        *(["--partition", partition] if partition else []),
                    ],
                    env=env,
                    cwd=home,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                runs.append(run)
                if "explanations" in selection:
                    killed = kill_mid_step(
                        instance,
                        "explanations",
                        {name: psutil.Process(worker.pid) for name, worker in workers.items()},
                        held,
                    )
                output, _ = run.communicate(timeout=600)
                assert run.returncode == 0, output[-6000:]
            ran = workers_of_steps(instance)
            last_run = instance.get_runs(limit=1)[0].run_id
        finally:
            held.released.set()
            for process in [*runs, *workers.values()]:
                stop(process)

        assert {step: {name.split("@")[0] for name in names} for step, names in ran.items()} == {
            step: {queue} for step, queue in QUEUE_OF_STEP.items()
        }
        assert ran["explanations"][0] == killed and len(ran["explanations"]) == 2, (
            ran
        )  # killed, then run again from its start
        assert (
            "Worker exited prematurely: signal 9 (SIGKILL)" in (logs / f"{killed}.log").read_text()
        )
        assert (
            most_at_once(instance, last_run, LLM_STEPS) == 1
        )  # both scorers ready once explanations ended, two llm workers idle: one after the other
        assert not instance.event_log_storage.get_concurrency_info(
            LLM_POOL
        ).claimed_slots  # the killed attempt's slot was given back too
    with ScriptedLLMServer(
        held
    ) as server:  # on 127.0.0.1 of this machine, answering as the cluster's did
        single = definitions_for(
            load_deployment(
                str(
                    tiny_cluster_deployment(
                        reference, reference, server.base_url, None, scorers=SCORERS
                    )
                )
            )
        )
        on_one_machine = DagsterInstance.ephemeral()
        add_coders(on_one_machine, reference, TINY_CODER)
        for selection, partition in RUNS:
            materialize(
                list(single.assets),
                selection=selection.split(","),
                partition_key=partition,
                resources=single.resources,
                instance=on_one_machine,
            )
    assert_same_tables(tables(registered), tables(reference))
    assert data_dir == registered or not any(
        mount_point.iterdir()
    )  # as root: nothing written beside the nodes' mounts
    assert (
        not list(registered.rglob("*.sqlite")) and not (registered / "llm_cache" / "slots").exists()
    )  # no coordination through the data root's files
