"""Partitions: one dynamic `shard` dimension whose keys are `<coder>|<shard>`, e.g.
`smollm2-topk/model.layers.15|03`, where a coder is a sparse coder × hookpoint and its shard NN
holds latents [NN·latents_per_shard, (NN+1)·latents_per_shard).

Work units follow each coder's width: a 4,608-latent coder has 5 shards of 1,024 latents and a
131,072-latent one 128, so no partition ever holds no latents. Keys are added by the registry
sensor when a coder appears (all of its shards in one tick). Every stage from `activations` to
the scorers is partitioned the same way: a run of any shards of a coder caches the whole coder
(once; all coders of a run share one forward pass), and exemplars, explanations and scores of a
shard depend on that shard's partition only (identity mapping).

Kept beside the assets that use them (not in `autointerp_defs`) so that importing any asset module
never imports the `Definitions`, which import every asset.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    BackfillPolicy,
    BetaWarning,
    DagsterEventType,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    Output,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.source_asset import SYSTEM_METADATA_KEY_SOURCE_ASSET_OBSERVATION

from resources.sparse_coders import CoderFormatError
from storage.activations import shard_count, shard_keys
from storage.tables import EmptierResultsError

shard_partitions = DynamicPartitionsDefinition(name="shard")

DEFAULT_LATENTS_PER_SHARD = 1024
"""About five minutes of LLM work at 32 requests in flight, so a run's fixed cost is a few percent
of it (README: shard size)."""


def shard_partition_keys(coder: str, width: int, latents_per_shard: int) -> list[str]:
    """The partition keys of a coder of `width` latents."""
    return [f"{coder}|{shard}" for shard in shard_keys(shard_count(width, latents_per_shard))]


def coder_and_shard(partition_key: str) -> tuple[str, str]:
    """(coder, shard) of a `coder|shard` partition key."""
    coder, _, shard = str(partition_key).rpartition("|")
    return coder, shard


def coders_of(partition_keys) -> list[str]:
    """The coders of some partition keys, in order, once each."""
    return list(dict.fromkeys(coder_and_shard(key)[0] for key in partition_keys))


def backfill_policy(partitions_per_run: int) -> BackfillPolicy | None:
    """How a backfill of many shards of exemplars, explanations and scores is cut into runs: one shard per
    run (None, Dagster's default: each shard succeeds or fails alone), or up to `partitions_per_run`
    shards per run (`[settings] partitions_per_run`), which spreads a run's fixed cost over them."""
    return BackfillPolicy.multi_run(partitions_per_run) if partitions_per_run > 1 else None


# Backfill policies are beta in Dagster 1.13 and chosen knowingly (`activations` needs `single_run`: one forward pass
# for all coders of a backfill), so every command and process that loads the assets would print the same warning.
warnings.filterwarnings(
    "ignore",
    message="Parameter `backfill_policy` of function `asset` is currently in beta",
    category=BetaWarning,
)


SHARD_FAILURES = (Failure, FileNotFoundError, EmptierResultsError, CoderFormatError)
"""What fails one shard only: stale or missing inputs of that shard, every latent of it failed, a write that
would empty its finished table (`EmptierResultsError`), its coder's unreadable files (`CoderFormatError`:
the shards of other coders in the run are still written). Anything else (an unreachable endpoint, a wrong
key or model: `LLMEndpointError`; a bug) stops the run at once."""


def each_shard(
    context, materialize_shard: Callable[..., MaterializeResult], overlap: bool = False
) -> Iterator[MaterializeResult | Output]:
    """`materialize_shard(partition_key)` → its metadata and check results, for each partition of the run:
    one, or a range when the asset's backfill policy puts several shards in a run (`yield from` it; the
    assets set `output_required=False`). In a range each shard is recorded as materialized, with its own
    metadata and check results (against its partition), as soon as it is written, and a shard that fails does
    not stop the others; the written ones stay recorded (automation moves on with them). A shard whose blocking
    check failed (severity ERROR) is written and recorded too, but counts as failed for what reads it. The step
    then ends with its output, which records nothing more, so that the later stages of the run (explanations
    after exemplars, the scorers after both) run on the other shards; they fail the failed and blocked ones
    without touching what those hold from before. The run fails naming those shards: at this step, or at the
    last stage of the run. The check results are logged, not yielded: Dagster fails a step that yields a failed
    blocking evaluation, which would stop the later stages for every shard of the range. A single shard's step
    returns its result as it is, and Dagster's own blocking stops the stages after it.

    With `overlap` (a stage asking a remote endpoint: `overlaps_shards`), `materialize_shard(key, asked)` calls
    `asked()` once its shard's requests are answered, and the next shard of the range starts then, on a thread,
    while that one is written (its table, its search vectors): the endpoint is asked all through the range instead
    of idling while each shard is written (README: Scale out). At most two shards are in progress, each written and
    recorded as before (its own lock, journal and atomic commit), and recorded in the range's order."""
    keys = list(context.partition_keys)
    if len(keys) == 1:
        yield materialize_shard(keys[0])
        return
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    failed = _inputs_failed(context, keys)
    written = []
    for key in keys:
        if key in failed:
            context.log.error(f"{key} is not run: {failed[key]}")
    runnable = [key for key in keys if key not in failed]

    def announce(key: str) -> None:
        context.log.info(f"shard {keys.index(key) + 1}/{len(keys)} of this run: {key}")

    for key, result in (_overlapped if overlap else _in_turn)(
        runnable, materialize_shard, announce
    ):
        if isinstance(result, SHARD_FAILURES):
            failed[key] = getattr(result, "description", None) or str(result)
            context.log.error(f"{key} failed: {failed[key]}")
            continue
        context.log_event(
            AssetMaterialization(
                asset_key=context.asset_key,
                partition=key,
                metadata=result.metadata,
                tags={"dagster/code_version": code_version} if code_version else None,
            )
        )
        target, blocking = _latest_materialization(context, key), []
        for check in result.check_results or []:
            spec = context.assets_def.get_spec_for_check_key(
                AssetCheckKey(context.asset_key, check.check_name)
            )
            if spec.blocking and _blocks(check):
                blocking.append(check.check_name)
            context.log_event(
                AssetCheckEvaluation(
                    asset_key=context.asset_key,
                    check_name=check.check_name,
                    passed=check.passed,
                    metadata=check.metadata,
                    severity=check.severity,
                    description=check.description,
                    blocking=spec.blocking,
                    partition=key,
                    target_materialization_data=target,
                )
            )
        written.append(key)
        if blocking:
            failed[key] = (
                f"its blocking check {', '.join(blocking)} failed (written and recorded; "
                "the stages after it do not run on it)"
            )
            context.log.error(f"{key}: {failed[key]}")
    for (
        output_name,
        spec,
    ) in (
        context.assets_def.check_specs_by_output_name.items()
    ):  # each check's output once, for all its shards' results
        if spec.key in context.selected_asset_check_keys:
            yield Output(None, output_name=output_name)
    if written:
        yield MaterializeResult(metadata={RECORDS_NOTHING: True})
    listed = "; ".join(f"{key}: {failed[key][:400]}" for key in keys if key in failed)
    passed = [key for key in written if key not in failed]
    if failed and passed and _has_stage_after(context):
        context.log.error(
            f"{len(failed)} of {len(keys)} shards of this run failed ({listed}); "
            f"the later stages of this run run on the other {len(passed)} and fail these "
            "(the run fails there)."
        )
    elif failed:
        raise Failure(
            f"{len(failed)} of {len(keys)} shards of this run failed ({listed}). These were written and recorded: "
            f"{', '.join(written) or 'none'}. Fix the failed ones' cause and materialize them again."
        )


def _latest_materialization(
    context, key: str
) -> AssetCheckEvaluationTargetMaterializationData | None:
    """The materialization of the shard just recorded, which its check results are of: as Dagster links a check it
    evaluates itself, so that automation's `all_deps_blocking_checks_passed` sees this shard's results."""
    found = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[key]), limit=1
    ).records
    return (
        AssetCheckEvaluationTargetMaterializationData(
            storage_id=found[0].storage_id, run_id=found[0].run_id, timestamp=found[0].timestamp
        )
        if found
        else None
    )


