"""The output-side plugins: their evidence, scores and judge on a latent that writes a known word, then
materialized on a real tiny partition (the embedded model, the tiny SAE): the logit_lens and steering
explainers, the intervention and output_judge scorers with their controls."""

import asyncio
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from dagster import DagsterInstance, materialize

from assets.explainers.logit_lens import vocab_proj_evidence
from assets.explainers.steering import token_change
from assets.scorers.intervention import ContinuationSource, Likelihoods, intervention_score
from assets.scorers.output_judge import judge, judge_pairs
from autointerp_defs.definitions import build_definitions
from resources.llm import LLMResource
from resources.sparse_coders import SparseCoder
from resources.steering import NEUTRAL_PROMPTS, Steer
from storage.layout import DataRoot
from tests.conftest import (
    TINY_CODER,
    TINY_CORPUS_CONFIG,
    TINY_EXEMPLARS_CONFIG,
    TINY_HOOKPOINT,
    add_coders,
    make_resources,
)
from tests.scripted_llm_server import ScriptedLLMServer

PARTITION = f"{TINY_CODER}|00"
QUICK = {"prompts": ["The", "One day,", "I think that"], "tokens": 4, "kl_tolerance": 0.3}
WORDS = (" ocean", " cat", " king")
"""Tokens whose own unembedding direction VocabProj ranks first (checked in the test)."""
PROMPTS = list(NEUTRAL_PROMPTS[:4])


@pytest.fixture(scope="module")
def steerer(subject):
    return subject.steerer()


@pytest.fixture(scope="module")
def unembedding_coder(subject):
    """A ReLU SAE at layer 27 whose latent i reads and writes the unembedding direction of WORDS[i]."""
    lm, tokenizer = subject.causal_lm(), subject.tokenizer()
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in WORDS]
    assert all(len(i) == 1 for i in ids)
    ids = [i[0] for i in ids]
    rows = lm.get_output_embeddings().weight.detach().float()[ids]
    directions = rows / rows.norm(dim=1, keepdim=True)
    coder = SparseCoder(
        "unembed",
        "model.layers.27",
        "relu",
        576,
        len(ids),
        directions.clone(),
        torch.zeros(len(ids)),
        directions.clone(),
        torch.zeros(576),
    )
    return coder, ids


def continuation_source(steerer, coder, batch):
    return ContinuationSource(
        steerer,
        coder,
        PROMPTS,
        8,
        target_kl=1.0,
        unit_of=lambda latent: 40.0,
        tolerance=0.1,
        batch=batch,
    )


@pytest.fixture(scope="module")
def continuations(steerer, unembedding_coder):
    """The three latents steered in one batch."""
    source = continuation_source(steerer, unembedding_coder[0], batch=3)
    source.expect([0, 1, 2])
    return source.batch(0)


def own_and_control_scores(subject, made, latent, other):
    likelihoods = Likelihoods(subject.causal_lm(), subject.tokenizer(), rows=64)
    return [
        intervention_score(likelihoods, made, f"the word '{WORDS[i].strip()}'").score
        for i in (latent, other)
    ]


def test_the_logit_lens_lists_the_written_token_first(subject, unembedding_coder):
    coder, ids = unembedding_coder
    evidence = vocab_proj_evidence(coder, subject.causal_lm(), [0, 1, 2], k=5)
    assert [evidence[i].promoted[0][0] for i in range(3)] == ids


