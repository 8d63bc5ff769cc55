"""Each scorer on windows whose truth is known: latent L fires exactly on its topic word.

A scripted judge that reads the explanation and answers truthfully must score every latent
perfectly with its own explanation and at chance (or worse) with the control's; the embedding and
surprisal scorers use the real MiniLM and SmolLM2 models.
"""

import asyncio
import json
import re

import numpy as np
import pandas as pd
import pytest

from assets.records import Example
from assets.scorers import SCORERS, ScorerDeps, scorer_settings
from assets.scorers.saebench import none_floor, read_window_numbers, saebench_windows
from assets.scorers.simulation import expected_values
from assets.scores import score_partition
from resources.llm import LLMResource
from resources.llm_protocol import Completion
from tests.conftest import two_shards_of_scores
from tests.scripted_llm_server import ScriptedLLMServer

TOPICS = {1: "cat", 2: "river", 3: "guitar"}
ACTIVATING = [
    "Yesterday I saw a {} near the old house.",
    "She said the {} was the best part of the trip.",
    "Nobody expected the {} to be there in the morning.",
    "A small {} appeared in the photo.",
    "He wrote a long story about a {} and a friend.",
    "There is a {} in every picture she drew.",
]
# the same sentences with a neutral noun: only the topic word tells activating windows apart
SILENT = [
    template.format(noun)
    for template, noun in zip(
        ACTIVATING, ["table", "letter", "window", "bottle", "ticket", "chair"], strict=False
    )
]


@pytest.fixture(scope="module")
def topic_data(subject):
    """Exemplars of three latents (test: 5 activating, 5 silent windows; valid: 2 + 2) and explanations."""
    tokenizer = subject.tokenizer()
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    rows = []
    for latent, word in TOPICS.items():
        for i, template in enumerate(ACTIVATING):
            ids = tokenizer(template.format(word), add_special_tokens=False)["input_ids"]
            acts = [1.0 + 0.2 * i if vocab[t].strip() == word else 0.0 for t in ids]
            assert max(acts) > 0
            rows.append(
                {
                    "latent": latent,
                    "split": "test" if i < 5 else "valid",
                    "kind": "activating",
                    "quantile": i % 5 + 1,
                    "tokens": ids,
                    "activations": acts,
                }
            )
        for i, text in enumerate(SILENT):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(
                {
                    "latent": latent,
                    "split": "test" if i < 5 else "valid",
                    "kind": "random",
                    "quantile": 0,
                    "tokens": ids,
                    "activations": [0.0] * len(ids),
                }
            )
    exemplars = pd.DataFrame(rows).assign(
        sequence=0, start=0, max_activation=lambda f: f["activations"].map(max)
    )
    explanations = pd.DataFrame(
        {
            "latent": list(TOPICS),
            "explanation": [f"the word {w}" for w in TOPICS.values()],
            "status": "ok",
        }
    )
    return exemplars, explanations, vocab


def described_word(messages) -> str | None:
    found = re.search(r"Description: the word (\w+)", messages[-1]["content"])
    return found.group(1) if found else None


def truthful_judge(messages):
    """Answers every scorer prompt from the explanation alone, as a perfect judge would."""
    system, user = messages[0]["content"], messages[-1]["content"]
    word = described_word(messages)
    examples = re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)
    if "intruder" in system:
        marked = [" ".join(re.findall(r"<<(.*?)>>", e)).strip() for e in examples]
        majority = max(set(marked), key=marked.count)
        odd = [i for i, m in enumerate(marked, start=1) if m != majority]
        return f"[{odd[0] if odd else 1}]"
    if "predict how" in system:
        tokens = [eval(t) for t in re.findall(r"^\d+\t(.*)$", user, re.MULTILINE)]
        values = [10 if t.strip() == word else 0 for t in tokens]
        return simulation_answer(values)
    if "marked tokens are what" in system:
        return str(
            [int(any(m.strip() == word for m in re.findall(r"<<(.*?)>>", e))) for e in examples]
        )
    return str([int(f" {word}" in e) for e in examples])


