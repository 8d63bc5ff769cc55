"""Lineage is checked, not assumed: exemplars refuse activations of another corpus or with a missing
chunk, say how to fix it, and leave the finished exemplars as they were."""
import shutil

import pytest
from dagster import DagsterInstance

from tests.conftest import TINY_CODER, TINY_CORPUS_CONFIG, TINY_EXEMPLARS_CONFIG, make_resources
from tests.test_pipeline import run

PARTITION = f"{TINY_CODER}|00"
EXEMPLARS = {"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}}


def test_exemplars_refuse_stale_or_incomplete_activations_and_keep_their_results(registered, tmp_path):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("coder", [TINY_CODER])
    resources = make_resources(registered)
    run(["corpus"], None, resources, instance, {"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}})
    run(["activations"], TINY_CODER, resources, instance)
    run(["exemplars"], PARTITION, resources, instance, EXEMPLARS)
    finished = (registered / "exemplars" / TINY_CODER / "00.parquet").read_bytes()

    chunk = sorted((registered / "activations" / TINY_CODER / "shard-00").glob("chunk-*.safetensors"))[0]
    shutil.move(chunk, tmp_path / chunk.name)
    with pytest.raises(Exception, match=r"shard 00 is incomplete: its chunks hold \d+ activations where the latent statistics counted \d+.*Fix: re-materialize `activations`"):
        run(["exemplars"], PARTITION, resources, instance, EXEMPLARS)
    shutil.move(tmp_path / chunk.name, chunk)

    for changed in ({"seed": 1}, {"ctx_len": 32}):  # the corpus re-materialized under the cached activations
        run(["corpus"], None, resources, instance, {"ops": {"corpus": {"config": {**TINY_CORPUS_CONFIG, **changed}}}})
        with pytest.raises(Exception, match=r"cached on corpus \w+, but the corpus is now \w+.*Fix: re-materialize `activations`"):
            run(["exemplars"], PARTITION, resources, instance, EXEMPLARS)
    assert (registered / "exemplars" / TINY_CODER / "00.parquet").read_bytes() == finished
