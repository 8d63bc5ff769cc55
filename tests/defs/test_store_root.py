"""The table store owns where every table lives: pointed at another root, a partition runs end to end
there, makes the same results, and writes nothing under the root it was copied from."""

import shutil

import pandas as pd
from dagster import DagsterInstance, materialize

from storage.store import TableStore
from tests.conftest import TINY_EXEMPLARS_CONFIG, add_coders, make_resources
from tests.materialized_partition import MAX_LATENTS, LiteralJudge
from tests.scripted_llm_server import ScriptedLLMServer


def files_under(root):
    return {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


def test_a_partition_runs_end_to_end_under_another_store_root(partition, tmp_path):
    from autointerp_defs.definitions import build_definitions
    from resources.llm import LLMResource

    moved = tmp_path / "moved"
    for inputs in (
        "corpus",
        "registry",
        "activations",
    ):  # what the shard's stages read; no table comes along
        shutil.copytree(partition.root / inputs, moved / inputs)
    untouched = files_under(partition.root)

    instance = DagsterInstance.ephemeral()
    add_coders(instance, moved, partition.coder)
    with ScriptedLLMServer(LiteralJudge()) as server:
        llm = LLMResource(
            backend="openai", base_url=server.base_url, model="scripted-judge", max_concurrency=4
        )
        result = materialize(
            list(build_definitions("local").assets),
            selection=["exemplars", "explanations", "scores/detection", "score_summary"],
            partition_key=f"{partition.coder}|{partition.shard}",
            resources=make_resources(moved, max_latents=MAX_LATENTS, llm=llm),
            instance=instance,
            run_config={
                "ops": {
                    "exemplars": {"config": TINY_EXEMPLARS_CONFIG},
                    "explanations": {"config": {"best_of_n": 2}},
                }
            },
        )
    assert result.success
    assert (
        files_under(partition.root) == untouched
    )  # nothing written, replaced or left beside the first root's tables

    first, second = TableStore.at(partition.root), TableStore.at(moved)
    coder, shard = partition.coder, partition.shard
    pd.testing.assert_frame_equal(
        second.exemplars(coder, shard).read(), first.exemplars(coder, shard).read()
    )
    pd.testing.assert_frame_equal(
        second.latent_profiles(coder, shard).read(), first.latent_profiles(coder, shard).read()
    )
    explained = {
        name: store.explanations(coder, shard).read().set_index("latent")["explanation"]
        for name, store in (("first", first), ("second", second))
    }
    assert (
        explained["second"].to_dict() == explained["first"].to_dict()
        and len(explained["second"]) == MAX_LATENTS
    )
    columns = [
        "latent",
        "explanation",
        "control_explanation",
        "accuracy",
        "control_accuracy",
        "n_scored",
    ]
    pd.testing.assert_frame_equal(
        second.scores(coder, shard, "detection").read()[columns],
        first.scores(coder, shard, "detection").read()[columns],
    )
    assert (
        second.scored_examples(coder, shard, "detection").rows()
        and second.score_summary(coder).rows() == MAX_LATENTS
    )
    paths = [
        result.asset_materializations_for_node(node)[0].metadata["path"].value
        for node in ("exemplars", "explanations")
    ]
    assert all(path.startswith(str(moved)) for path in paths)
