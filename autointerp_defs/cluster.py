"""The cluster deployment's steps: dagster-celery workers, each on one queue (`gpu`, `cpu` or `llm`, the
pool of the step: `assets/automation.py`), with Redis as broker and result backend (README: Scale out).
Needs the `cluster` extra; only a deployment with a `[cluster]` table imports this module."""

from __future__ import annotations

import importlib
import importlib.util

from dagster import ExecutorDefinition
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster_celery import celery_executor
from dagster_celery.defaults import broker_transport_options
from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from autointerp_defs.deployments import Deployment, see_only_gpu

DEFAULT_CONCURRENCY = {"gpu": 1, "cpu": 1, "llm": 4}
"""Steps a worker of each queue (`assets.automation.WORKER_QUEUES`) runs at once: one per GPU; LLM
steps mostly wait on the endpoint (the `llm` pool caps them across nodes)."""


def celery_settings(redeliver_after_s: int) -> dict:
    """What the run's process and every worker tell Celery, so that a step whose worker dies is run again
    rather than lost: its message is acknowledged only once the step has ended (`task_acks_late`); a worker
    process killed mid-step (the OOM killer, SIGKILL) puts it back on its queue at once
    (`task_reject_on_worker_lost`); a worker lost whole (its node gone) leaves it unacknowledged, and Redis
    hands it to another worker `redeliver_after_s` (`[cluster]`) after it was taken (`visibility_timeout`), within
    the 10 s between each live worker's looks for such messages (kombu looks every 10th time by default)."""
    transport = {
        **broker_transport_options,
        "visibility_timeout": redeliver_after_s,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    }
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
    }


def executor_for(deployment: Deployment) -> ExecutorDefinition:
    """The celery executor, reading the broker's address from the environment of the node that runs the run."""
    broker = {"env": deployment.broker_env}
    return celery_executor.configured(
        {
            "broker": broker,
            "backend": broker,
            "config_source": celery_settings(deployment.redeliver_after_s),
        },
        name="celery",
    )


PRELOADED_LIBRARIES = ("dagster_postgres", "sentence_transformers", "openai", "psycopg")
"""What a step imports when it first opens the instance (on PostgreSQL) and the engines of the stages (the
embedder, an endpoint's client, the coordination database): seconds each, sentence_transformers (with
transformers) the most."""


def load_code() -> None:
    """Load what a step loads on the first step of its pool process: the definitions (the module `autointerp_defs`
    that every run's steps point at, built from this node's deployment) and the libraries its engines import. Run
    in the worker's main process before celery forks its pool, so every pool process starts with them loaded;
    before, each loaded them again on its first step (about 20 s of CPU; README: Scale out). Modules only: no
    model, no GPU, no LanceDB (its background event loop is a thread, which a fork does not carry over)."""
    ReconstructableRepository.for_module(
        "autointerp_defs", "defs"
    ).get_definition()  # as a step reconstructs its job
    for name in PRELOADED_LIBRARIES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def run_worker(
    deployment: Deployment,
    queue: str,
    concurrency: int | None = None,
    gpu: int | None = None,
    name: str | None = None,
) -> None:
    """Serve `queue` until stopped: the worker's processes run the steps sent there (`gpu`: one worker per
    GPU, which it sees alone as `CUDA_VISIBLE_DEVICES`)."""
    if gpu is not None:
        see_only_gpu(gpu)
    url = deployment.broker_url()
    app = make_app(
        CeleryExecutor.for_cli(
            broker=url, backend=url, config_source=celery_settings(deployment.redeliver_after_s)
        ).app_args()
    )
    create_task(app)
    load_code()
    name = name or (f"gpu{gpu}@%h" if gpu is not None else f"{queue}@%h")
    app.worker_main(
        [
            "worker",
            "--queues",
            queue,
            "--hostname",
            name,
            "--concurrency",
            str(concurrency or DEFAULT_CONCURRENCY[queue]),
            "--prefetch-multiplier",
            "1",
            "--loglevel",
            "INFO",
        ]
    )
