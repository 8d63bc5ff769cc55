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
concurrency:
  runs:
    max_concurrent_runs: {max_runs}
  pools:
    granularity: run
    default_limit: 1
"""


def write_instance(dagster_home: str | Path, max_runs: int = 2, llm_runs: int = 2) -> Path:
    """Write `$DAGSTER_HOME/dagster.yaml` and set the pools' limits in the instance's storage."""
    from dagster import DagsterInstance

    home = Path(dagster_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    path.write_text(INSTANCE_YAML.format(max_runs=max_runs))
    with DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.set_concurrency_slots(SUBJECT_MODEL_POOL, 1)
        instance.event_log_storage.set_concurrency_slots(LLM_POOL, llm_runs)
    return path
