"""Every result names the models that made it, and changing a model re-runs exactly what it shaped.

The models (subject model, explainer, judge, embedder) are part of the code versions of the stages
they define; the endpoint URL, key variable, concurrency and timeouts are not. The explainer and
the judge may be different models on different endpoints ([llm.explainer], [llm.judge]).
"""

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance, evaluate_automation_conditions, materialize

from autointerp_defs.definitions import build_definitions
from autointerp_defs.deployments import DeploymentError
from storage.layout import DataRoot
from tests.assets.test_rescoring import requested
from tests.conftest import (
    TEST_LATENTS_PER_SHARD,
    TINY_CODER,
    add_coders,
    pipeline_until_exemplars,
)
from tests.scripted_llm_server import ScriptedLLMServer

PARTITION = f"{TINY_CODER}|00"
LLM_SCORERS = {
    "scores/detection",
    "scores/fuzzing",
    "scores/intruder",
    "scores/simulation",
    "scores/output_judge",
    "scores/saebench",
}
EXPLANATION = "Explanation: words about files"


def endpoint(url: str, model: str = "strong", **extra) -> dict:
    return {
        "llm": {
            "backend": "openai",
            "base_url": url,
            "model": model,
            "api_key_env": "AUTOINTERP_TEST_KEY",
            **extra,
        }
    }


def code_versions(overrides: dict) -> dict[str, str]:
    graph = build_definitions("local", overrides).resolve_asset_graph()
    return {key.to_user_string(): graph.get(key).code_version for key in graph.get_all_asset_keys()}


def changed(before: dict, after: dict) -> set[str]:
    return {key for key in after if after[key] != before[key]}


def test_models_define_code_versions_and_operational_knobs_do_not(tmp_path):
    base = endpoint("http://127.0.0.1:9/v1")
    before = code_versions(base)
    judge = changed(
        before, code_versions(endpoint("http://127.0.0.1:9/v1", judge={"model": "cheap"}))
    )
    assert judge == LLM_SCORERS  # not explanations, not the embedding or surprisal scorers
    refining = {**base, "explanations": {"refine_rounds": 2}}
    refined_judge = changed(
        code_versions(refining),
        code_versions({**refining, "llm": {**base["llm"], "judge": {"model": "cheap"}}}),
    )
    assert (
        refined_judge == {"explanations"} | LLM_SCORERS
    )  # refining asks the judge, so its explanations are the judge's too
    assert changed(
        before, code_versions(endpoint("http://127.0.0.1:9/v1", explainer={"model": "stronger"}))
    ) == {"explanations"}  # scores follow it
    assert (
        changed(before, code_versions(endpoint("http://127.0.0.1:9/v1", model="other")))
        == {"explanations"} | LLM_SCORERS
    )
    assert changed(before, code_versions({**base, "subject_model": {"dtype": "bfloat16"}})) == {
        "activations",
        "scores/surprisal",
        "scores/intervention",
        "scores/output_judge",
    }
    weights = tmp_path / "my-model"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    other_model = changed(before, code_versions({**base, "subject_model": {"model": str(weights)}}))
    assert {
        "corpus",
        "activations",
    } <= other_model and "explanations" not in other_model  # the rest follows activations
    embedder = changed(before, code_versions({**base, "embedder": {"model": str(weights)}}))
    assert embedder == {"exemplars", "scores/embedding"}  # hard negatives and the embedding scorer
    several = {**base, "explanations": {"senses": 2}}
    assert changed(
        code_versions(several), code_versions({**several, "embedder": {"model": str(weights)}})
    ) == {"exemplars", "explanations", "scores/embedding"}  # it clusters the senses
    operational = {
        **endpoint(
            "http://10.0.0.1:8000/v1", max_concurrency=3, timeout_s=5.0, structured_output="off"
        ),
        "settings": {"data_dir": str(tmp_path / "elsewhere"), "partitions_per_run": 1},
        "embedder": {"device": "cpu", "batch_size": 8},
        "subject_model": {"batch_size": 3, "device": "cpu"},
    }
    operational["llm"]["api_key_env"] = "ANOTHER_VARIABLE"
    assert changed(before, code_versions(operational)) == set()


def test_role_tables_are_checked_when_the_deployment_loads():
    with pytest.raises(DeploymentError, match=r"\[llm.judge\] has unknown key\(s\) \['modle'\]"):
        build_definitions("local", endpoint("http://127.0.0.1:9/v1", judge={"modle": "x"}))
    with pytest.raises(DeploymentError, match=r"\[llm.explainer\] max_concurrency"):
        build_definitions(
            "local", endpoint("http://127.0.0.1:9/v1", explainer={"max_concurrency": "many"})
        )


SAID = {"explanation": EXPLANATION}


def explainer_reply(messages):
    return SAID["explanation"]


def judge_reply(messages):
    n = messages[-1]["content"].count("\nExample ")
    return str([i % 2 for i in range(n)])


def settings_for(root) -> dict:
    return {
        "settings": {
            "data_dir": str(root),
            "latents_per_shard": TEST_LATENTS_PER_SHARD,
            "max_latents_per_shard": 3,
        }
    }