def simulation_answer(values):
    """'[v, v, ...]' with logprobs: a written 10 is 80% sure of itself, a written 0 90% sure."""
    tokens, steps = (
        ["["],
        [{"token": "[", "logprob": 0.0, "top_logprobs": [{"token": "[", "logprob": 0.0}]}],
    )
    for i, v in enumerate(values):
        alternatives = (
            {"10": np.log(0.8), "0": np.log(0.2)}
            if v == 10
            else {"0": np.log(0.9), "10": np.log(0.1)}
        )
        steps.append(
            {
                "token": str(v),
                "logprob": alternatives[str(v)],
                "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alternatives.items()],
            }
        )
        sep = ", " if i < len(values) - 1 else "]"
        steps.append(
            {"token": sep, "logprob": 0.0, "top_logprobs": [{"token": sep, "logprob": 0.0}]}
        )
        tokens += [str(v), sep]
    return {"content": "".join(tokens), "logprobs": steps}


def run_scorer(
    name, topic_data, server=None, subject=None, embed=None, context_window=None, **overrides
):
    exemplars, explanations, vocab = topic_data
    deps = ScorerDeps(
        llm=LLMResource(
            backend="openai", base_url=server.base_url, model="m", context_window=context_window
        ).client()
        if server
        else None,
        embedder=embed,
        subject_model=subject,
    )
    return asyncio.run(
        score_partition(
            SCORERS[name](scorer_settings({name: overrides})[name], deps),
            exemplars,
            explanations,
            vocab,
        )
    )


@pytest.mark.parametrize("name", ["detection", "fuzzing"])
def test_a_truthful_judge_is_perfect_with_the_explanation_and_at_chance_with_the_control(
    topic_data, name
):
    with ScriptedLLMServer(truthful_judge) as server:
        frame, examples = run_scorer(name, topic_data, server, examples_per_prompt=4)
    assert len(server.requests) == 3 * 2 * 3  # 3 latents × (own, control) × ceil(10 / 4) prompts
    assert (
        (frame.balanced_accuracy == 1.0).all()
        and (frame.f1 == 1.0).all()
        and (frame.tp == 5).all()
        and (frame.tn == 5).all()
    )
    assert (frame.control_balanced_accuracy == 0.5).all() and (frame.control_recall == 0.0).all()
    assert (frame.gap == 0.5).all() and (frame.n_failed == 0).all()
    assert len(examples) == 3 * 2 * 10 and set(examples.source) == {"explanation", "control"}
    own = examples[examples.source == "explanation"]
    assert (own.predicted == own.label).all()


def test_intruder_finds_the_intruder_and_its_control_has_no_signal(topic_data):
    with ScriptedLLMServer(truthful_judge) as server:
        frame, examples = run_scorer(
            "intruder", topic_data, server, examples_per_task=3, max_tasks=5
        )
    assert not any(
        "Description" in r["messages"][-1]["content"] for r in server.requests
    )  # no explanation is used
    assert (frame.accuracy == 1.0).all()
    # without an intruder every window is the latent's: the judge answers 1, right only when chance
    # put the "intruder" there
    control = examples[examples.source == "control"]
    assert len(control) == 3 * 5 and control.predicted.mean() < 0.6
    assert (frame.gap > 0).all() and frame.gap.mean() > 0.4


