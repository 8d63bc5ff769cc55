"""A coder dropped into the registry becomes a partition and a run; the downstream stages follow."""
import pytest
from dagster import AssetKey, DagsterInstance, SkipReason, build_sensor_context, evaluate_automation_conditions, materialize

from autointerp_defs.sensors import registry_sensor
from resources.settings import AutointerpSettings
from tests.conftest import TINY_CODER, TINY_CORPUS_CONFIG, make_resources
from tests.test_pipeline import ALL_ASSETS


def test_new_coder_adds_partition_requests_run_then_downstream_follows(registered):
    from dagster import Definitions

    instance = DagsterInstance.ephemeral()
    resources = make_resources(registered)
    materialize(ALL_ASSETS, selection=["corpus"], resources=resources, instance=instance, run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}})

    context = build_sensor_context(instance=instance, resources={"settings": resources["settings"]})
    result = registry_sensor(context)
    assert [r.partition_key for r in result.run_requests] == [TINY_CODER]
    assert result.run_requests[0].asset_selection == [AssetKey("activations")]
    assert result.dynamic_partitions_requests[0].partition_keys == [TINY_CODER]

    instance.add_dynamic_partitions("coder", list(result.dynamic_partitions_requests[0].partition_keys))
    for request in result.run_requests:
        done = materialize(ALL_ASSETS, selection=[k.to_user_string() for k in request.asset_selection], partition_key=request.partition_key, resources=resources, instance=instance)
        assert done.success

    again = registry_sensor(build_sensor_context(instance=instance, resources={"settings": resources["settings"]}))
    assert isinstance(again, SkipReason)

    defs = Definitions(assets=ALL_ASSETS, resources=resources)
    evaluation = evaluate_automation_conditions(defs=defs, instance=instance)
    requested = {(r.key.to_user_string(), r.partition_key) for r in evaluation.results if r.true_subset.size}
    exemplar_partitions = {pk for key, pk in requested if key == "exemplars"} if False else None
    requested_exemplars = [r for r in evaluation.results if r.key == AssetKey("exemplars")][0]
    assert requested_exemplars.true_subset.size == 8  # every shard of the new coder
    assert all(r.true_subset.size == 0 for r in evaluation.results if r.key in (AssetKey("explanations"), AssetKey("scores")))


def test_missing_registry_stops_the_sensor_with_the_fix(tmp_path):
    context = build_sensor_context(instance=DagsterInstance.ephemeral(), resources={"settings": AutointerpSettings(data_dir=str(tmp_path))})
    with pytest.raises(Exception, match=r"registry directory .* does not exist\. Fix"):
        registry_sensor(context)
