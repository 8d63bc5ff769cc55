"""Changing one scorer's settings re-runs that scorer only, and no prompt is ever sent twice."""
import json

from dagster import AssetKey, DagsterInstance, evaluate_automation_conditions, materialize

from assets.prompts import FUZZING_SYSTEM
from autointerp_defs.definitions import build_definitions
from tests.conftest import add_coders, TINY_CODER, make_resources
from tests.scripted_llm_server import ScriptedLLMServer
from tests.conftest import llm_resource as resource
from tests.conftest import pipeline_until_exemplars

PARTITION = f"{TINY_CODER}|00"
LLM_SCORERS = ["scores/detection", "scores/fuzzing"]


def judge(messages):
    if "Description" not in messages[-1]["content"]:
        return "Explanation: a scripted explanation"
    n = messages[-1]["content"].count("\nExample ")
    return str([i % 2 for i in range(n)])


def requested(evaluation, defs) -> dict[str, set[str]]:
    """Asset → partitions that the automation tick asked to run."""
    keys = defs.resolve_asset_graph().get_all_asset_keys()
    return {key.to_user_string(): {str(p) for p in evaluation.get_requested_partitions(key)} for key in keys if evaluation.get_requested_partitions(key)}


def test_changed_scorer_settings_rerun_only_that_scorer_and_repeat_no_request(registered):
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    before = build_definitions("local")
    with ScriptedLLMServer(judge) as server:
        resources = make_resources(registered, max_latents=3, llm=resource(server))
        # every automated scorer of the partition, so that none is missing (missing ones are requested anyway)
        assert materialize(list(before.assets), selection=["explanations", *LLM_SCORERS, "scores/embedding"], partition_key=PARTITION, resources=resources, instance=instance).success
        first_requests = len(server.requests)
        detection_run = instance.get_latest_materialization_event(AssetKey(["scores", "detection"])).run_id
        settled = evaluate_automation_conditions(defs=before, instance=instance)

        after = build_definitions("local", {"scorers": {"fuzzing": {"examples_per_prompt": 4}}})
        graph_before, graph_after = before.resolve_asset_graph(), after.resolve_asset_graph()
        changed = {k.to_user_string() for k in graph_after.get_all_asset_keys() if graph_after.get(k).code_version != graph_before.get(k).code_version}
        assert changed == {"scores/fuzzing"}

        evaluation = evaluate_automation_conditions(defs=after, instance=instance, cursor=settled.cursor)
        stale = {key: {PARTITION} for key, partitions in requested(evaluation, after).items() if PARTITION in partitions}
        assert stale == {"scores/fuzzing": {PARTITION}}  # nothing else of this partition is re-run (the other, missing shards are requested)

        rerun = materialize(list(after.assets), selection=sorted(stale), partition_key=PARTITION, resources=resources, instance=instance)
        assert rerun.success
        new_requests = server.requests[first_requests:]
        assert new_requests and all(r["messages"][0]["content"] == FUZZING_SYSTEM for r in new_requests)
        assert instance.get_latest_materialization_event(AssetKey(["scores", "detection"])).run_id == detection_run

        # every unchanged scorer re-materialized from scratch: answered by the response cache
        again = materialize(list(after.assets), selection=LLM_SCORERS, partition_key=PARTITION, resources=resources, instance=instance)
        assert again.success and len(server.requests) == first_requests + len(new_requests)
        for key in LLM_SCORERS:
            assert again.asset_materializations_for_node(key.replace("/", "__"))[0].metadata["llm_requests"].value == 0

    prompts = [json.dumps(r["messages"], sort_keys=True) + str(r.get("max_tokens")) for r in server.requests]
    assert len(prompts) == len(set(prompts))  # no request was ever repeated
    settled_again = requested(evaluate_automation_conditions(defs=after, instance=instance, cursor=evaluation.cursor), after)
    assert not any(PARTITION in partitions for key, partitions in settled_again.items() if key.startswith("scores/"))  # handled once
