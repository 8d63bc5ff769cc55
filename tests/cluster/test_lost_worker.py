"""A worker lost whole (its node gone: main and pool processes SIGKILLed, nothing acknowledged) does not lose
its step: with the cluster's Celery settings Redis gives it to another worker of the queue once
`[cluster] redeliver_after_s` has passed. The task is a plain Celery one (`held_task.py`): what happens to the
message is Celery's, and a Dagster step's task is re-run the same way (`test_celery_cluster.py` kills a pool process)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.cluster.conftest import needs_the_cluster_extra
from tests.cluster.services import stop, wait_until_ready

needs_the_cluster_extra()

REPO = Path(__file__).resolve().parents[2]
REDELIVER_AFTER_S = 4


def test_the_step_of_a_worker_lost_whole_goes_to_another_worker_after_redeliver_after_s(redis_url, tmp_path, monkeypatch):
    env = {"PYTHONPATH": str(REPO), "AUTOINTERP_BROKER_URL": redis_url, "REDELIVER_AFTER_S": str(REDELIVER_AFTER_S)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from tests.cluster.held_task import hold

    workers = {}
    try:
        for name in ("node1", "node2"):
            log = tmp_path / f"{name}.log"
            workers[f"held@{name}"] = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tests.cluster.held_task", "worker", "--queues", "held",
                                                        "--hostname", f"held@{name}", "--concurrency", "1", "--loglevel", "INFO"],
                                                       cwd=tmp_path, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        for name, worker in workers.items():
            wait_until_ready(tmp_path / f"{name.split('@')[1]}.log", worker)
        folder = tmp_path / "task"
        folder.mkdir()
        result = hold.apply_async((str(folder),), queue="held")
        deadline = time.monotonic() + 60
        while not (took := [path.name for path in folder.iterdir()]) and time.monotonic() < deadline:
            time.sleep(0.1)
        (lost,) = took
        node = psutil.Process(workers[lost].pid)
        for process in [node, *node.children(recursive=True)]:
            process.send_signal(signal.SIGKILL)
        lost_at = time.monotonic()
        (folder / "released").touch()
        (other,) = set(workers) - {lost}
        assert result.get(timeout=REDELIVER_AFTER_S + 60) == other
        assert time.monotonic() - lost_at < REDELIVER_AFTER_S + 15  # a live worker looks for lost messages every 10 s
    finally:
        for worker in workers.values():
            stop(worker)