def test_steering_raises_the_written_tokens_probability(
    steerer, subject, unembedding_coder, continuations
):
    """At the strength that moves next-token distributions by 1 nat, the latent's token gains at least
    10 percentage points of probability on average over every position of four neutral prompts (from
    under 0.1%), more than any other token; its greedy continuations are made of it."""
    coder, ids = unembedding_coder
    tokenizer = subject.tokenizer()
    for latent in range(2):
        c = continuations[latent]
        assert c.kl == pytest.approx(1.0, rel=0.1)  # the strength search hit its target
        change = token_change(steerer, Steer(coder, latent, c.delta), PROMPTS, k=3)
        top, gain = change.promoted[0]
        assert top == ids[latent] and gain > 0.10
        clean = steerer.next_token_logprobs(PROMPTS).exp()[:, ids[latent]]
        assert clean.max() < 1e-3
        steered_text = " ".join(tokenizer.decode(s) for s in c.steered)
        plain_text = " ".join(tokenizer.decode(s) for s in c.unsteered)
        assert (
            steered_text.count(WORDS[latent].strip()) >= 8
            and WORDS[latent].strip() not in plain_text
        )


def test_the_true_description_beats_its_control_on_intervention_scores(subject, continuations):
    """The subject model finds the steered text likelier (relative to the unsteered) after the true
    description than after the other latent's."""
    for latent, other in ((0, 1), (1, 0)):
        own, control = own_and_control_scores(subject, continuations[latent], latent, other)
        assert own > control + 0.2 and own > 0.2, (own, control)


def test_a_latent_steered_alone_is_steered_as_in_a_batch(
    steerer, subject, unembedding_coder, continuations
):
    """Batch rows are independent: a latent steered alone (a batch of one) gets the same strength-search
    path, the same greedy continuations and the same intervention scores as beside two other latents
    (up to float rounding, which differs with the batch's shape)."""
    alone = continuation_source(steerer, unembedding_coder[0], batch=1)
    for latent, other in ((2, 0), (1, 2)):
        single, batched = alone.get(latent), continuations[latent]
        assert single.steered == batched.steered and single.unsteered == batched.unsteered
        assert single.delta == batched.delta and single.kl == pytest.approx(batched.kl, rel=1e-4)
        assert own_and_control_scores(subject, single, latent, other) == pytest.approx(
            own_and_control_scores(subject, batched, latent, other), abs=1e-4
        )


def truthful_output_judge(messages):
    """Picks, per pair, the continuation that says the described word more often."""
    word = re.search(r"Description: the word '(\w+)'", messages[-1]["content"]).group(1)
    firsts = re.findall(r"Continuation 1: (.*)", messages[-1]["content"])
    seconds = re.findall(r"Continuation 2: (.*)", messages[-1]["content"])
    return str(
        [1 if a.count(word) > b.count(word) else 2 for a, b in zip(firsts, seconds, strict=False)]
    )


@pytest.fixture(scope="module")
def vocab(subject):
    tokenizer = subject.tokenizer()
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def test_the_output_side_judge_tells_steered_text_with_the_true_description_only(
    continuations, vocab
):
    with ScriptedLLMServer(truthful_output_judge) as server:
        client = LLMResource(backend="openai", base_url=server.base_url, model="m").client()

        async def both(latent, other):
            async with client.session():
                pairs = judge_pairs(continuations[latent], seed=latent)
                return (
                    await judge(client, f"the word '{WORDS[latent].strip()}'", pairs, vocab),
                    await judge(client, f"the word '{WORDS[other].strip()}'", pairs, vocab),
                )

        for latent, other in ((0, 1), (1, 0)):
            own, control = asyncio.run(both(latent, other))
            # the other word is in neither text: the judge's tie answer (2) is right only where the
            # seeded order put the steered text
            by_position = np.mean(
                [p.steered == 2 for p in judge_pairs(continuations[latent], seed=latent)]
            )
            assert own.accuracy == 1.0 and control.accuracy == by_position < 1.0, (own, control)


def test_the_judge_fails_a_latent_whose_answers_cannot_be_read(continuations, vocab):
    with ScriptedLLMServer(lambda messages: "Continuation 1 looks steered to me.") as server:
        client = LLMResource(backend="openai", base_url=server.base_url, model="m").client()

        async def ask():
            async with client.session():
                return await judge(
                    client, "the word 'ocean'", judge_pairs(continuations[0], seed=0), vocab
                )

        judged = asyncio.run(ask())
    assert (
        judged.correct is None
        and "unreadable answer" in judged.failure
        and "looks steered" in judged.failure
    )
    assert len(server.requests) == 2  # asked again once, never guessed


