"""Run monitoring, as `autointerp instance --cluster` writes it, on a run left waiting for a worker that will
never come (its queue's every worker lost whole, nothing redelivered before `[cluster] redeliver_after_s`): the
daemon fails the run once `max_runtime_seconds` has passed, and gives back the pool slot its waiting step holds
`free_slots_after_run_end_seconds` later, so the other runs' steps of that pool are not held up for ever."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from assets.automation import SUBJECT_MODEL_POOL
from autointerp_defs.instance import write_instance
from tests.cluster.conftest import needs_the_cluster_extra
from tests.cluster.services import cluster_env, stop, tiny_cluster_deployment
from tests.conftest import TINY_CODER, add_coders

needs_the_cluster_extra()

REPO = Path(__file__).resolve().parents[2]
MAX_RUNTIME_S = 20
POLL_S = 5
FREE_AFTER_S = 20
"""free_slots_after_run_end_seconds here (the instance writes 60): the test waits that long after the run failed."""


def wait_for(condition, timeout_s: float, what: str, *processes: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        for process in processes:
            assert process.poll() is None, (
                f"{process.args[:4]} exited with {process.returncode} while waiting for {what}"
            )
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(1)
    return found


@pytest.mark.slow(90)
def test_the_daemon_fails_a_run_whose_step_no_worker_runs_and_frees_its_pool_slot(
    registered, tmp_path_factory, monkeypatch, postgres_url, redis_url
):
    """Over a minute: the daemon and the run are processes that load the code, then the test waits out the
    run's MAX_RUNTIME_S and the FREE_AFTER_S after it, at the daemon's POLL_S."""
    home = tmp_path_factory.mktemp("dagster_home")
    deployment_file = tiny_cluster_deployment(
        home, registered, "http://127.0.0.1:9/v1", None
    )  # no step asks the LLM
    env = cluster_env(REPO, home, deployment_file, postgres_url, redis_url)
    monkeypatch.setenv("AUTOINTERP_POSTGRES_URL", postgres_url)
    config = write_instance(home, gpus=1, max_runtime_s=MAX_RUNTIME_S)
    written = config.read_text()
    assert "free_slots_after_run_end_seconds: 60" in written
    config.write_text(
        written.replace(
            "run_monitoring:\n", f"run_monitoring:\n  poll_interval_seconds: {POLL_S}\n"
        ).replace(  # polls every 120 s, frees a minute after the run ended, as written
            "free_slots_after_run_end_seconds: 60",
            f"free_slots_after_run_end_seconds: {FREE_AFTER_S}",
        )
    )
    instance = DagsterInstance.from_config(str(home))
    add_coders(instance, registered, TINY_CODER)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "dagster._daemon", "run", "-m", "autointerp_defs"],
        env=env,
        cwd=home,
        stdout=open(home / "daemon.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-m",
            "autointerp_defs",
            "--select",
            "activations",
            "--partition",
            f"{TINY_CODER}|00",
        ],
        env=env,
        cwd=home,
        stdout=open(home / "run.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:  # no `gpu` worker: the step is sent to its queue and waits there, holding the subject model's slot
        wait_for(
            lambda: (
                instance.event_log_storage.get_concurrency_info(SUBJECT_MODEL_POOL).claimed_slots
            ),
            600,
            "claimed slot",
            run,
            daemon,
        )
        (waiting,) = instance.get_runs(limit=1)
        assert waiting.status == DagsterRunStatus.STARTED
        failed = wait_for(
            lambda: (
                instance.get_run_by_id(waiting.run_id).is_finished
                and instance.get_run_by_id(waiting.run_id)
            ),
            600,
            "failed run",
            daemon,
        )
        assert failed.status == DagsterRunStatus.FAILURE
        ended = time.monotonic()
        wait_for(
            lambda: (
                not instance.event_log_storage.get_concurrency_info(
                    SUBJECT_MODEL_POOL
                ).claimed_slots
            ),
            FREE_AFTER_S + 10 * POLL_S + 60,
            "freed slot",
            daemon,
        )
        assert (
            time.monotonic() - ended > FREE_AFTER_S / 2
        )  # freed by free_slots_after_run_end_seconds (FREE_AFTER_S after the run ended), not by the run
    finally:
        for process in (run, daemon):
            stop(process)
    messages = [record.message for record in instance.all_logs(waiting.run_id)]
    assert any(
        f"Exceeded maximum runtime of {MAX_RUNTIME_S} seconds" in message
        or f"exceeding maximum runtime of {MAX_RUNTIME_S} seconds" in message
        for message in messages
    ), messages[-10:]