def test_simulation_uses_expected_values_from_logprobs_and_correlates_over_all_tokens(topic_data):
    with ScriptedLLMServer(truthful_judge) as server:
        frame, examples = run_scorer("simulation", topic_data, server, calibrate=True)
    assert all(r["top_logprobs"] == 10 and r["logprobs"] for r in server.requests)
    own = examples[examples.source == "explanation"]
    assert set(own.values_from) == {"logprobs"}
    simulated = np.concatenate(own.simulated.to_list())
    assert set(np.round(simulated, 6)) == {
        0.8 * 10,
        0.1 * 10,
    }  # 8 where the judge wrote 10, 1 where it wrote 0
    assert (frame.logprob_fraction == 1.0).all()
    for latent, rows in own.groupby("latent"):
        truth, guess = (
            np.concatenate(rows.true_activations.to_list()),
            np.concatenate(rows.simulated.to_list()),
        )
        row = frame[frame.latent == latent].iloc[0]
        assert row.ev_correlation == pytest.approx(
            np.corrcoef(truth, guess)[0, 1]
        )  # over all tokens at once
        # calibration on `valid` (one window at 2.0, one silent; test top = 1.8) maps EV 1 → 0
        # and EV 8 → 10·2.0/1.8
        slope = (10 * 2.0 / 1.8) / (8 - 1)
        calibrated = slope * (guess - 1)
        assert row.rsquared == pytest.approx(
            1 - np.sum((truth - calibrated) ** 2) / np.sum((truth - truth.mean()) ** 2)
        )  # centred
    assert (frame.ev_correlation > 0.95).all()
    assert (
        frame.control_ev_correlation == 0.0
    ).all()  # the control simulation is constant: no information
    assert (frame.roc_auc == 1.0).all()


def test_simulation_falls_back_to_parsed_values_without_logprobs(topic_data):
    def plain(messages):
        answer = truthful_judge(messages)
        return answer["content"] if isinstance(answer, dict) else answer

    with ScriptedLLMServer(plain) as server:
        frame, examples = run_scorer("simulation", topic_data, server)
    simulated = np.concatenate(examples[examples.source == "explanation"].simulated.to_list())
    assert set(simulated) == {0.0, 10.0} and (frame.logprob_fraction == 0.0).all()
    assert (frame.ev_correlation > 0.95).all() and (frame.gap > 0.95).all()


def test_expected_values_handle_split_digits_and_unaligned_answers():
    # "10" written as "1" "0": the "1" alternative counts as 10 there
    split = Completion(
        "[10, 3]",
        tokens=["[", "1", "0", ", ", "3", "]"],
        top_logprobs=[
            {"[": 0.0},
            {"1": np.log(0.5), "2": np.log(0.5)},
            {"0": 0.0},
            {", ": 0.0},
            {"3": np.log(0.75), "0": np.log(0.25)},
            {"]": 0.0},
        ],
    )
    assert expected_values(split, [10, 3]) == pytest.approx([6.0, 2.25])
    assert expected_values(Completion("[1, 2]"), [1, 2]) is None  # no logprobs
    assert (
        expected_values(split, [10, 4]) is None
    )  # the list parsed elsewhere is not what the tokens say
    # a separator fused to the digit ("5,") is still that digit: its alternatives "5," and "7," are the values
    fused = Completion(
        "[5, 0]",
        tokens=["[", "5,", " 0", "]"],
        top_logprobs=[{"[": 0.0}, {"5,": np.log(0.5), "7,": np.log(0.5)}, {" 0": 0.0}, {"]": 0.0}],
    )
    assert expected_values(fused, [5, 0]) == pytest.approx([6.0, 0.0])
    # two values in one token: its alternatives are not alternative values of either, so no expected values
    merged = Completion(
        "[5,0]",
        tokens=["[", "5,0", "]"],
        top_logprobs=[{"[": 0.0}, {"5,0": np.log(0.9), "1": np.log(0.1)}, {"]": 0.0}],
    )
    assert expected_values(merged, [5, 0]) is None


def test_embedding_scorer_ranks_topic_windows_first_with_real_minilm(topic_data):
    from resources.embedder import EmbedderResource

    frame, _ = run_scorer("embedding", topic_data, embed=EmbedderResource())
    assert (frame.roc_auc == 1.0).all()
    assert (frame.control_roc_auc < 0.8).all() and (frame.gap > 0.2).all()