def _in_turn(
    keys: list[str],
    materialize_shard: Callable[[str], MaterializeResult],
    announce: Callable[[str], None],
) -> Iterator[tuple[str, MaterializeResult | Exception]]:
    """(key, its result or the failure of that shard alone) for each shard, one after the other."""
    for key in keys:
        announce(key)
        try:
            yield key, materialize_shard(key)
        except SHARD_FAILURES as error:
            yield key, error


def _overlapped(
    keys: list[str],
    materialize_shard: Callable[[str, Callable[[], None]], MaterializeResult],
    announce: Callable[[str], None],
) -> Iterator[tuple[str, MaterializeResult | Exception]]:
    """`_in_turn`, each shard on a thread started once the previous one's requests are answered (or it ended).
    An error that stops the run is raised once the other shard in progress has ended (it is not left running)."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard") as pool:
        previous: tuple[str, Future, threading.Event] | None = None
        for key in keys + [None]:
            if previous is not None:
                previous[2].wait()
            current = None
            if key is not None:
                announce(key)
                asked = threading.Event()
                current = (key, pool.submit(materialize_shard, key, asked.set), asked)
                current[1].add_done_callback(
                    lambda _, asked=asked: asked.set()
                )  # ended without asking (failed): the next starts too
            if previous is not None:
                try:
                    yield previous[0], previous[1].result()
                except SHARD_FAILURES as error:
                    yield previous[0], error
            previous = current


RECORDS_NOTHING = SYSTEM_METADATA_KEY_SOURCE_ASSET_OBSERVATION
"""Metadata key that makes Dagster record no materialization for an output (one per partition of the range,
without metadata, that would become the latest, and also for the failed shards): Dagster's own key for the same
case, where a body logs each partition's event itself and returns its output only for the step's wiring."""


def _inputs_failed(context, keys: list[str]) -> dict[str, str]:
    """Shards of the run that an input of this asset failed in this run (or, for an input this run does not
    materialize, in the run it re-executes that last did): its step went on with the other shards, and this stage
    must not run on what a failed shard holds from before (it would explain or score stale data)."""
    inputs, failed, run = set(context.assets_def.asset_deps[context.asset_key]), {}, context.run
    while inputs and run is not None:
        planned, written, blocked = _planned_and_written(context.instance, run.run_id)
        where = (
            "earlier in this run"
            if run.run_id == context.run.run_id
            else f"in run {run.run_id}, which this run re-executes"
        )
        for parent in sorted(inputs & planned):
            for key in keys:
                if (parent, key) not in written:
                    failed.setdefault(key, f"its {parent.to_user_string()} failed {where}")
                elif (parent, key) in blocked:
                    failed.setdefault(
                        key,
                        f"its {parent.to_user_string()} failed its blocking check {blocked[parent, key]} {where}",
                    )
        inputs -= planned
        run = context.instance.get_run_by_id(run.parent_run_id) if run.parent_run_id else None
    return failed


def _has_stage_after(context) -> bool:
    """Whether this run also materializes a stage that reads this one over the same shards (its `each_shard` then
    fails this step's failed shards; the unpartitioned summary would not)."""
    planned, _, _ = _planned_and_written(context.instance, context.run.run_id)
    graph = context.job_def.asset_layer.asset_graph
    return any(
        graph.get(child).partitions_def == context.assets_def.partitions_def
        for child in graph.get(context.asset_key).child_keys & planned
    )


def _planned_and_written(
    instance, run_id: str
) -> tuple[set[AssetKey], set[tuple[AssetKey, str | None]], dict[tuple[AssetKey, str | None], str]]:
    """The assets a run materializes (each over all the shards of its range), the (asset, shard)s it has written so far,
    and those of them whose blocking check failed (→ the check's names)."""
    planned, written, blocked = set(), set(), {}
    kinds = {
        DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
        DagsterEventType.ASSET_MATERIALIZATION,
        DagsterEventType.ASSET_CHECK_EVALUATION,
    }
    for entry in instance.all_logs(run_id, of_type=kinds):
        event = entry.dagster_event
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION_PLANNED:
            planned.add(event.asset_key)
        elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            written.add((event.asset_key, event.partition))
        else:
            check = event.event_specific_data
            if check.blocking and _blocks(check):
                where = (check.asset_key, check.partition)
                blocked[where] = (
                    f"{blocked[where]}, {check.check_name}"
                    if where in blocked
                    else check.check_name
                )
    return planned, written, blocked


def _blocks(check) -> bool:
    """Whether a check result or evaluation failed at severity ERROR: what stops the stages below a blocking check."""
    return not check.passed and check.severity == AssetCheckSeverity.ERROR
