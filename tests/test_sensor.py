"""A coder dropped into the registry becomes a partition and a run; the downstream stages follow."""
from dagster import AssetKey, DagsterInstance, Definitions, SkipReason, build_sensor_context, evaluate_automation_conditions, materialize

from autointerp_defs.deployments import CPU_SCORERS
from autointerp_defs.sensors import registry_sensor
from resources.settings import AutointerpSettings
from tests.conftest import TINY_CODER, TINY_CORPUS_CONFIG, make_resources
from tests.test_pipeline import ALL_ASSETS


def test_new_coder_adds_partition_requests_run_then_downstream_follows(registered):
    instance = DagsterInstance.ephemeral()
    resources = make_resources(registered)
    materialize(ALL_ASSETS, selection=["corpus"], resources=resources, instance=instance, run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}})

    with build_sensor_context(instance=instance, resources={"settings": resources["settings"]}) as context:
        result = registry_sensor(context)
    assert [r.partition_key for r in result.run_requests] == [TINY_CODER]
    assert result.run_requests[0].asset_selection == [AssetKey("activations")]
    assert result.dynamic_partitions_requests[0].partition_keys == [TINY_CODER]

    instance.add_dynamic_partitions("coder", list(result.dynamic_partitions_requests[0].partition_keys))
    defs = Definitions(assets=ALL_ASSETS, resources=resources)
    before = evaluate_automation_conditions(defs=defs, instance=instance)
    assert requested(before, "exemplars") == 0  # nothing downstream runs while activations are missing

    for request in result.run_requests:
        selection = [key.to_user_string() for key in request.asset_selection]
        assert materialize(ALL_ASSETS, selection=selection, partition_key=request.partition_key, resources=resources, instance=instance).success
    assert TINY_CODER in instance.get_materialized_partitions(AssetKey("activations"))
    with build_sensor_context(instance=instance, resources={"settings": resources["settings"]}) as context:
        assert isinstance(registry_sensor(context), SkipReason)

    after = evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    # every shard of the new coder, each stage requested with the stage it waits on
    assert requested(after, "exemplars") == requested(after, "explanations") == 8
    assert all(requested(after, f"scores/{name}") == 8 for name in CPU_SCORERS)  # the local deployment's automated scorers
    assert requested(after, "scores/simulation") == requested(after, "scores/intruder") == 0  # run on request only
    again = evaluate_automation_conditions(defs=defs, instance=instance, cursor=after.cursor)
    assert requested(again, "exemplars") == 0  # requested once, not on every tick


def requested(evaluation, asset: str) -> int:
    return sum(r.true_subset.size for r in evaluation.results if r.key == AssetKey.from_user_string(asset))


def test_missing_registry_makes_the_sensor_skip_with_the_fix(tmp_path):
    with build_sensor_context(instance=DagsterInstance.ephemeral(), resources={"settings": AutointerpSettings(data_dir=str(tmp_path))}) as context:
        skipped = registry_sensor(context)
    assert isinstance(skipped, SkipReason)
    assert f"{tmp_path}/registry does not exist. Fix: run `autointerp register-embedded`" in skipped.skip_message
