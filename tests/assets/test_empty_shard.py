"""A shard with no explainable latent gives valid, typed, empty tables, and every stage after it copes."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize

from assets.scorers import SCORERS
from storage.layout import DataRoot
from tests.conftest import (
    TINY_CODER,
    TINY_CORPUS_CONFIG,
    TINY_EXEMPLARS_CONFIG,
    add_coders,
    all_assets,
    make_resources,
)
from tests.conftest import llm_resource as resource
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt

ALL_ASSETS = all_assets()

SCORER_KEYS = [f"scores/{name}" for name in SCORERS]
NO_LATENT_QUALIFIES = {**TINY_EXEMPLARS_CONFIG, "min_activating_windows": 10**9}


def typed_columns(path) -> dict[str, pa.DataType]:
    schema = pq.read_schema(path)
    return {name: schema.field(name).type for name in schema.names}


def same_kind(empty: pa.DataType, full: pa.DataType) -> bool:
    """The same type; or both numbers (counts are float in an empty table, as a column with NaN is); or a list
    that pandas wrote untyped (a list column whose every list was empty)."""
    numbers = (pa.types.is_integer(full) or pa.types.is_floating(full)) and pa.types.is_floating(
        empty
    )
    untyped_list = (
        pa.types.is_list(full) and pa.types.is_null(full.value_type) and pa.types.is_list(empty)
    )
    return empty == full or numbers or untyped_list


@pytest.mark.slow(70)
def test_shard_without_explainable_latent_gives_typed_empty_tables_and_a_summary(registered):
    """Over a minute: every scorer (the steering ones run the subject model on the CPU) scores a full shard too,
    whose tables are the types each empty table must match."""
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    root = DataRoot.at(registered)
    with ScriptedLLMServer(answer_by_prompt) as server:
        resources = make_resources(registered, max_latents=2, llm=resource(server))

        def run(selection, partition, exemplars_config=TINY_EXEMPLARS_CONFIG):
            config = (
                {"ops": {"exemplars": {"config": exemplars_config}}}
                if "exemplars" in selection
                else {}
            )
            result = materialize(
                ALL_ASSETS,
                selection=selection,
                partition_key=partition,
                resources=resources,
                instance=instance,
                run_config=config,
            )
            assert result.success
            return result

        materialize(
            ALL_ASSETS,
            selection=["corpus"],
            resources=resources,
            instance=instance,
            run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
        )
        run(["activations"], f"{TINY_CODER}|00")
        empty = run(
            ["exemplars", "explanations", *SCORER_KEYS], f"{TINY_CODER}|01", NO_LATENT_QUALIFIES
        )  # `explainable_latents` warns, blocks nothing
        nothing = run(["score_summary"], None)  # only the empty shard is scored yet
        assert typed_columns(root.score_summary_path(TINY_CODER)) == {
            "latent": pa.int64(),
            "shard": pa.large_string(),
            "explanation": pa.large_string(),
            "mean_gap": pa.float64(),
            "stale": pa.large_string(),
            "senses": pa.int64(),
        }
        assert (
            nothing.asset_materializations_for_node("score_summary")[0].metadata["latents"].value
            == 0
        )
        assert not server.requests  # an empty shard is no work for the LLM
        run(["exemplars", "explanations", *SCORER_KEYS], f"{TINY_CODER}|00")
        summary = run(["score_summary"], None)

    def metadata(node):
        return {
            k: v.value for k, v in empty.asset_materializations_for_node(node)[0].metadata.items()
        }

    assert metadata("exemplars")["latents_with_exemplars"] == 0
    assert "no explainable latent" in metadata("exemplars")["note"]
    assert (
        metadata("explanations")["explained"] == 0
        and "no explainable latent" in metadata("explanations")["note"]
    )
    for name in SCORERS:
        assert metadata(f"scores__{name}")["latents_scored"] == 0
        assert metadata(f"scores__{name}")["verdict"] == "empty shard: no explainable latent"

    tables = [root.exemplars_path, root.latent_profiles_path, root.explanations_path]
    tables += [lambda c, s, n=name: root.scores_path(c, s, n) for name in SCORERS]
    tables += [lambda c, s, n=name: root.scored_examples_path(c, s, n) for name in SCORERS]
    for path_of in tables:
        full, none = path_of(TINY_CODER, "00"), path_of(TINY_CODER, "01")
        assert pq.read_metadata(none).num_rows == 0 and pq.read_metadata(full).num_rows > 0
        empty_types, full_types = typed_columns(none), typed_columns(full)
        assert empty_types and not any(pa.types.is_null(t) for t in empty_types.values()), none
        assert set(empty_types) <= set(full_types), (
            none
        )  # simulation's examples add columns of their own
        for column, kind in empty_types.items():
            assert same_kind(kind, full_types[column]), (none, column, kind, full_types[column])

    table = pq.read_table(root.score_summary_path(TINY_CODER)).to_pandas()
    assert set(table["shard"]) == {"00"} and len(table) == 2
    assert (
        summary.asset_materializations_for_node("score_summary")[0].metadata["latents"].value == 2
    )

    # a deleted scores table drops out of the summary (no file is newer than the summary: contents decide)
    assert (
        run(["score_summary"], None)
        .asset_materializations_for_node("score_summary")[0]
        .metadata["rebuilt"]
        .value
        == "none (no scores changed)"
    )
    root.scores_path(TINY_CODER, "00", "detection").unlink()
    rebuilt = (
        run(["score_summary"], None).asset_materializations_for_node("score_summary")[0].metadata
    )
    assert rebuilt["rebuilt"].value == TINY_CODER
    table = pq.read_table(root.score_summary_path(TINY_CODER)).to_pandas()
    assert (
        "detection" not in table.columns
        and {"fuzzing", "embedding"} <= set(table.columns)
        and len(table) == 2
    )