OTHER_SENSES = (
    "digits inside parentheses",
    "symbols inside square brackets",
    "capitalized words inside quotation marks",
)
"""A second sense for each word latent: a class of text its steer has nothing to do with."""


def word_counting_judge(messages):
    """Picks, per pair, the continuation that says the described word more often; a description naming no
    word finds it in neither, and answers 2 (the tie)."""
    found = re.search(r"Description: the word '(\w+)'", messages[-1]["content"])
    word = found.group(1) if found else None
    pairs = zip(
        re.findall(r"Continuation 1: (.*)", messages[-1]["content"]),
        re.findall(r"Continuation 2: (.*)", messages[-1]["content"]),
        strict=False,
    )
    return str([1 if word and a.count(word) > b.count(word) else 2 for a, b in pairs])


def test_each_sense_is_scored_by_what_the_steer_writes(subject, unembedding_coder, vocab, tmp_path):
    """A latent explained as two senses, the word it writes and an unrelated class: intervention and the
    output judge score each sense (`score_senses`), and the sense naming the written word scores above the
    other sense and above its control (another latent's word), so the sense scores say which sense the
    latent writes. Intervention reads no window; its sense rows need only the latents' continuations."""
    from assets.scorers import SCORERS, ScorerDeps, scorer_settings
    from assets.scores import score_senses
    from storage.activations import LATENT_STATS_FILE, save_latent_stats
    from tests.planted_latents import planted_exemplars

    assert (
        SCORERS["intervention"].scores_senses and SCORERS["output_judge"].scores_senses
    )  # so the scores stage writes their `sense_scores`
    coder, _ = unembedding_coder
    save_latent_stats(
        tmp_path / LATENT_STATS_FILE, np.ones(3), np.full(3, 40.0), np.ones(3), tokens=100
    )
    exemplars = planted_exemplars(subject.tokenizer(), {latent: ("digits",) for latent in range(3)})
    senses = pd.DataFrame(
        [
            {"latent": latent, "sense": sense, "explanation": text, "test_windows": []}
            for latent in range(3)
            for sense, text in enumerate(
                (f"the word '{WORDS[latent].strip()}'", OTHER_SENSES[latent])
            )
        ]
    )
    quick = {"prompts": PROMPTS, "tokens": 8, "kl_tolerance": 0.1}
    settings = scorer_settings({"intervention": quick, "output_judge": quick})
    with ScriptedLLMServer(word_counting_judge) as server:
        client = LLMResource(backend="openai", base_url=server.base_url, model="m").client()
        deps = ScorerDeps(llm=client, subject_model=subject, coder=coder, activations_dir=tmp_path)
        scored = {
            name: asyncio.run(
                score_senses(SCORERS[name](settings[name], deps), exemplars, senses, vocab)
            ).set_index(["latent", "sense"])
            for name in ("intervention", "output_judge")
        }
    for name, metric in (("intervention", "intervention_score"), ("output_judge", "accuracy")):
        rows = scored[name]
        assert sorted(rows.index) == [(latent, sense) for latent in range(3) for sense in (0, 1)]
        for latent in range(3):
            word, other = rows.loc[(latent, 0)], rows.loc[(latent, 1)]
            assert word[metric] > other[metric] and word[metric] > word[f"control_{metric}"], (
                name,
                latent,
                word[metric],
                other[metric],
            )
            assert (
                word["control_explanation"].startswith("the word")
                and word["control_explanation"] != word["explanation"]
            )


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
    materialize(
        assets,
        selection=["corpus"],
        resources=resources,
        instance=instance,
        run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
    )
    materialize(
        assets,
        selection=["activations"],
        partition_key=PARTITION,
        resources=resources,
        instance=instance,
    )
    exemplars = {**TINY_EXEMPLARS_CONFIG, "non_activating_sources": ["random"]}
    materialize(
        assets,
        selection=["exemplars"],
        partition_key=PARTITION,
        resources=resources,
        instance=instance,
        run_config={"ops": {"exemplars": {"config": exemplars}}},
    )
    return root, instance