def test_the_embedding_scorer_embeds_each_distinct_text_once_per_partition(topic_data):
    from assets.prompts import plain_text, window_text
    from resources.embedder import EmbedderResource

    class Counting:
        """The real MiniLM, counting every text it is asked to embed."""

        def __init__(self):
            self.embedder, self.texts = EmbedderResource(), []

        def embed(self, texts):
            self.texts += texts
            return self.embedder.embed(texts)

    exemplars, explanations, vocab = topic_data
    test = exemplars[exemplars.split == "test"]
    for span_tokens, texts in (
        (0, {plain_text("".join(vocab[t] for t in tokens)) for tokens in test.tokens}),
        (1, {window_text([vocab[t]]) for tokens in test.tokens for t in tokens}),
    ):
        counting = Counting()
        frame, _ = run_scorer("embedding", topic_data, embed=counting, span_tokens=span_tokens)
        assert sorted(counting.texts) == sorted(
            texts | set(explanations.explanation)
        )  # each once; the controls cost nothing
        # whole windows (delphi's form): river's windows judged by 'the word cat' reach 0.8 (the ring's control)
        assert (frame.roc_auc == 1.0).all() and (frame.control_roc_auc <= 0.8).all()
        if span_tokens == 0:
            assert (
                len(texts) == 3 * 5 + 5
            )  # each latent's activating windows, and the silent ones all three share


def test_the_embedding_scorer_scores_a_window_by_its_best_span(topic_data):
    from assets.records import Example
    from assets.scorers.embedding import spans
    from resources.embedder import EmbedderResource

    frame, _ = run_scorer("embedding", topic_data, embed=EmbedderResource(), span_tokens=3)
    assert (frame.roc_auc == 1.0).all() and (frame.gap > 0.2).all()
    # the texts a window is scored by: every 3 consecutive tokens (a repeated span once), a short window whole
    strs = [" a", " cat", " and", " a", " cat", "."]
    window = Example(
        index=0,
        token_ids=list(range(6)),
        token_strs=strs,
        activations=np.zeros(6),
        marks=np.zeros(6, bool),
        label=0,
        quantile=0,
    )
    assert spans(window, 3) == [" a cat and", " cat and a", " and a cat", " a cat."]
    assert spans(window, 1) == [" a", " cat", " and", "."]
    assert spans(window, 6) == spans(window, 0) == [" a cat and a cat."]


def test_the_best_token_default_rescores_and_whole_windows_keep_the_old_digest():
    """Whole windows (`span_tokens = 0`, the scoring before the option existed) keep the digest the settings
    had without it; the best-token default, measured better (`bench/quality.py`), changes it, so embedding
    scores made with the old default are stale and scored again."""
    import hashlib

    from assets.scorers.embedding import EmbeddingSettings

    before = hashlib.sha256(
        json.dumps({"seed": 0, "query_prefix": ""}, sort_keys=True).encode()
    ).hexdigest()[:10]
    assert EmbeddingSettings().span_tokens == 1
    assert EmbeddingSettings(span_tokens=0).digest() == before
    assert EmbeddingSettings().digest() != before != EmbeddingSettings(span_tokens=3).digest()


def test_surprisal_scorer_is_the_loss_drop_the_explanation_brings(topic_data, subject):
    import torch

    from assets.prompts import SURPRISAL_DESCRIPTION, SURPRISAL_NO_DESCRIPTION

    frame, examples = run_scorer("surprisal", topic_data, subject=subject)
    exemplars, _, _ = topic_data
    # recompute one window's score by hand with the subject model
    row = examples[(examples.latent == 1) & (examples.source == "explanation")].iloc[0]
    window = exemplars[(exemplars.latent == 1) & (exemplars.split == "test")].iloc[int(row.example)]
    tokenizer, lm = subject.tokenizer(), subject.causal_lm()

    def loss(prefix):
        p = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + list(window.tokens)])
        with torch.inference_mode():
            logits = lm(input_ids=ids).logits[0]
        return torch.nn.functional.cross_entropy(logits[len(p) - 1 : -1], ids[0, len(p) :]).item()

    expected = loss(SURPRISAL_DESCRIPTION.format(explanation=SURPRISAL_NO_DESCRIPTION)) - loss(
        SURPRISAL_DESCRIPTION.format(explanation="the word cat")
    )
    assert row.score == pytest.approx(expected, abs=1e-4)
    assert frame.roc_auc.between(0, 1).all() and frame.control_roc_auc.notna().all()


