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

from dagster import DynamicPartitionsDefinition

from storage.activations import shard_count, shard_keys

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
