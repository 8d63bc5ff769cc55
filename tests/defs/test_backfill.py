"""`[settings] partitions_per_run`: a backfill (or automation) puts several shards in one run, each
shard is written and recorded (with its own metadata) as if it had run alone, and a shard that fails
lets the others finish and stay recorded."""
import pandas as pd
from dagster import AssetKey, BackfillPolicy, DagsterEventType, DagsterInstance, materialize

from autointerp_defs.definitions import build_definitions
from storage.layout import DataRoot
from storage.tables import empty_table, write_table
from tests.conftest import TINY_CODER, TINY_CORPUS_CONFIG, TINY_EXEMPLARS_CONFIG, add_coders, make_resources
from tests.conftest import llm_resource as resource
from tests.scripted_llm_server import ScriptedLLMServer


def explainer(messages):
    return "Explanation: a scripted explanation"


def ranged(first: str, last: str) -> dict:
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}  # Dagster's documented range tags


def test_several_shards_per_run_and_a_failed_shard_spares_the_others(registered):
    defs = build_definitions("local", {"settings": {"partitions_per_run": 3}})
    graph = defs.resolve_asset_graph()
    for key in (AssetKey("exemplars"), AssetKey("explanations"), AssetKey(["scores", "detection"])):
        assert graph.get(key).backfill_policy == BackfillPolicy.multi_run(3)
    assert build_definitions("local").resolve_asset_graph().get(AssetKey("explanations")).backfill_policy is None  # default: one shard a run
    assets = list(defs.assets)
    instance = DagsterInstance.ephemeral()
    keys = add_coders(instance, registered, TINY_CODER)[:3]
    resources = make_resources(registered, max_latents=2)
    assert materialize(assets, selection=["corpus"], resources=resources, instance=instance, run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}}).success
    assert materialize(assets, selection=["activations"], resources=resources, instance=instance, tags=ranged(keys[0], keys[-1])).success

    # a backfill of the three shards under this policy is one run with the range tags (as Dagster's backfill daemon launches it)
    exemplars = materialize(assets, selection=["exemplars"], resources=resources, instance=instance, tags=ranged(keys[0], keys[-1]),
                            run_config={"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}})
    assert exemplars.success
    assert set(instance.get_materialized_partitions(AssetKey("exemplars"))) == set(keys)
    recorded = {m.partition: m.metadata for m in exemplars.asset_materializations_for_node("exemplars")}
    assert sorted(recorded) == sorted(keys) and all(recorded[key]["path"].value.endswith(f"{key.split('|')[1]}.parquet") for key in keys)  # each shard's own metadata
    checked = {e.partition: e for e in exemplars.get_asset_check_evaluations()}
    assert sorted(checked) == sorted(keys) and all(e.check_name == "explainable_latents" and e.passed for e in checked.values())  # each shard's own check
    root = DataRoot.at(registered)
    assert all(root.exemplars_path(*key.split("|")).exists() for key in keys)

    # the middle shard's exemplars are gone: its explanations fail, the other two are written, the run names it
    root.exemplars_path(*keys[1].split("|")).unlink()
    with ScriptedLLMServer(explainer) as server:
        resources = make_resources(registered, max_latents=2, llm=resource(server))
        result = materialize(assets, selection=["explanations"], resources=resources, instance=instance, tags=ranged(keys[0], keys[-1]), raise_on_error=False)
    assert not result.success
    assert set(instance.get_materialized_partitions(AssetKey("explanations"))) == {keys[0], keys[2]}  # the written shards are recorded
    failure = next(event for event in result.all_events if event.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert f"1 of 3 shards of this run failed ({keys[1]}: No exemplars" in message and f"written and recorded: {keys[0]}, {keys[2]}" in message
    for key in (keys[0], keys[2]):
        table = pd.read_parquet(root.explanations_path(*key.split("|")))
        assert len(table) == 2 and (table.explanation == "a scripted explanation").all()
    assert not root.explanations_path(*keys[1].split("|")).exists()

    # the middle shard's exemplars come back and all three are explained; then its exemplars are empty, where its
    # explanations hold rows: that shard's write would empty a finished table, which fails it alone
    assert materialize(assets, selection=["exemplars"], resources=resources, instance=instance, partition_key=keys[1],
                       run_config={"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}}).success
    with ScriptedLLMServer(explainer) as server:
        resources = make_resources(registered, max_latents=2, llm=resource(server))
        assert materialize(assets, selection=["explanations"], resources=resources, instance=instance, tags=ranged(keys[0], keys[-1])).success
        write_table(empty_table("exemplars"), root.exemplars_path(*keys[1].split("|")), "exemplars")
        result = materialize(assets, selection=["explanations"], resources=resources, instance=instance, tags=ranged(keys[0], keys[-1]), raise_on_error=False)
    assert not result.success
    recorded = instance.all_logs(result.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
    assert sorted(entry.dagster_event.partition for entry in recorded) == [keys[0], keys[2]]  # written and recorded in this run
    message = next(event for event in result.all_events if event.event_type_value == "STEP_FAILURE").event_specific_data.error.message
    assert f"1 of 3 shards of this run failed ({keys[1]}: explanations of {keys[1].replace('|', ' shard ')}: this run has no results" in message
    assert len(pd.read_parquet(root.explanations_path(*keys[1].split("|")))) == 2  # the finished table is kept