def test_summary_joins_scorers_over_shards_and_keeps_undefined_controls(tmp_path):
    from assets.scores import summary_table
    from storage.store import TableStore

    table = summary_table(
        TableStore(two_shards_of_scores(tmp_path)),
        "c/h",
        {name: SCORERS[name] for name in ("detection", "embedding")},
    ).set_index("latent")
    assert list(table.index) == [1, 2, 700] and table.loc[700, "shard"] == "01"
    assert table.loc[1, "detection"] == 0.9 and table.loc[1, "embedding_control"] == 0.6
    assert np.isnan(table.loc[700, "detection_control"]) and np.isnan(table.loc[700, "embedding"])
    assert table.loc[2, "mean_gap"] == pytest.approx((0.1 + -0.1) / 2)
    assert table["senses"].to_dict() == {
        1: 1,
        2: 2,
        700: 1,
    }  # latent 1's senses are of an earlier explanation
    assert table.loc[2, "detection_min_sense"] == 0.3 and np.isnan(
        table.loc[1, "detection_min_sense"]
    )
    assert np.isnan(table.loc[2, "embedding_min_sense"])  # its second sense has no embedding score


def test_the_control_is_never_the_same_text_and_is_nan_with_a_reason_when_none_differs(topic_data):
    exemplars, explanations, vocab = topic_data
    shared = explanations.assign(explanation=["the word cat", "the word cat", "the word guitar"])
    with ScriptedLLMServer(truthful_judge) as server:
        frame, _ = run_scorer(
            "detection", (exemplars, shared, vocab), server, examples_per_prompt=4
        )
    assert (frame.control_explanation != frame.explanation).all() and (
        frame.control_note == ""
    ).all()
    same = explanations.assign(explanation="the word cat")
    with ScriptedLLMServer(truthful_judge) as server:
        frame, _ = run_scorer("detection", (exemplars, same, vocab), server, examples_per_prompt=4)
    assert len(server.requests) == 3 * 3  # no control prompts: each latent's own 3 prompts only
    assert frame.control_balanced_accuracy.isna().all() and frame.gap.isna().all()
    assert frame.control_note.str.contains("same explanation").all()


def test_intruder_control_tasks_show_as_many_windows_as_the_real_ones(topic_data):
    with ScriptedLLMServer(truthful_judge) as server:
        run_scorer(
            "intruder", topic_data, server, examples_per_task=8, max_tasks=5
        )  # only 5 activating windows per latent
    shown = {
        len(re.findall(r"^Example \d+:", r["messages"][-1]["content"], re.MULTILINE))
        for r in server.requests
    }
    assert shown == {5}  # real: 4 activating + the intruder; control: 5 activating


def test_prompts_that_would_not_fit_the_judge_drop_examples_and_say_how_many(topic_data):
    from resources.llm import estimated_prompt_tokens

    window = 400
    with ScriptedLLMServer(truthful_judge) as server:
        frame, _ = run_scorer(
            "detection", topic_data, server, context_window=window, examples_per_prompt=10
        )
    for request in server.requests:
        assert estimated_prompt_tokens(request["messages"]) + request["max_tokens"] <= window
    assert (frame.n_dropped > 0).all() and (
        (frame.n_scored + frame.control_n_scored + frame.n_dropped) == 20
    ).all()