def run(partition, selection, overrides):
    root, instance = partition
    assets = list(build_definitions("local", overrides).assets)
    with ScriptedLLMServer(reply) as server:
        resources = make_resources(
            root,
            max_latents=2,
            llm=LLMResource(
                backend="openai", base_url=server.base_url, model="m", max_concurrency=2
            ),
        )
        result = materialize(
            assets,
            selection=selection,
            partition_key=PARTITION,
            resources=resources,
            instance=instance,
            raise_on_error=True,
        )
    return result, server.requests


def test_logit_lens_explanations_then_intervention_and_output_judge_scores(partition):
    root = DataRoot.at(partition[0])
    result, requests = run(
        partition,
        ["explanations", "scores/intervention", "scores/output_judge"],
        {
            "explanations": {"explainer": "logit_lens", "explainer_settings": {"k": 5}},
            "scorers": {"intervention": QUICK, "output_judge": QUICK},
        },
    )
    assert result.success
    explained = pd.read_parquet(root.explanations_path(TINY_CODER, "00"))
    assert (
        len(explained) == 2
        and (explained.status == "ok").all()
        and (explained.explainer == "logit_lens").all()
    )
    asked = [
        r["messages"][-1]["content"]
        for r in requests
        if "Raised most" in r["messages"][-1]["content"]
    ]
    assert len(asked) == 2 and all(
        len(re.findall(r'"[^"]*"', a.split("\n")[0])) == 5 for a in asked
    )

    scores = pd.read_parquet(root.scores_path(TINY_CODER, "00", "intervention"))
    assert len(scores) == 2 and (scores.control_explanation != scores.explanation).all()
    assert (
        scores.intervention_score.notna().all() and scores.control_intervention_score.notna().all()
    )
    assert np.allclose(scores.gap, scores.intervention_score - scores.control_intervention_score)
    assert (
        (scores.steering_kl > 0.7) & (scores.steering_kl < 1.3)
    ).all()  # the strength search reached 1 nat ± its 30% tolerance
    assert (scores.n_scored == 6).all()  # 3 prompts × (steered, unsteered)

    judged = pd.read_parquet(root.scores_path(TINY_CODER, "00", "output_judge"))
    examples = pd.read_parquet(root.scored_examples_path(TINY_CODER, "00", "output_judge"))
    assert len(judged) == 2 and (judged.n_failed == 0).all() and (judged.n_scored == 3).all()
    judge_prompts = [r for r in requests if "Continuation 1" in r["messages"][-1]["content"]]
    assert (
        len(judge_prompts) == 4
    )  # one request per latent for the explanation and one for its control
    # the judge always says 1: right exactly where the seeded order put the steered continuation first
    assert (
        set(examples.source) == {"explanation", "control"}
        and examples.prediction.isin([0, 1]).all()
    )
    assert (judged.accuracy == judged.control_accuracy).all()  # same pairs, same blind answer
    assert json.loads(judged.failures.iloc[0]) == []


def test_steering_explanations_show_the_tokens_steering_raises(partition):
    root = DataRoot.at(partition[0])
    result, requests = run(
        partition,
        ["explanations"],
        {
            "explanations": {
                "explainer": "steering",
                "explainer_settings": {"prompts": ["The", "One day,"], "k": 5, "kl_tolerance": 0.3},
            }
        },
    )
    explained = pd.read_parquet(root.explanations_path(TINY_CODER, "00"))
    assert (explained.status == "ok").all() and (explained.explainer == "steering").all()
    shown = [r["messages"][-1]["content"] for r in requests]
    assert len(shown) == 2 and all(len(re.findall(r"percentage points", s)) >= 1 for s in shown)
