"""The output-side plugins materialized on a real tiny partition (the embedded model, the tiny SAE):
the logit_lens and steering explainers, the intervention and output_judge scorers with their controls."""
import json
import re

import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from autointerp_defs.definitions import build_definitions
from resources.llm import LLMResource
from storage.layout import DataRoot
from tests.conftest import TINY_CODER, TINY_CORPUS_CONFIG, TINY_EXEMPLARS_CONFIG, TINY_HOOKPOINT, add_coders, make_resources
from tests.scripted_llm_server import ScriptedLLMServer

PARTITION = f"{TINY_CODER}|00"
QUICK = {"prompts": ["The", "One day,", "I think that"], "tokens": 4, "kl_tolerance": 0.3}


def reply(messages):
    """An explanation naming the first token each explainer shows (so latents' texts differ), or for the
    judge always continuation 1."""
    user = messages[-1]["content"]
    if "Continuation 1" in user:
        n = int(re.search(r"Answer with (\d+) numbers", user).group(1))
        return str([1] * n)
    shown = re.search(r'(?:Raised most|probability rose most):\s*"([^"]*)"', user)
    return f"Explanation: writes {shown.group(1) if shown else 'nothing'!r}"


@pytest.fixture(scope="module")
def partition(tmp_path_factory, tiny_sae):
    """A data root with the tiny SAE's corpus, activations and shard-00 exemplars materialized."""
    from resources.sparse_coders import save_sparsify

    root = tmp_path_factory.mktemp("output_side")
    save_sparsify(tiny_sae, root / "registry" / "tiny-topk" / TINY_HOOKPOINT)
    instance = DagsterInstance.ephemeral()
    add_coders(instance, root, TINY_CODER)
    assets = list(build_definitions("local").assets)
    resources = make_resources(root)
    materialize(assets, selection=["corpus"], resources=resources, instance=instance, run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}})
    materialize(assets, selection=["activations"], partition_key=PARTITION, resources=resources, instance=instance)
    exemplars = {**TINY_EXEMPLARS_CONFIG, "non_activating_sources": ["random"]}
    materialize(assets, selection=["exemplars"], partition_key=PARTITION, resources=resources, instance=instance, run_config={"ops": {"exemplars": {"config": exemplars}}})
    return root, instance


def run(partition, selection, overrides):
    root, instance = partition
    assets = list(build_definitions("local", overrides).assets)
    with ScriptedLLMServer(reply) as server:
        resources = make_resources(root, max_latents=2, llm=LLMResource(backend="openai", base_url=server.base_url, model="m", max_concurrency=2))
        result = materialize(assets, selection=selection, partition_key=PARTITION, resources=resources, instance=instance, raise_on_error=True)
    return result, server.requests


def test_logit_lens_explanations_then_intervention_and_output_judge_scores(partition):
    root = DataRoot.at(partition[0])
    result, requests = run(partition, ["explanations", "scores/intervention", "scores/output_judge"],
                           {"explanations": {"explainer": "logit_lens", "explainer_settings": {"k": 5}},
                            "scorers": {"intervention": QUICK, "output_judge": QUICK}})
    assert result.success
    explained = pd.read_parquet(root.explanations_path(TINY_CODER, "00"))
    assert len(explained) == 2 and (explained.status == "ok").all() and (explained.explainer == "logit_lens").all()
    asked = [r["messages"][-1]["content"] for r in requests if "Raised most" in r["messages"][-1]["content"]]
    assert len(asked) == 2 and all(len(re.findall(r'"[^"]*"', a.split("\n")[0])) == 5 for a in asked)

    scores = pd.read_parquet(root.scores_path(TINY_CODER, "00", "intervention"))
    assert len(scores) == 2 and (scores.control_explanation != scores.explanation).all()
    assert scores.intervention_score.notna().all() and scores.control_intervention_score.notna().all()
    assert np.allclose(scores.gap, scores.intervention_score - scores.control_intervention_score)
    assert ((scores.steering_kl > 0.7) & (scores.steering_kl < 1.3)).all()  # the strength search reached 1 nat ± its 30% tolerance
    assert (scores.n_scored == 6).all()  # 3 prompts × (steered, unsteered)

    judged = pd.read_parquet(root.scores_path(TINY_CODER, "00", "output_judge"))
    examples = pd.read_parquet(root.scored_examples_path(TINY_CODER, "00", "output_judge"))
    assert len(judged) == 2 and (judged.n_failed == 0).all() and (judged.n_scored == 3).all()
    judge_prompts = [r for r in requests if "Continuation 1" in r["messages"][-1]["content"]]
    assert len(judge_prompts) == 4  # one request per latent for the explanation and one for its control
    # the judge always says 1: right exactly where the seeded order put the steered continuation first
    assert set(examples.source) == {"explanation", "control"} and examples.prediction.isin([0, 1]).all()
    assert (judged.accuracy == judged.control_accuracy).all()  # same pairs, same blind answer
    assert json.loads(judged.failures.iloc[0]) == []


def test_steering_explanations_show_the_tokens_steering_raises(partition):
    root = DataRoot.at(partition[0])
    result, requests = run(partition, ["explanations"], {"explanations": {"explainer": "steering", "explainer_settings": {"prompts": ["The", "One day,"], "k": 5, "kl_tolerance": 0.3}}})
    explained = pd.read_parquet(root.explanations_path(TINY_CODER, "00"))
    assert (explained.status == "ok").all() and (explained.explainer == "steering").all()
    shown = [r["messages"][-1]["content"] for r in requests]
    assert len(shown) == 2 and all(len(re.findall(r"percentage points", s)) >= 1 for s in shown)