def test_a_newline_latent_is_shown_and_judged_as_line_breaks(subject):
    """A latent firing on line breaks: the judge sees them as ↵ in every example, so a truthful judge reading
    the explanation 'line breaks' scores it perfectly (before, newlines were printed as spaces)."""
    from assets.prompts import prompt_vocab

    tokenizer = subject.tokenizer()
    vocab = prompt_vocab(
        tokenizer.batch_decode([[i] for i in range(len(tokenizer))]), tokenizer.all_special_ids
    )
    rows = []
    for i in range(6):
        with_break = tokenizer(f"First line {i}.\nSecond line.", add_special_tokens=False)[
            "input_ids"
        ]
        without = tokenizer(f"First line {i}. Second line.", add_special_tokens=False)["input_ids"]
        acts = [2.0 if "\n" in tokenizer.decode([t]) else 0.0 for t in with_break]
        assert max(acts) > 0
        rows.append(
            {
                "latent": 7,
                "split": "test",
                "kind": "activating",
                "quantile": 1,
                "tokens": with_break,
                "activations": acts,
            }
        )
        rows.append(
            {
                "latent": 7,
                "split": "test",
                "kind": "random",
                "quantile": 0,
                "tokens": without,
                "activations": [0.0] * len(without),
            }
        )
    exemplars = pd.DataFrame(rows).assign(
        sequence=0, start=0, max_activation=lambda f: f["activations"].map(max)
    )
    explanations = pd.DataFrame({"latent": [7], "explanation": ["line breaks"], "status": "ok"})

    def judge(messages):
        examples = re.findall(r"^Example \d+: (.*)$", messages[-1]["content"], re.MULTILINE)
        return (
            str([int("↵" in e) for e in examples])
            if "line breaks" in messages[-1]["content"]
            else str([0] * len(examples))
        )

    with ScriptedLLMServer(judge) as server:
        frame, _ = run_scorer(
            "detection", (exemplars, explanations, vocab), server, examples_per_prompt=12
        )
    assert frame.balanced_accuracy.tolist() == [1.0]
    assert all("<|" not in r["messages"][-1]["content"] for r in server.requests)


def test_an_explainer_prompt_too_long_for_the_judge_drops_examples_and_records_how_many(topic_data):
    from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings
    from assets.explanations import ExplanationsConfig, explain_all
    from resources.llm import estimated_prompt_tokens

    exemplars, _, vocab = topic_data
    train = exemplars[exemplars.kind == "activating"].assign(
        split="train"
    )  # 6 windows a latent to show
    with ScriptedLLMServer(lambda m: "Explanation: the word cat") as server:
        client = LLMResource(
            backend="openai", base_url=server.base_url, model="m", context_window=360
        ).client()
        explainer = EXPLAINERS["highlighted"](ExplainerSettings(), ExplainerDeps(llm=client))
        frame = asyncio.run(
            explain_all(explainer, ExplanationsConfig(), train, None, [1, 2, 3], vocab, embed=None)
        )
    assert (frame.status == "ok").all() and frame.examples_dropped.between(1, 5).all()
    for request in server.requests:
        shown = len(re.findall(r"^Example \d+:", request["messages"][-1]["content"], re.MULTILINE))
        assert shown in set(6 - frame.examples_dropped)
        assert estimated_prompt_tokens(request["messages"]) + request["max_tokens"] <= 360


def test_an_explained_latent_without_exemplars_is_skipped_not_a_crash(topic_data):
    exemplars, explanations, vocab = topic_data
    stale = pd.concat(
        [
            explanations,
            pd.DataFrame({"latent": [99], "explanation": ["the word lamp"], "status": "ok"}),
        ],
        ignore_index=True,
    )
    said = []
    with ScriptedLLMServer(truthful_judge) as server:
        detection = SCORERS["detection"](
            scorer_settings({"detection": {"examples_per_prompt": 4}})["detection"],
            ScorerDeps(
                llm=LLMResource(backend="openai", base_url=server.base_url, model="m").client()
            ),
        )
        frame, _ = asyncio.run(
            score_partition(detection, exemplars, stale, vocab, report=said.append)
        )
    assert (
        sorted(frame.latent) == [1, 2, 3] and (frame.control_explanation != "the word lamp").all()
    )
    assert any("no exemplars (e.g. [99])" in line for line in said)