def test_a_strong_explainer_and_a_cheap_judge_then_switching_the_judge_reruns_only_the_scores(
    registered, monkeypatch
):
    """Two endpoints: each answers only its role, every row names its model, and a new judge re-scores
    without one explanation request; after a re-explain, a scorer left behind is shown as stale."""
    monkeypatch.delenv("AUTOINTERP_TEST_KEY", raising=False)
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    with ScriptedLLMServer(explainer_reply) as strong, ScriptedLLMServer(judge_reply) as cheap:
        overrides = {
            **endpoint(
                cheap.base_url,
                model="cheap",
                explainer={"base_url": strong.base_url, "model": "strong"},
            ),
            **settings_for(registered),
        }
        before = build_definitions("local", overrides)
        monkeypatch.setenv("AUTOINTERP_TEST_KEY", "sk-set-after-the-definitions-loaded")
        selection = ["explanations", "scores/detection", "scores/fuzzing", "scores/embedding"]
        assert materialize(
            list(before.assets),
            selection=selection,
            partition_key=PARTITION,
            resources=before.resources,
            instance=instance,
        ).success
        assert {r["model"] for r in strong.requests} == {"strong"} and {
            r["model"] for r in cheap.requests
        } == {"cheap"}
        assert all(
            "Description" not in r["messages"][-1]["content"] for r in strong.requests
        )  # explainer prompts only
        assert all(
            "Description" in r["messages"][-1]["content"] for r in cheap.requests
        )  # judge prompts only
        assert (
            strong.headers[-1].get("authorization") == "Bearer sk-set-after-the-definitions-loaded"
        )  # the key is read at run time

        root = DataRoot(registered)
        explanations = pd.read_parquet(root.explanations_path(TINY_CODER, "00"))
        assert set(explanations["model"]) == {"openai:strong"}
        detection = pd.read_parquet(root.scores_path(TINY_CODER, "00", "detection"))
        assert set(detection["models"]) == {"judge=openai:cheap"}
        assert (detection["explanation_hash"] != "").all()
        embedding = pd.read_parquet(root.scores_path(TINY_CODER, "00", "embedding"))
        assert embedding["models"].str.startswith("embedder=all-MiniLM-L6-v2@").all()
        metadata = instance.get_latest_materialization_event(
            AssetKey(["scores", "detection"])
        ).asset_materialization.metadata
        assert metadata["judge_model"].value == "openai:cheap"
        assert (
            instance.get_latest_materialization_event(AssetKey("explanations"))
            .asset_materialization.metadata["explainer_model"]
            .value
            == "openai:strong"
        )

        settled = evaluate_automation_conditions(defs=before, instance=instance)
        after = build_definitions(
            "local",
            {
                **endpoint(
                    cheap.base_url,
                    model="cheaper",
                    explainer={"base_url": strong.base_url, "model": "strong"},
                ),
                **settings_for(registered),
            },
        )
        evaluation = evaluate_automation_conditions(
            defs=after, instance=instance, cursor=settled.cursor
        )
        stale = sorted(
            key
            for key, partitions in requested(evaluation, after).items()
            if PARTITION in partitions
        )
        assert stale == [
            "scores/detection",
            "scores/fuzzing",
        ]  # the automated LLM scorers; not explanations, not embedding

        explainer_requests = len(strong.requests)
        assert materialize(
            list(after.assets),
            selection=stale,
            partition_key=PARTITION,
            resources=after.resources,
            instance=instance,
        ).success
        assert len(strong.requests) == explainer_requests  # no explanation request was sent
        assert {r["model"] for r in cheap.requests[-4:]} == {"cheaper"}
        assert set(pd.read_parquet(root.scores_path(TINY_CODER, "00", "detection"))["models"]) == {
            "judge=openai:cheaper"
        }

        # re-explain, re-score with detection only: the others scored the earlier text, and say so
        SAID["explanation"] = "Explanation: words about directories"
        shorter = build_definitions(
            "local",
            {
                **endpoint(
                    cheap.base_url,
                    model="cheaper",
                    explainer={"base_url": strong.base_url, "model": "strong"},
                ),
                **settings_for(registered),
                "explanations": {"max_tokens": 40},
            },
        )  # a new request: not answered by the cache
        assert materialize(
            list(shorter.assets),
            selection=["explanations", "scores/detection"],
            partition_key=PARTITION,
            resources=shorter.resources,
            instance=instance,
        ).success
        assert materialize(
            list(shorter.assets),
            selection=["score_summary"],
            resources=shorter.resources,
            instance=instance,
        ).success
        summary = pd.read_parquet(root.score_summary_path(TINY_CODER))
        assert (summary["explanation"] == "words about directories").all()
        assert (
            summary["detection"].notna().any()
            and summary["fuzzing"].isna().all()
            and summary["embedding"].isna().all()
        )
        assert (
            summary["stale"] == "stale: scored an earlier explanation (embedding, fuzzing)"
        ).all()


def test_the_key_variable_is_read_when_the_run_makes_its_client(monkeypatch):
    """A key exported after the definitions loaded (a UI started before it) is the key the run sends."""
    from autointerp_defs.deployments import load_deployment

    monkeypatch.delenv("AUTOINTERP_TEST_KEY", raising=False)
    llm = load_deployment("local", endpoint("http://127.0.0.1:9/v1")).resources()["llm"]
    assert "AUTOINTERP_TEST_KEY is not set" in llm.client().inner.key_setting
    monkeypatch.setenv("AUTOINTERP_TEST_KEY", "sk-exported-later")
    assert llm.client().inner._api_key == "sk-exported-later"
    assert (
        llm.client(role="judge").inner._api_key == "sk-exported-later"
    )  # the roles inherit [llm]'s variable
