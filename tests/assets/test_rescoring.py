"""Changing one scorer's settings re-runs that scorer only, and no prompt is ever sent twice."""

import asyncio
import json

import pandas as pd
from dagster import AssetKey, DagsterInstance, evaluate_automation_conditions, materialize

from assets.prompts import FUZZING_SYSTEM
from assets.scorers import SCORERS, ScorerDeps, scorer_settings
from assets.scores import score_partition
from autointerp_defs.definitions import build_definitions
from resources.llm import LLMResource
from tests.conftest import TINY_CODER, add_coders, make_resources, pipeline_until_exemplars
from tests.conftest import llm_resource as resource
from tests.scripted_llm_server import ScriptedLLMServer

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
    return {
        key.to_user_string(): {str(p) for p in evaluation.get_requested_partitions(key)}
        for key in keys
        if evaluation.get_requested_partitions(key)
    }


def test_changed_scorer_settings_rerun_only_that_scorer_and_repeat_no_request(registered):
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    before = build_definitions("local")
    with ScriptedLLMServer(judge) as server:
        resources = make_resources(registered, max_latents=3, llm=resource(server))
        # every automated scorer of the partition, so that none is missing (missing ones are requested anyway)
        assert materialize(
            list(before.assets),
            selection=["explanations", *LLM_SCORERS, "scores/embedding"],
            partition_key=PARTITION,
            resources=resources,
            instance=instance,
        ).success
        first_requests = len(server.requests)
        detection_run = instance.get_latest_materialization_event(
            AssetKey(["scores", "detection"])
        ).run_id
        settled = evaluate_automation_conditions(defs=before, instance=instance)

        after = build_definitions("local", {"scorers": {"fuzzing": {"examples_per_prompt": 4}}})
        graph_before, graph_after = before.resolve_asset_graph(), after.resolve_asset_graph()
        changed = {
            k.to_user_string()
            for k in graph_after.get_all_asset_keys()
            if graph_after.get(k).code_version != graph_before.get(k).code_version
        }
        assert changed == {"scores/fuzzing"}

        evaluation = evaluate_automation_conditions(
            defs=after, instance=instance, cursor=settled.cursor
        )
        stale = {
            key: {PARTITION}
            for key, partitions in requested(evaluation, after).items()
            if PARTITION in partitions
        }
        assert stale == {
            "scores/fuzzing": {PARTITION}
        }  # nothing else of this partition is re-run (the other, missing shards are requested)

        rerun = materialize(
            list(after.assets),
            selection=sorted(stale),
            partition_key=PARTITION,
            resources=resources,
            instance=instance,
        )
        assert rerun.success
        new_requests = server.requests[first_requests:]
        assert new_requests and all(
            r["messages"][0]["content"] == FUZZING_SYSTEM for r in new_requests
        )
        assert (
            instance.get_latest_materialization_event(AssetKey(["scores", "detection"])).run_id
            == detection_run
        )

        # every unchanged scorer re-materialized from scratch: answered by the response cache
        again = materialize(
            list(after.assets),
            selection=LLM_SCORERS,
            partition_key=PARTITION,
            resources=resources,
            instance=instance,
        )
        assert again.success and len(server.requests) == first_requests + len(new_requests)
        for key in LLM_SCORERS:
            assert (
                again.asset_materializations_for_node(key.replace("/", "__"))[0]
                .metadata["llm_requests"]
                .value
                == 0
            )

    prompts = [
        json.dumps(r["messages"], sort_keys=True) + str(r.get("max_tokens"))
        for r in server.requests
    ]
    assert len(prompts) == len(set(prompts))  # no request was ever repeated
    settled_again = requested(
        evaluate_automation_conditions(defs=after, instance=instance, cursor=evaluation.cursor),
        after,
    )
    assert not any(
        PARTITION in partitions
        for key, partitions in settled_again.items()
        if key.startswith("scores/")
    )  # handled once


def test_a_new_control_assignment_rescores_once_every_scorer_whose_control_is_another_explanation():
    graph = build_definitions("local").resolve_asset_graph()
    versions = {
        key.to_user_string(): graph.get(key).code_version
        for key in graph.get_all_asset_keys()
        if key.path[0] == "scores"
    }
    assert versions["scores/detection"].startswith("1+controls2-") and versions[
        "scores/simulation"
    ].startswith("2+controls2-")
    assert not versions["scores/intruder"].startswith(
        "1+controls"
    )  # its control is the same tasks without an intruder
    assert all(
        "+controls2-" in version for key, version in versions.items() if key != "scores/intruder"
    )


def test_re_explaining_one_latent_of_1024_re_asks_only_its_questions_and_one_neighbours_control(
    tmp_path,
):
    """Latent 500's explanation had failed and is explained now, then explained otherwise: each time every other
    latent's own and control questions are the prompts they were, answered by the response cache."""
    vocab = [f" w{i}" for i in range(1100)]
    rows = [
        {
            "latent": latent,
            "split": "test",
            "kind": kind,
            "quantile": 1 if kind == "activating" else 0,
            "tokens": [latent, 1050 + i],
            "activations": [1.0 if kind == "activating" else 0.0, 0.0],
        }
        for latent in range(1024)
        for i, kind in enumerate(["activating", "random"])
    ]
    exemplars = pd.DataFrame(rows).assign(
        sequence=0, start=0, max_activation=lambda f: f["activations"].map(max)
    )
    explained = pd.DataFrame(
        {
            "latent": range(1024),
            "explanation": [f"the word w{latent}" for latent in range(1024)],
            "status": "ok",
        }
    )
    settings = scorer_settings()["detection"]

    def score(server, explanations) -> tuple[pd.DataFrame, list[str]]:
        """The scores, and the prompts this run sent."""
        sent = len(server.requests)
        client = LLMResource(
            backend="openai", base_url=server.base_url, model="m", cache_dir=str(tmp_path)
        ).client()
        frame, _ = asyncio.run(
            score_partition(
                SCORERS["detection"](settings, ScorerDeps(llm=client)),
                exemplars,
                explanations,
                vocab,
            )
        )
        return frame, [r["messages"][-1]["content"] for r in server.requests[sent:]]

    def moved(before: pd.DataFrame, after: pd.DataFrame) -> set[int]:
        both = after.merge(before, on="latent")
        return set(both.latent[both.control_explanation_x != both.control_explanation_y])

    with ScriptedLLMServer(lambda messages: "[1, 0]") as server:
        failed, asked = score(
            server, explained.assign(status=lambda f: f.status.where(f.latent != 500, "failed"))
        )
        assert len(asked) == 2 * 1023 and (failed.n_failed == 0).all()
        gained, asked = score(
            server,
            explained.assign(
                explanation=lambda f: f.explanation.where(f.latent != 500, "the letter w")
            ),
        )
        neighbour = gained.latent[gained.control_explanation == "the letter w"].item()
        assert (
            len(asked) <= 3 and sum("the letter w" in prompt for prompt in asked) == 2
        )  # 500's own and its neighbour's control; 500's control
        assert len(moved(failed, gained)) == 1
        changed, asked = score(
            server,
            explained.assign(
                explanation=lambda f: f.explanation.where(f.latent != 500, "the letter v")
            ),
        )
    assert len(asked) == 2 and all(
        "the letter v" in prompt for prompt in asked
    )  # 500's own, its neighbour's control
    assert moved(gained, changed) == {neighbour}