def test_latents_the_budget_stopped_are_not_kept_as_scored_and_are_asked_on_the_next_run(
    topic_data, tmp_path
):
    """A budget stop is no result: a latent it cut short (its own or its control's prompts) is not kept in
    the journal, so the next run (here: resuming the same journal without a budget) scores it whole."""
    from storage.journal import Journal

    exemplars, explanations, vocab = topic_data
    settings = scorer_settings({"detection": {"examples_per_prompt": 4}})[
        "detection"
    ]  # 3 prompts a job, 6 a latent

    def run(server, **budget):
        journal = Journal(tmp_path / "detection.parquet", "key", parts=("examples", "scores"))
        client = LLMResource(
            backend="openai",
            base_url=server.base_url,
            model="m",
            max_concurrency=1,
            cache_dir="",
            **budget,
        ).client()
        return asyncio.run(
            score_partition(
                SCORERS["detection"](settings, ScorerDeps(llm=client)),
                exemplars,
                explanations,
                vocab,
                journal=journal,
            )
        )

    with ScriptedLLMServer(truthful_judge) as server:
        frame, _ = run(server, max_requests=8)
        stopped = [
            row.latent
            for row in frame.itertuples()
            if any("budget" in reason for reason in json.loads(row.failures))
        ]
        assert len(server.requests) == 8 and stopped and len(stopped) < 3
        cut_short = frame[frame.latent.isin(stopped)]
        assert (
            cut_short[["balanced_accuracy", "control_balanced_accuracy", "gap"]].isna().all().all()
        )  # no score from part of its windows
        frame, _ = run(server)
    assert len(server.requests) == 8 + 6 * len(
        stopped
    )  # only the stopped latents were asked again, whole
    assert (
        (frame.n_failed == 0).all()
        and (frame.balanced_accuracy == 1.0).all()
        and (frame.failures == "[]").all()
    )


def test_the_summary_compares_a_mean_with_its_controls_over_the_same_latents(tmp_path):
    """Latent 700 has a score but no control: a mean over all three scores beside a control mean over
    two latents (0.767 / 0.500) would credit the scorer with a latent its control never saw."""
    from dagster import DagsterInstance, materialize

    from assets.scores import summary_asset, summary_is_stale, summary_sources
    from resources.settings import AutointerpSettings
    from storage.store import TableStore

    two_shards_of_scores(tmp_path)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shard", ["c/h|00", "c/h|01"])
    result = materialize(
        [summary_asset({"detection": SCORERS["detection"]})],
        resources={"settings": AutointerpSettings(data_dir=str(tmp_path))},
        instance=instance,
    )
    meta = result.asset_materializations_for_node("score_summary")[0].metadata
    assert "| 0.750 / 0.500 |" in meta["by_coder"].value
    assert meta["detection_mean"].value == 0.75 and meta["detection_mean_control"].value == 0.5
    store, scorers = TableStore.at(tmp_path), {"detection": SCORERS["detection"]}
    sources = summary_sources(store, "c/h", scorers)
    assert (
        "00/senses" in sources
        and "00/detection.senses" in sources
        and not summary_is_stale(store, "c/h", sources)
    )
    store.commit_summary(
        "c/h",
        store.score_summary("c/h").read(),
        {k: v for k, v in sources.items() if k != "code_version"},
    )  # as code before `senses` recorded it
    assert summary_is_stale(store, "c/h", sources)  # so the next run builds it with the new columns


def test_a_partitions_means_and_their_controls_are_over_the_same_latents(topic_data):
    from assets.scores import scorer_metadata

    with ScriptedLLMServer(truthful_judge) as server:
        frame, examples = run_scorer("detection", topic_data, server, examples_per_prompt=4)
    frame.loc[0, ["balanced_accuracy", "control_balanced_accuracy"]] = [
        0.7,
        np.nan,
    ]  # a control metric can be undefined
    meta = scorer_metadata(SCORERS["detection"], scorer_settings()["detection"], frame, examples)
    assert (
        meta["mean_balanced_accuracy"].value == 1.0
        and meta["mean_control_balanced_accuracy"].value == 0.5
    )  # latent 0 left out of both


def saebench_judge(messages):
    """Answers SAEBench's question from the explanation's words alone: the numbers of the texts
    holding the named word, or None."""
    word = re.search(r"this feature fires on the word (\w+)\.", messages[-1]["content"]).group(1)
    texts = re.findall(r"^(\d+)\. (.*)$", messages[-1]["content"], re.MULTILINE)
    return ", ".join(number for number, text in texts if f" {word}" in text) or "None"


