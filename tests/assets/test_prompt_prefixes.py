"""Prefix caching by design: every question of one latent to one scorer begins with the same bytes (the
instructions, the answer format, the explanation) and its windows come last, so an endpoint that caches
prefixes (OpenAI, vLLM) reads that head once; and nothing in a request changes from one run to the next
(no nonce, no timestamp). `bench/cost.py` measures the share of prompt tokens so cached."""

import asyncio
import json

import pytest

from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings
from assets.explanations import ExplanationsConfig, explain_all
from assets.scorers import SCORERS, ScorerDeps, scorer_settings
from assets.scores import score_partition
from tests.conftest import llm_resource
from tests.planted_latents import planted_exemplars, scripted_llm
from tests.scripted_llm_server import ScriptedLLMServer

PLANTED = {0: ("digits",), 1: ("capitalized words",), 2: ("symbols",)}
FIRST_WINDOW = "Example 1: "


@pytest.fixture(scope="module")
def planted(subject):
    tokenizer = subject.tokenizer()
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return planted_exemplars(tokenizer, PLANTED), vocab


def explain(exemplars, vocab) -> tuple:
    """The explanations, and every request the explainer sent."""
    with ScriptedLLMServer(scripted_llm) as server:
        client = llm_resource(server, cache_dir="").client()
        frame = asyncio.run(
            explain_all(
                EXPLAINERS["highlighted"](ExplainerSettings(), ExplainerDeps(llm=client)),
                ExplanationsConfig(),
                exemplars,
                None,
                sorted(PLANTED),
                vocab,
                None,
            )
        )
    return frame, list(server.requests)


def scorer_requests(name, exemplars, explanations, vocab) -> list[dict]:
    """Every request one scorer sends for the partition, its controls' included, with no response cache."""
    with ScriptedLLMServer(scripted_llm) as server:
        client = llm_resource(server, cache_dir="").client()
        scorer = SCORERS[name](scorer_settings()[name], ScorerDeps(llm=client))
        asyncio.run(score_partition(scorer, exemplars, explanations, vocab))
    return list(server.requests)


def head(request: dict) -> str:
    """The request as sent up to where its first window begins: every message and parameter before it."""
    *before, last = request["messages"]
    params = {k: v for k, v in request.items() if k != "messages"}
    return json.dumps([params, before, last["content"].split(FIRST_WINDOW)[0]], sort_keys=True)


def bodies(requests: list[dict]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in requests)


@pytest.mark.parametrize("name", ["detection", "fuzzing"])
def test_the_questions_of_one_latent_to_one_scorer_share_their_head_and_only_windows_follow(
    planted, name
):
    exemplars, vocab = planted
    explanations, _ = explain(exemplars, vocab)
    requests = scorer_requests(name, exemplars, explanations, vocab)
    by_explanation = {}
    for request in requests:
        user = request["messages"][-1]["content"]
        explanation = next(e for e in explanations["explanation"] if f"Description: {e}\n" in user)
        by_explanation.setdefault(explanation, []).append(request)
    assert len(by_explanation) == len(PLANTED)
    for explanation, asked in by_explanation.items():
        # a latent's own questions and every control question that shows this explanation: 4 requests
        assert len(asked) == 4 and len({json.dumps(r["messages"]) for r in asked}) == 4
        heads = {head(r) for r in asked}
        assert len(heads) == 1, (
            f"{name}: questions about {explanation!r} differ before their windows"
        )
        user_head = asked[0]["messages"][-1]["content"].split(FIRST_WINDOW)[0]
        assert (
            user_head == f"Description: {explanation}\n\n"
        )  # the explanation is the head's last part
    # the instructions and format example are the same for every question of the scorer
    assert len({json.dumps(r["messages"][:-1]) for r in requests}) == 1


def test_no_request_changes_between_runs_so_no_nonce_or_timestamp_breaks_a_prefix(planted):
    exemplars, vocab = planted
    (explanations, explained), (_, again) = explain(exemplars, vocab), explain(exemplars, vocab)
    assert bodies(explained) == bodies(again)
    assert len({json.dumps(r["messages"][0]) for r in explained}) == 1  # one system prompt
    assert all(r["messages"][1]["content"].startswith(FIRST_WINDOW) for r in explained)
    for name in ("detection", "fuzzing"):
        first = scorer_requests(name, exemplars, explanations, vocab)
        assert bodies(first) == bodies(scorer_requests(name, exemplars, explanations, vocab))
