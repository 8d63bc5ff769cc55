"""A worker lost whole (its node gone: main and pool processes SIGKILLed, nothing acknowledged) does not lose
its step: with the cluster's Celery settings Redis gives it to another worker of the queue once
`[cluster] redeliver_after_s` has passed. The task is a plain Celery one (`held_task.py`): what happens to the
message is Celery's, and a Dagster step's task is re-run the same way (`test_celery_cluster.py` kills a pool
process). As root each worker is a node with a network of its own, reaching Redis (in a namespace of its own,
with a password) over a veth pair; this process reaches it over its Unix socket."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.cluster.conftest import failing_where_missing, needs_the_cluster_extra
from tests.cluster.services import (
    ClusterNetwork,
    cluster_network,
    redis_server,
    stop,
    wait_until_ready,
)

needs_the_cluster_extra()

REPO = Path(__file__).resolve().parents[2]
REDELIVER_AFTER_S = 4
NODES = ("node1", "node2")


def test_the_step_of_a_worker_lost_whole_goes_to_another_worker_after_redeliver_after_s(
    tmp_path, monkeypatch
):
    workers = {}
    with contextlib.ExitStack() as stack:
        network = (
            stack.enter_context(failing_where_missing(cluster_network(len(NODES))))
            if os.geteuid() == 0
            else None
        )
        redis = stack.enter_context(
            failing_where_missing(redis_server(network.services if network else None))
        )
        prefixes = (
            [ClusterNetwork.prefix(namespace) for namespace in network.nodes]
            if network
            else [[]] * len(NODES)
        )
        for name, value in {
            "PYTHONPATH": str(REPO),
            "AUTOINTERP_BROKER_URL": redis.url,
            "REDELIVER_AFTER_S": str(REDELIVER_AFTER_S),
        }.items():
            monkeypatch.setenv(name, value)
        from tests.cluster.held_task import hold

        try:
            for node, inside in zip(NODES, prefixes, strict=False):
                env = {
                    **os.environ,
                    "AUTOINTERP_BROKER_URL": redis.nodes_url,
                }  # the node reaches Redis over its link
                workers[f"held@{node}"] = subprocess.Popen(
                    [
                        *inside,
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "tests.cluster.held_task",
                        "worker",
                        "--queues",
                        "held",
                        "--hostname",
                        f"held@{node}",
                        "--concurrency",
                        "1",
                        "--loglevel",
                        "INFO",
                    ],
                    env=env,
                    cwd=tmp_path,
                    stdout=open(tmp_path / f"{node}.log", "wb"),
                    stderr=subprocess.STDOUT,
                )
            for node, worker in zip(NODES, workers.values(), strict=False):
                wait_until_ready(tmp_path / f"{node}.log", worker)
                assert (
                    redis.nodes_url.rsplit("@", 1)[1] in (tmp_path / f"{node}.log").read_text()
                )  # "Connected to redis://…": over its link
            folder = tmp_path / "task"
            folder.mkdir()
            result = hold.apply_async((str(folder),), queue="held")
            deadline = time.monotonic() + 60
            while (
                not (took := [path.name for path in folder.iterdir()])
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)
            (lost,) = took
            node = psutil.Process(
                workers[lost].pid
            )  # `ip netns exec` runs the worker in its own process
            for process in [node, *node.children(recursive=True)]:
                process.send_signal(signal.SIGKILL)
            lost_at = time.monotonic()
            (folder / "released").touch()
            (other,) = set(workers) - {lost}
            assert result.get(timeout=REDELIVER_AFTER_S + 60) == other
            assert (
                time.monotonic() - lost_at < REDELIVER_AFTER_S + 15
            )  # a live worker looks for lost messages every 10 s
        finally:
            for worker in workers.values():
                stop(worker)
