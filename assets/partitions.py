"""Partitions: a dynamic `coder` dimension (sparse coder × hookpoint) and static latent shards.

Kept beside the assets that use them (not in `autointerp_defs`) so that importing any asset module
never imports the `Definitions`, which import every asset.
"""
from __future__ import annotations

import warnings

from dagster import BetaWarning, DynamicPartitionsDefinition, MultiPartitionsDefinition, MultiToSingleDimensionPartitionMapping, StaticPartitionsDefinition

from storage.activations import shard_keys

N_SHARDS = 8

coder_partitions = DynamicPartitionsDefinition(name="coder")
shard_partitions = StaticPartitionsDefinition(shard_keys(N_SHARDS))
coder_shard_partitions = MultiPartitionsDefinition({"coder": coder_partitions, "shard": shard_partitions})

with warnings.catch_warnings():
    warnings.simplefilter("ignore", BetaWarning)  # the mapping is exactly what we need, beta or not
    CODER_DIMENSION = MultiToSingleDimensionPartitionMapping(partition_dimension_name="coder")
    """Between a `coder|shard` asset and a `coder` asset, either way: each shard reads its coder's
    activations; a coder's summary reads every shard of that coder."""


def coder_and_shard(partition_key) -> tuple[str, str]:
    """(coder, shard) of a `coder|shard` multi-partition key."""
    keys = partition_key.keys_by_dimension
    return keys["coder"], keys["shard"]
