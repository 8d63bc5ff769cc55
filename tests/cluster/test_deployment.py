"""A deployment with `[settings] coordination_url` runs the stages as before, and coordinates through
the database instead of files: no coder lock file, no endpoint slot files, no SQLite response
cache under the data root; a second run of the same stages asks the endpoint nothing."""

from dagster import DagsterInstance, materialize

from resources.settings import AutointerpSettings
from tests.conftest import (
    TINY_CODER,
    TINY_CORPUS_CONFIG,
    TINY_EXEMPLARS_CONFIG,
    add_coders,
    all_assets,
    llm_resource,
    make_resources,
)
from tests.scripted_llm_server import ScriptedLLMServer, good_answers


def test_the_stages_coordinate_through_the_database_and_not_the_data_root(
    registered, coordination_url
):
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    with ScriptedLLMServer(good_answers) as server:
        resources = make_resources(registered, max_latents=3, llm=llm_resource(server))
        settings = resources["settings"]
        resources["settings"] = AutointerpSettings(
            data_dir=settings.data_dir,
            max_latents_per_shard=settings.max_latents_per_shard,
            latents_per_shard=settings.latents_per_shard,
            coordination_url=coordination_url,
        )

        def run(selection, config=None):
            return materialize(
                all_assets(),
                selection=selection,
                partition_key=f"{TINY_CODER}|00" if selection != ["corpus"] else None,
                resources=resources,
                instance=instance,
                run_config={"ops": {selection[0]: {"config": config}}} if config else {},
            )

        assert run(["corpus"], TINY_CORPUS_CONFIG).success
        assert run(["activations"]).success
        assert run(["exemplars"], TINY_EXEMPLARS_CONFIG).success
        assert run(["explanations", "scores/detection"]).success
        asked = len(server.requests)
        assert run(["explanations", "scores/detection"]).success
    assert (
        asked and len(server.requests) == asked
    )  # the second run's answers all came from the shared cache
    assert (
        not (registered / "activations" / ".locks").exists()
        and not (registered / "llm_cache").exists()
    )
