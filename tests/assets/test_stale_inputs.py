"""Lineage is checked, not assumed: exemplars refuse activations of another corpus or with a missing
chunk, say how to fix it, and leave the finished exemplars as they were; an empty result never
replaces a full one unless that is asked for."""

import shutil

import pandas as pd
import pytest
from dagster import DagsterInstance

from resources.settings import AutointerpSettings
from tests.conftest import (
    TINY_CODER,
    TINY_CORPUS_CONFIG,
    TINY_EXEMPLARS_CONFIG,
    add_coders,
    make_resources,
    run,
)

PARTITION = f"{TINY_CODER}|00"
EXEMPLARS = {"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}}


def test_exemplars_refuse_stale_or_incomplete_activations_and_keep_their_results(
    registered, tmp_path
):
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    resources = make_resources(registered)
    run(["corpus"], None, resources, instance, {"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}})
    run(["activations"], f"{TINY_CODER}|00", resources, instance)
    run(["exemplars"], PARTITION, resources, instance, EXEMPLARS)
    finished = (registered / "exemplars" / TINY_CODER / "00.parquet").read_bytes()

    chunk = sorted(
        (registered / "activations" / TINY_CODER / "shard-00").glob("chunk-*.safetensors")
    )[0]
    shutil.move(chunk, tmp_path / chunk.name)
    with pytest.raises(
        Exception,
        match=r"shard 00 is incomplete: its chunks hold \d+ activations where the latent statistics "
        r"counted \d+.*Fix: delete .* and re-materialize `activations`",
    ):
        run(["exemplars"], PARTITION, resources, instance, EXEMPLARS)
    shutil.move(tmp_path / chunk.name, chunk)

    weights = registered / "registry" / "tiny-topk" / "model.layers.3" / "sae.safetensors"
    kept = weights.read_bytes()
    weights.write_bytes(kept)  # the coder copied in again after caching (new modification time)
    with pytest.raises(
        Exception,
        match=r"The coder tiny-topk/model.layers.3 in the registry changed after its activations "
        r"were cached.*Fix: re-materialize `activations`",
    ):
        run(["exemplars"], PARTITION, resources, instance, EXEMPLARS)
    run(["activations"], f"{TINY_CODER}|00", resources, instance)  # the fix, as the message says
    run(["exemplars"], PARTITION, resources, instance, EXEMPLARS)
    finished = (registered / "exemplars" / TINY_CODER / "00.parquet").read_bytes()

    for changed in (
        {"seed": 1},
        {"ctx_len": 32},
    ):  # the corpus re-materialized under the cached activations
        run(
            ["corpus"],
            None,
            resources,
            instance,
            {"ops": {"corpus": {"config": {**TINY_CORPUS_CONFIG, **changed}}}},
        )
        with pytest.raises(
            Exception,
            match=r"cached on corpus \w+, but the corpus is now \w+.*Fix: re-materialize `activations`",
        ):
            run(["exemplars"], PARTITION, resources, instance, EXEMPLARS)
    assert (registered / "exemplars" / TINY_CODER / "00.parquet").read_bytes() == finished

    # the same corpus again, and settings that leave no latent: an empty table never replaces a full one by itself
    run(["corpus"], None, resources, instance, {"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}})
    none_left = {
        "ops": {"exemplars": {"config": {**TINY_EXEMPLARS_CONFIG, "min_activating_windows": 10**6}}}
    }
    with pytest.raises(
        Exception,
        match=r"exemplars of .* shard 00: this run has no results, where .*00\.parquet holds \d+ rows; "
        r"the table is kept\. Fix: .*allow_empty_results",
    ):
        run(["exemplars"], PARTITION, resources, instance, none_left)
    assert (registered / "exemplars" / TINY_CODER / "00.parquet").read_bytes() == finished
    meant = {
        **resources,
        "settings": AutointerpSettings(data_dir=str(registered), allow_empty_results=True),
    }
    run(["exemplars"], PARTITION, meant, instance, none_left)
    assert pd.read_parquet(registered / "exemplars" / TINY_CODER / "00.parquet").empty