def test_saebench_scores_the_true_explanation_high_and_its_control_at_the_answer_none_floor(
    topic_data,
):
    with ScriptedLLMServer(saebench_judge) as server:
        frame, examples = run_scorer("saebench", topic_data, server)
    assert len(server.requests) == 3 * 2  # one prompt per latent and per control
    # each latent has 5 activating and 5 random test windows: 2 top + 2 importance-sampled + all 5
    # random (of 10 asked) are shown
    assert (frame.n_scored == 9).all() and (frame.control_n_scored == 9).all()
    assert (frame.none_floor == 5 / 9).all() and (frame.control_none_floor == 5 / 9).all()
    assert (frame.accuracy == 1.0).all()
    assert (
        frame.control_accuracy == frame.none_floor
    ).all()  # another topic's word is in none of the windows: the judge answers None
    assert np.allclose(frame.gap, 4 / 9) and (frame.n_failed == 0).all()
    own = examples[examples.source == "explanation"]
    top_two = own.groupby("latent").activation.apply(lambda a: sorted(a, reverse=True)[:2])
    assert all(
        list(strongest) == [1.8, 1.6] for strongest in top_two.map(lambda a: np.round(a, 6))
    )  # the two strongest held-out windows are always shown


def test_saebench_floor_is_the_share_of_non_activating_windows_shown_with_other_sources_filling_in():
    def window(index, activation, kind):
        acts = np.array([0.0, activation], np.float32)
        return Example(
            index,
            [1, 2],
            ["a", "b"],
            acts,
            acts > 0,
            int(kind == "activating"),
            1 if kind == "activating" else 0,
            kind=kind,
        )

    examples = [window(i, 1.0 + i, "activating") for i in range(6)] + [
        window(6 + i, 0.0, kind)
        for i, kind in enumerate(["embedding", "random", "neighbour", "random"])
    ]
    settings = scorer_settings({"saebench": {"n_random_windows": 3}})["saebench"]
    shown = saebench_windows(examples, settings, np.random.default_rng(0))
    assert len(shown) == 7 and none_floor(shown) == 3 / 7
    assert {e.index for e in shown} >= {4, 5}  # the two strongest
    assert sorted(e.kind for e in shown if not e.label) == [
        "embedding",
        "random",
        "random",
    ]  # both random ones, then the first other source
    assert np.isnan(none_floor([]))  # no windows, no floor


@pytest.mark.parametrize("answer", ["Texts 1 and 3", "1, 99", "0", "", "1; 2"])
def test_saebench_unreadable_answers_are_failures_never_guesses(topic_data, answer):
    with ScriptedLLMServer(lambda messages: answer) as server:
        frame, examples = run_scorer("saebench", topic_data, server)
    assert (
        len(server.requests) == 3 * 2 * 2
    )  # each question asked once more after the unreadable answer
    assert (
        frame.accuracy.isna().all()
        and frame.control_accuracy.isna().all()
        and (frame.n_failed == 2 * 9).all()
    )
    assert (frame.none_floor == 5 / 9).all()  # the floor needs no answer
    assert all(
        json.loads(f)[0].startswith("unreadable answer") for f in frame.failures
    ) and not len(examples)


@pytest.mark.parametrize(
    "answer, numbers",
    [
        ("None", []),
        ("none.", []),
        ("[]", []),
        ("3, 5, 7", [3, 5, 7]),
        ("[2, 1]", [1, 2]),
        ("1, 2, and 9", [1, 2, 9]),
        ('"4 and 6".', [4, 6]),
    ],
)
def test_saebench_reads_lists_of_window_numbers_and_none(answer, numbers):
    assert read_window_numbers(9)(answer) == numbers


def test_settings_digests_keep_the_values_stored_results_were_written_under():
    """A digest is part of a code version: a new value would make every stored result stale."""
    from assets.explainers import EXPLAINERS
    from assets.stage_config import settings_digest

    settings = scorer_settings()
    assert settings["detection"].digest() == "9beaa67235"
    assert settings["simulation"].digest() == "3a0ca3c28c"
    assert EXPLAINERS["highlighted"].Settings().digest() == "44136fa355"
    assert EXPLAINERS["steering"].Settings().digest() == "ac797b23b2"
    assert settings_digest({"a": 1}) == "2696610e78"
