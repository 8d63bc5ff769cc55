"""The Dagster instance `make ui` and `make demo` use: run limits that fit the machine, no new-user dialog.

Runs that load the subject model (activations, the surprisal scorer) share the pool
`subject_model`, one at a time; runs that wait on the explainer/scorer LLM (explanations, the LLM
scorers) share the pool `llm`, `llm_runs` at a time; and at most `max_runs` runs are in progress at
all. Pools are enforced per run (`granularity: run`): a run waits in the queue, not as a started
process holding memory, until its pools have room.
"""

from __future__ import annotations

from pathlib import Path

from assets.automation import LLM_POOL, SUBJECT_MODEL_POOL

INSTANCE_YAML = """\
# Written by `autointerp instance` (make ui / make demo); edit the Makefile's variables, not this file.
nux:
  enabled: false  # no "Join the Dagster community" dialog
telemetry:
  enabled: false
python_logs:
  # runs print their steps' messages, not Dagster's DEBUG event lines (thousands an hour under `make ui`)
  python_log_level: INFO
concurrency:
  runs:
    max_concurrent_runs: {max_runs}
  pools:
    granularity: run
    default_limit: 1
"""


CLUSTER_INSTANCE_YAML = """\
# Written by `autointerp instance --cluster` (README: Scale out): every node (webserver, daemon, workers)
# uses this file; the addresses come from each node's environment.
nux:
  enabled: false
telemetry:
  enabled: false
python_logs:
  python_log_level: INFO  # workers and runs print their steps' messages, not Dagster's DEBUG event lines
storage:
  postgres:  # runs, events and pool slots, shared by every node
    postgres_url:
      env: {postgres_env}  # e.g. postgresql+psycopg2://autointerp:secret@db-host:5432/autointerp
concurrency:
  runs:
    max_concurrent_runs: {max_runs}
  pools:
    # a step holds its pool's slot while it runs, not its whole run: one run's GPU step and another's
    # LLM step go at once
    granularity: op
    default_limit: 1
    # runs started while their pool is full, to wait at that step (0 would start runs one after another)
    op_granularity_run_buffer: {max_runs}
run_monitoring:
  enabled: true  # the daemon watches runs in progress
  max_resume_run_attempts: 0  # a run whose process died fails (re-run its partitions)
  # a launched run whose process has not started by then fails (16 cold run processes on 2 cores took 98 s)
  start_timeout_seconds: 600
  # the backstop for a run left waiting on a step no worker will finish (e.g. its queue has no worker left)
  max_runtime_seconds: {max_runtime_s}
  # a step whose worker was lost holds its pool slot until its run ends: free it a minute later
  free_slots_after_run_end_seconds: 60
"""
POSTGRES_ENV = "AUTOINTERP_POSTGRES_URL"


def write_instance(
    dagster_home: str | Path,
    max_runs: int = 2,
    llm_runs: int = 2,
    gpus: int | None = None,
    max_runtime_s: int = 2 * 86400,
) -> Path:
    """Write `$DAGSTER_HOME/dagster.yaml` and set the pools' limits in the instance's storage. With `gpus`
    (the cluster's, all nodes together) the instance is the cluster's, on PostgreSQL, whose pools limit
    steps: `gpus` subject-model steps and `llm_runs` LLM steps at once across the nodes."""
    from dagster import DagsterInstance

    home = Path(dagster_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    if gpus is None:
        path.write_text(INSTANCE_YAML.format(max_runs=max_runs))
    else:
        path.write_text(
            CLUSTER_INSTANCE_YAML.format(
                max_runs=max_runs, postgres_env=POSTGRES_ENV, max_runtime_s=max_runtime_s
            )
        )
    with DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.set_concurrency_slots(SUBJECT_MODEL_POOL, gpus or 1)
        instance.event_log_storage.set_concurrency_slots(LLM_POOL, llm_runs)
    return path
