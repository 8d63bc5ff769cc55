"""Refining explanations from their mistakes on `valid` windows, proved on latents whose truth we plant
(`tests/planted_latents.py`): a scripted explainer that first answers too broadly and a judge that
answers from what the description literally says."""

import asyncio

import pandas as pd
import pytest

from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings
from assets.explanations import ExplanationsConfig, explain_all
from assets.prompts import highlight
from assets.refine import Refiner
from assets.scorers import SCORERS, ScorerDeps, scorer_settings
from assets.scores import score_partition
from tests.conftest import llm_resource
from tests.planted_latents import planted_exemplars, scripted_llm
from tests.scripted_llm_server import ScriptedLLMServer

PLANTED = {
    1: ("digits",),
    2: ("digits",),
    3: ("digits",),
    4: ("capitalized words",),
    5: ("capitalized words",),
    6: ("capitalized words",),
    7: ("digits", "capitalized words"),
}
SINGLE_SENSE = [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def planted(subject):
    tokenizer = subject.tokenizer()
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return planted_exemplars(tokenizer, PLANTED), vocab


def explain(server, exemplars, vocab, rounds=0):
    """Explanations of every planted latent (single shot, or refined for at most `rounds` rounds)
    and the refine rows."""
    explainer = EXPLAINERS["highlighted"](
        ExplainerSettings(), ExplainerDeps(llm=llm_resource(server).client())
    )
    refiner = Refiner(llm_resource(server).client(), rounds, 48) if rounds else None
    rows = []
    frame = asyncio.run(
        explain_all(
            explainer,
            ExplanationsConfig(refine_rounds=rounds),
            exemplars,
            None,
            sorted(set(exemplars["latent"])),
            vocab,
            None,
            refiner=refiner,
            rounds=rows,
        )
    )
    return frame, rows


def detection(server, exemplars, frame, vocab):
    """Detection scores on the test windows: the single-sense latents in one partition (each with another's
    explanation as its control), the two-sense latent in its own (its explanation names the others' senses)."""
    scorer = SCORERS["detection"](
        scorer_settings()["detection"], ScorerDeps(llm=llm_resource(server).client())
    )
    parts = [
        asyncio.run(
            score_partition(scorer, exemplars, frame[frame["latent"].isin(latents)], vocab)
        )[0]
        for latents in (SINGLE_SENSE, [7])
    ]
    return pd.concat(parts).set_index("latent")


def shown_texts(exemplars, vocab, split):
    return [
        highlight([vocab[t] for t in tokens], [False] * len(tokens))
        for tokens in exemplars[exemplars["split"] == split]["tokens"]
    ]


def test_refining_narrows_a_too_broad_explanation_using_only_valid_windows(planted):
    exemplars, vocab = planted
    with ScriptedLLMServer(scripted_llm) as server:
        single, no_rounds = explain(server, exemplars, vocab)
        single_requests = len(server.requests)
        refined, rounds = explain(server, exemplars, vocab, rounds=3)
        refine_requests = server.requests[single_requests:]
        single_scores, refined_scores = (
            detection(server, exemplars, single, vocab),
            detection(server, exemplars, refined, vocab),
        )

    assert no_rounds == [] and single_requests == len(PLANTED)
    explanation = dict(zip(refined["latent"], refined["explanation"], strict=False))
    assert dict(zip(single["latent"], single["explanation"], strict=False)) == {
        **{i: "digits" for i in (1, 2, 3, 7)},
        **{i: "capitalized words" for i in (4, 5, 6)},
    }
    assert {explanation[i] for i in (1, 2, 3)} == {"digits inside parentheses"} and {
        explanation[i] for i in (4, 5, 6)
    } == {"capitalized words inside quotation marks"}
    assert (
        explanation[7] == "digits inside parentheses or capitalized words inside quotation marks"
    )  # both senses named

    # the refine prompts showed valid windows and never a test window
    contents = "\n".join(m["content"] for r in refine_requests for m in r["messages"])
    assert all(text not in contents for text in shown_texts(exemplars, vocab, "test"))
    assert sum(text in contents for text in shown_texts(exemplars, vocab, "valid")) > len(PLANTED)

    # every round is stored with its valid score; a perfect valid score ends the rounds early
    assert [(r["latent"], r["round"], r["kept"]) for r in rounds] == [
        (latent, n, True) for latent in PLANTED for n in (0, 1)
    ]
    first = {r["latent"]: r for r in rounds if r["round"] == 0}
    assert all(
        first[i]["valid_balanced_accuracy"] == 0.7
        and first[i]["false_positives"] == 3
        and first[i]["false_negatives"] == 0
        for i in SINGLE_SENSE
    )
    assert first[7]["false_negatives"] > 0
    assert all(
        r["valid_balanced_accuracy"] == 1.0 and r["false_positives"] == r["false_negatives"] == 0
        for r in rounds
        if r["round"] == 1
    )
    # per latent: the first explanation, its judging (10 valid windows in one prompt), one revision and its judging
    assert [r["requests"] for r in rounds] == [1, 2] * len(PLANTED) and len(
        refine_requests
    ) == 4 * len(PLANTED)

    # on the test windows: single shot fires on digits (or capitals) outside their container too;
    # refined does not; the control stays at chance
    single_ba, refined_ba = (
        single_scores.loc[SINGLE_SENSE, "balanced_accuracy"],
        refined_scores.loc[SINGLE_SENSE, "balanced_accuracy"],
    )
    assert (single_ba == 0.7).all() and (refined_ba == 1.0).all()
    assert refined_ba.mean() - single_ba.mean() >= 0.25
    assert (refined_scores.loc[SINGLE_SENSE, "control_balanced_accuracy"] == 0.5).all()
    assert (single_scores.loc[SINGLE_SENSE, "control_balanced_accuracy"] == 0.5).all()
    assert (
        refined_scores.loc[7, "balanced_accuracy"] == 1.0
        and single_scores.loc[7, "balanced_accuracy"] < 0.75
    )


def test_a_revision_that_scores_no_better_on_valid_windows_is_not_kept_nor_asked_again(planted):
    exemplars, vocab = planted

    def stubborn(messages):
        """Revises every explanation to 'capitalized words', which fits none of a digits latent's windows."""
        if "Description:" not in messages[-1]["content"] and len(messages) > 2:
            return "Explanation: capitalized words"
        return scripted_llm(messages)

    with ScriptedLLMServer(stubborn) as server:
        refined, rounds = explain(server, exemplars[exemplars["latent"] == 1], vocab, rounds=2)
        revisions = [
            r["messages"][-1]["content"] for r in server.requests if len(r["messages"]) > 2
        ]
    assert refined["explanation"].tolist() == ["digits"]
    assert [(r["round"], r["explanation"], r["kept"]) for r in rounds] == [
        (0, "digits", True),
        (1, "capitalized words", False),
        (2, "capitalized words", False),
    ]
    assert rounds[1]["valid_balanced_accuracy"] == 0.5
    assert (
        "Already tried" not in revisions[0]
        and "Already tried, and no better: 'capitalized words'." in revisions[1]
    )


def test_an_interrupted_refine_run_keeps_its_finished_latents_rounds_and_asks_only_for_the_rest(
    planted, tmp_path
):
    from storage.journal import Journal

    exemplars, vocab = planted
    table = tmp_path / "00.parquet"
    with ScriptedLLMServer(scripted_llm) as server:
        explainer = EXPLAINERS["highlighted"](
            ExplainerSettings(), ExplainerDeps(llm=llm_resource(server).client())
        )

        def run(latents, journal):
            rows = []
            frame = asyncio.run(
                explain_all(
                    explainer,
                    ExplanationsConfig(refine_rounds=2),
                    exemplars,
                    None,
                    latents,
                    vocab,
                    None,
                    journal=journal,
                    refiner=Refiner(llm_resource(server).client(), 2, 48),
                    rounds=rows,
                )
            )
            return frame, rows

        with Journal(
            table, "key", parts=("rounds", "rows")
        ) as killed:  # a run that finished latents 1 and 2, then died
            run([1, 2], killed)
            killed.flush()
        before = len(server.requests)
        with Journal(table, "key", parts=("rounds", "rows")) as journal:
            frame, rounds = run(list(PLANTED), journal)
        asked = len(server.requests) - before
    assert asked == 4 * (len(PLANTED) - 2)
    assert sorted((r["latent"], r["round"]) for r in rounds) == [
        (latent, n) for latent in PLANTED for n in (0, 1)
    ]
    assert (
        frame.set_index("latent").loc[[1, 2], "explanation"].tolist()
        == ["digits inside parentheses"] * 2
    )


def test_the_explanations_asset_refines_with_the_judge_and_stores_every_round(registered):
    from dagster import DagsterInstance

    from storage.store import TableStore
    from tests.conftest import TINY_CODER, add_coders, make_resources, pipeline_until_exemplars, run
    from tests.scripted_llm_server import answer_by_prompt

    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    with ScriptedLLMServer(answer_by_prompt) as server:
        llm = llm_resource(server, cache_dir="", judge={"model": "judge-model"})
        result = run(
            ["explanations"],
            f"{TINY_CODER}|00",
            make_resources(registered, max_latents=3, llm=llm),
            instance,
            {"ops": {"explanations": {"config": {"refine_rounds": 1}}}},
        )
    store = TableStore.at(registered)
    explained, rounds = (
        store.explanations(TINY_CODER, "00").read(),
        store.explanation_rounds(TINY_CODER, "00").read(),
    )
    assert (explained["status"] == "ok").all() and len(explained) == 3
    assert sorted(set(rounds["latent"])) == sorted(explained["latent"]) and set(
        rounds["round"]
    ) == {0, 1}
    judged = [r for r in server.requests if "Description:" in r["messages"][-1]["content"]]
    assert judged and {r["model"] for r in judged} == {
        "judge-model"
    }  # the deployment's judge, not the explainer
    kept = rounds[rounds["kept"]].sort_values("round").groupby("latent")["explanation"].last()
    assert explained.set_index("latent")["explanation"].to_dict() == kept.to_dict()
    metadata = result.asset_materializations_for_node("explanations")[0].metadata
    assert (
        metadata["judge_model"].value.endswith("judge-model")
        and metadata["requests_per_latent"].value == len(server.requests) / 3
    )


def test_a_latent_whose_refining_the_budget_stopped_is_failed_so_that_the_next_run_refines_it(
    planted,
):
    exemplars, vocab = planted
    with ScriptedLLMServer(scripted_llm) as server:
        explainer = EXPLAINERS["highlighted"](
            ExplainerSettings(), ExplainerDeps(llm=llm_resource(server).client())
        )
        judge = llm_resource(
            server, max_requests=1
        ).client()  # enough to judge the first explanation, not its revision
        rows = []
        frame = asyncio.run(
            explain_all(
                explainer,
                ExplanationsConfig(refine_rounds=2),
                exemplars,
                None,
                [1],
                vocab,
                None,
                refiner=Refiner(judge, 2, 48),
                rounds=rows,
            )
        )
    assert (
        frame["status"].tolist() == ["failed"]
        and frame["error"].iloc[0].startswith("budget stopped")
        and rows == []
    )


def test_a_deployment_that_does_not_refine_keeps_the_code_version_it_had_before_refine_rounds_existed():
    """Upgrading must not re-run every deployment's explanations: `refine_rounds` at 0 is left out of the digest,
    whether the deployment is silent or writes it; any other value is in it."""
    from assets.explanations import ExplanationsConfig
    from assets.stage_config import settings_digest, with_defaults

    before = {
        key: value
        for key, value in ExplanationsConfig().model_dump().items()
        if key not in ("refine_rounds", "senses", "stability_latents")
    }  # all three added later
    assert settings_digest(ExplanationsConfig()) == settings_digest(before)
    assert settings_digest(
        with_defaults(ExplanationsConfig, {"refine_rounds": 0}, "explanations")()
    ) == settings_digest(before)
    assert settings_digest(
        with_defaults(ExplanationsConfig, {"refine_rounds": 2}, "explanations")()
    ) != settings_digest(before)
