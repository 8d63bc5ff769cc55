"""The explanations asset keeps its embedder's LanceDB table in step with the shard's explanations table:
a latent explained before and not now is no longer found by search."""

import lancedb
import pandas as pd
from dagster import DagsterInstance, materialize

from resources.embedder import EmbedderResource
from storage.layout import DataRoot
from storage.store import TableStore
from storage.vector_store import explanations_table_name, search_explanations
from tests.conftest import (
    TINY_CODER,
    add_coders,
    all_assets,
    make_resources,
    pipeline_until_exemplars,
)
from tests.conftest import llm_resource as resource
from tests.scripted_llm_server import ScriptedLLMServer


def explainer(messages):
    return "Explanation: a scripted explanation"


def test_a_latent_no_longer_explained_leaves_the_search_table(registered):
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    root, key, embedder = DataRoot.at(registered), f"{TINY_CODER}|00", EmbedderResource()
    with ScriptedLLMServer(explainer) as server:
        for max_latents in (3, 1):  # the second run explains one latent of the three
            resources = make_resources(registered, max_latents=max_latents, llm=resource(server))
            assert materialize(
                all_assets(),
                selection=["explanations"],
                partition_key=key,
                resources=resources,
                instance=instance,
            ).success
            table = pd.read_parquet(root.explanations_path(TINY_CODER, "00"))
            ok = table[table["status"] == "ok"]
            rows = (
                lancedb.connect(str(root.lancedb_dir))
                .open_table(explanations_table_name(embedder.model))
                .to_pandas()
            )
            assert sorted(rows["latent"]) == sorted(ok["latent"]) and len(ok) == max_latents
    hits = search_explanations(
        TableStore(root), embedder.model, embedder.embed(["a scripted explanation"])[0], limit=10
    )
    assert [hit["latent"] for hit in hits] == ok["latent"].tolist()
