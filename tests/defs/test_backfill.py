"""`[settings] partitions_per_run`: a backfill (or automation) puts several shards in one run, each
shard is written and recorded (with its own metadata) as if it had run alone, every stage of the
run's selection runs on them in turn, and a shard that fails lets the others finish and stay
recorded, and go through the later stages of the run without it."""
import pandas as pd
from dagster import (AssetExecutionContext, AssetKey, BackfillPolicy, DagsterEventType, DagsterInstance, Definitions, Failure, MaterializeResult,
                     ReexecutionOptions, asset, define_asset_job, execute_job, in_process_executor, materialize, reconstructable)

from assets import explanations as explanations_module
from assets.partitions import coder_and_shard, each_shard, shard_partitions
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


def judge(messages):
    """Explains every latent, and marks every other window of a detection prompt as activating."""
    if "Description" not in messages[-1]["content"]:
        return explainer(messages)
    return str([i % 2 for i in range(messages[-1]["content"].count("\nExample "))])


STAGES = [AssetKey("exemplars"), AssetKey("explanations"), AssetKey(["scores", "detection"])]


def test_a_ranged_run_materializes_every_stage_of_its_selection_for_each_shard_in_order(registered, monkeypatch):
    defs = build_definitions("local", {"settings": {"partitions_per_run": 3}})
    assets = list(defs.assets)
    instance = DagsterInstance.ephemeral()
    keys = add_coders(instance, registered, TINY_CODER)[:3]
    resources = make_resources(registered, max_latents=2)
    assert materialize(assets, selection=["corpus"], resources=resources, instance=instance, run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}}).success
    assert materialize(assets, selection=["activations"], resources=resources, instance=instance, tags=ranged(keys[0], keys[-1])).success
    selection = [key.to_user_string() for key in STAGES]
    with ScriptedLLMServer(judge) as server:
        resources = make_resources(registered, max_latents=2, llm=resource(server))
        result = materialize(assets, selection=selection, resources=resources, instance=instance, tags=ranged(keys[0], keys[-1]),
                             run_config={"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}})
    assert result.success and not [event for event in result.all_events if event.event_type_value == "STEP_SKIPPED"]
    recorded = [(entry.dagster_event.asset_key, entry.dagster_event.partition, entry.dagster_event.step_materialization_data.materialization.metadata)
                for entry in instance.all_logs(result.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)]
    assert [(asset, partition) for asset, partition, _ in recorded] == [(asset, key) for asset in STAGES for key in keys]  # once each, stage by stage
    assert all(metadata for _, _, metadata in recorded)  # each with its shard's own metadata
    for asset in STAGES:
        assert set(instance.get_materialized_partitions(asset)) == set(keys)
    root = DataRoot.at(registered)
    for key in keys:
        assert len(pd.read_parquet(root.scores_path(*key.split("|"), "detection"))) == 2

    # the middle shard's explanations fail this time: the scorer still runs on the other two in this run, and fails
    # the middle one without scoring the explanations it holds from before
    def middle_fails(partition_key):
        if partition_key == keys[1]:
            raise Failure("scripted failure of the middle shard")
        return coder_and_shard(partition_key)

    monkeypatch.setattr(explanations_module, "coder_and_shard", middle_fails)
    middle_scores = root.scores_path(*keys[1].split("|"), "detection").read_bytes()
    with ScriptedLLMServer(judge) as server:
        resources = make_resources(registered, max_latents=2, llm=resource(server))
        result = materialize(assets, selection=selection[1:], resources=resources, instance=instance, tags=ranged(keys[0], keys[-1]), raise_on_error=False)
    assert not result.success
    recorded = [(entry.dagster_event.asset_key, entry.dagster_event.partition) for entry in instance.all_logs(result.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)]
    assert recorded == [(asset, key) for asset in STAGES[1:] for key in (keys[0], keys[2])]
    failures = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"]
    assert [event.step_key for event in failures] == ["scores__detection"]  # the last stage of the run fails it
    message = failures[0].event_specific_data.error.message
    assert f"1 of 3 shards of this run failed ({keys[1]}: its explanations failed earlier in this run)" in message
    assert f"written and recorded: {keys[0]}, {keys[2]}" in message
    assert root.scores_path(*keys[1].split("|"), "detection").read_bytes() == middle_scores


@asset(partitions_def=shard_partitions, backfill_policy=BackfillPolicy.multi_run(3), output_required=False)
def upper(context: AssetExecutionContext):
    def shard(key):
        if key.endswith("|01"):
            raise Failure("scripted failure of the middle shard")
        return MaterializeResult(metadata={"shard": key})

    yield from each_shard(context, shard)


@asset(partitions_def=shard_partitions, backfill_policy=BackfillPolicy.multi_run(3), output_required=False, deps=[upper])
def lower(context: AssetExecutionContext):
    yield from each_shard(context, lambda key: MaterializeResult(metadata={"shard": key}))


def upper_and_lower():
    return Definitions(assets=[upper, lower], jobs=[define_asset_job("upper_and_lower", executor_def=in_process_executor)]).resolve_job_def("upper_and_lower")


def test_a_reexecution_from_failure_does_not_run_a_shard_whose_input_failed_in_the_run_it_reexecutes(tmp_path):
    keys = ["c|00", "c|01", "c|02"]
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        instance.add_dynamic_partitions("shard", keys)
        with execute_job(reconstructable(upper_and_lower), instance, tags=ranged(keys[0], keys[-1])) as first:
            assert not first.success
            assert [event.step_key for event in first.all_events if event.event_type_value == "STEP_FAILURE"] == ["lower"]
        # `upper` succeeded, so re-executing from failure runs `lower` alone: it must not take the middle shard's `upper` as written
        with execute_job(reconstructable(upper_and_lower), instance, tags=ranged(keys[0], keys[-1]),
                         reexecution_options=ReexecutionOptions.from_failure(first.run_id, instance)) as again:
            assert not again.success
            recorded = instance.all_logs(again.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
            assert [(entry.dagster_event.asset_key, entry.dagster_event.partition) for entry in recorded] == [(lower.key, keys[0]), (lower.key, keys[2])]
            message = next(event for event in again.all_events if event.event_type_value == "STEP_FAILURE").event_specific_data.error.message
            assert f"1 of 3 shards of this run failed ({keys[1]}: its upper failed in run {first.run_id}, which this run re-executes)" in message
