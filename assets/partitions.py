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

from typing import Callable, Iterator

from dagster import AssetCheckEvaluation, AssetCheckKey, AssetMaterialization, BackfillPolicy, DynamicPartitionsDefinition, Failure, MaterializeResult, Output

from resources.sparse_coders import CoderFormatError
from storage.activations import shard_count, shard_keys
from storage.tables import EmptierResultsError

shard_partitions = DynamicPartitionsDefinition(name="shard")

DEFAULT_LATENTS_PER_SHARD = 1024
"""About five minutes of LLM work at 32 requests in flight, so a run's fixed cost is a few percent of it (README: shard size)."""


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


SHARD_FAILURES = (Failure, FileNotFoundError, EmptierResultsError, CoderFormatError)
"""What fails one shard only: stale or missing inputs of that shard, every latent of it failed, a write that
would empty its finished table (`EmptierResultsError`), its coder's unreadable files (`CoderFormatError`:
the shards of other coders in the run are still written). Anything else (an unreachable endpoint, a wrong
key or model: `LLMEndpointError`; a bug) stops the run at once."""


def each_shard(context, materialize_shard: Callable[[str], MaterializeResult]) -> Iterator[MaterializeResult | AssetCheckEvaluation | Output]:
    """`materialize_shard(partition_key)` → its metadata and check results, for each partition of the run:
    one, or a range when the asset's backfill policy puts several shards in a run (`yield from` it; the
    assets set `output_required=False`). In a range each shard is recorded as materialized, with its own
    metadata and check results (against its partition; a failed blocking one still fails the step once
    every shard has run), as soon as it is written, and a shard that fails does not stop the others; the
    run then fails naming the failed shards, and the written ones stay recorded (automation moves on with them)."""
    keys = list(context.partition_keys)
    if len(keys) == 1:
        yield materialize_shard(keys[0])
        return
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    written, failed = [], {}
    for i, key in enumerate(keys, start=1):
        context.log.info(f"shard {i}/{len(keys)} of this run: {key}")
        try:
            result = materialize_shard(key)
        except SHARD_FAILURES as error:
            failed[key] = getattr(error, "description", None) or str(error)
            context.log.error(f"{key} failed: {failed[key]}")
            continue
        context.log_event(AssetMaterialization(asset_key=context.asset_key, partition=key, metadata=result.metadata,
                                               tags={"dagster/code_version": code_version} if code_version else None))
        for check in result.check_results or []:
            spec = context.assets_def.get_spec_for_check_key(AssetCheckKey(context.asset_key, check.check_name))
            yield AssetCheckEvaluation(asset_key=context.asset_key, check_name=check.check_name, passed=check.passed, metadata=check.metadata,
                                       severity=check.severity, description=check.description, blocking=spec.blocking, partition=key)
        written.append(key)
    for output_name, spec in context.assets_def.check_specs_by_output_name.items():  # each check's output once, for all its shards' results
        if spec.key in context.selected_asset_check_keys:
            yield Output(None, output_name=output_name)
    if failed:
        listed = "; ".join(f"{key}: {reason[:400]}" for key, reason in failed.items())
        raise Failure(f"{len(failed)} of {len(keys)} shards of this run failed ({listed}). The other {len(written)} were written and recorded: "
                      f"{', '.join(written) or 'none'}. Fix the failed ones' cause and materialize them again.")
