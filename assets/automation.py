"""When the assets run by themselves, and how many at once.

Conditions: new inputs, and anything still missing once its inputs are there.

`eager()` alone requests a partition only when it *becomes* missing or an input updates while
automation is running: partitions that were already missing when the automation sensor first
ticks (a fresh instance, the sensor switched on later, a daemon restarted with a new cursor) would
never be requested. `MISSING` requests those, statelessly, on any tick; a partition whose latest
run failed is left alone (no retry loop) until an input updates or someone materializes it.
"""

from dagster import AutomationCondition

CHECKS_PASSED = AutomationCondition.all_deps_blocking_checks_passed()
"""No input's blocking check failed (on this shard): a shard whose explanations failed one is written and recorded,
so without this a later tick would score it; the run that wrote it already stopped there (`each_shard`)."""

READY = (
    ~AutomationCondition.any_deps_missing()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
    & CHECKS_PASSED
)

MISSING = (
    AutomationCondition.missing() & ~AutomationCondition.execution_failed() & READY
).with_label("missing, inputs ready, not failed")

FOLLOW = ((AutomationCondition.eager() & CHECKS_PASSED) | MISSING).with_label(
    "eager, or missing with inputs ready; inputs' blocking checks passed"
)
"""New inputs re-run a partition; a missing partition runs once its inputs are there; neither on an
input that failed a blocking check."""

CODE_CHANGED = (
    AutomationCondition.code_version_changed().since_last_handled()
    & ~AutomationCondition.missing()
    & ~AutomationCondition.in_progress()
    & ~AutomationCondition.any_deps_in_progress()
).with_label("code version or deployment settings changed")
"""A changed code version (which carries the hash of the deployment's settings for the asset)
re-runs every materialized partition of that asset, once."""

SUBJECT_MODEL_POOL = "subject_model"
"""Runs that load the subject model (activations, surprisal): the instance lets one run at a time."""
LLM_POOL = "llm"
"""Runs that wait on the explainer/scorer LLM: as many at a time as the instance allows (`autointerp instance`)."""

QUEUE_TAG = "dagster-celery/queue"
WORKER_QUEUES = {SUBJECT_MODEL_POOL: "gpu", LLM_POOL: "llm", None: "cpu"}
"""The cluster's worker queue of each pool: a step that loads the subject model runs on a GPU worker, one
that waits on the LLM on an `llm` worker, the rest on a `cpu` worker (README: Scale out)."""


def in_pool(pool: str | None) -> dict:
    """The `@asset` arguments of a stage in `pool` (None: no limit): the pool, and the op tag that sends its
    step to the pool's worker queue under the cluster's celery executor (other executors ignore the tag)."""
    return {"pool": pool, "op_tags": {QUEUE_TAG: WORKER_QUEUES[pool]}}
