"""The asset checks of every stage: the pure functions on constructed tables, and one pipeline run that
records them (with their metadata, per partition) and lets a blocking failure stop the asset below."""

import math

import pandas as pd
from dagster import AssetCheckSeverity, DagsterInstance, materialize

from assets.checks import (
    LOW_EXPLAINABLE_SHARE,
    control_coverage,
    corpus_tokens,
    example_failures,
    explainable_latents,
    explanation_failures,
    explanations_not_empty,
    shards_present,
)
from tests.conftest import (
    TINY_CODER,
    TINY_CORPUS_CONFIG,
    TINY_EXEMPLARS_CONFIG,
    add_coders,
    all_assets,
    make_resources,
)
from tests.conftest import llm_resource as resource
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt

ERROR, WARN = AssetCheckSeverity.ERROR, AssetCheckSeverity.WARN


def corpus_meta(n_tokens: int, ctx_len: int = 64) -> dict:
    return {"n_tokens": n_tokens, "ctx_len": ctx_len, "hash": "abc123", "source": "embedded"}


def test_corpus_tokens_as_asked_fewer_or_none():
    asked = corpus_tokens(corpus_meta(640), 650)  # 650 asked is 10 whole sequences of 64
    assert (
        asked.passed
        and asked.metadata["requested_tokens"] == 640
        and asked.metadata["content_hash"] == "abc123"
    )
    fewer = corpus_tokens(corpus_meta(128), 640)
    assert (
        not fewer.passed
        and fewer.severity == WARN
        and "ran out after 2 of 10 sequences" in fewer.metadata["reason"]
    )
    none = corpus_tokens(corpus_meta(0), 640)
    assert not none.passed and none.severity == ERROR


def windows(*latents: tuple[int, int, int, int]) -> pd.DataFrame:
    """Exemplar rows of latents given as (latent, train activating, test activating, test non-activating)."""
    rows = []
    for latent, train, test, test_non in latents:
        rows += (
            [(latent, "train", "activating")] * train
            + [(latent, "test", "activating")] * test
            + [(latent, "test", "random")] * test_non
        )
        rows += [
            (latent, "train", "embedding")
        ]  # the contrastive explainer's windows count for nothing here
    return pd.DataFrame(rows, columns=["latent", "split", "kind"])


def test_explainable_latents_share_and_when_nothing_is_explainable():
    table = windows(
        (1, 6, 5, 5), (2, 6, 5, 0), (3, 0, 5, 5)
    )  # only latent 1 has every kind it needs
    checked = explainable_latents(table, live_latents=10)
    assert (
        checked.passed
        and checked.metadata["explainable_latents"] == 1
        and checked.metadata["explainable_share"] == 0.1
    )
    low = explainable_latents(table, live_latents=int(2 / LOW_EXPLAINABLE_SHARE))
    assert not low.passed and low.severity == WARN
    nothing = explainable_latents(windows((2, 6, 5, 0)), live_latents=10)
    assert (
        not nothing.passed and nothing.severity == WARN
    )  # flagged; the stages below write empty tables, asking nothing
    no_live = explainable_latents(windows(), live_latents=0)
    assert no_live.passed and math.isnan(no_live.metadata["explainable_share"])


def explanations(*statuses_and_texts: tuple[str, str]) -> pd.DataFrame:
    rows = [(i, status, text) for i, (status, text) in enumerate(statuses_and_texts)]
    return pd.DataFrame(rows, columns=["latent", "status", "explanation"])


def test_explanation_failures_warn_above_half_and_error_when_all_failed():
    assert explanation_failures(
        explanations(("ok", "a"), ("failed", ""))
    ).passed  # half is not above half
    most = explanation_failures(explanations(("ok", "a"), ("failed", ""), ("failed", "")))
    assert not most.passed and most.severity == WARN and most.metadata["failure_share"] == 2 / 3
    every = explanation_failures(explanations(("failed", ""), ("failed", "")))
    assert not every.passed and every.severity == ERROR
    empty_shard = explanation_failures(explanations())
    assert empty_shard.passed and math.isnan(empty_shard.metadata["failure_share"])


def test_an_empty_explanation_with_status_ok_is_an_error():
    assert explanations_not_empty(explanations(("ok", "a"), ("failed", ""))).passed
    empty = explanations_not_empty(explanations(("ok", "a"), ("ok", "  ")))
    assert not empty.passed and empty.severity == ERROR and empty.metadata["empty_latents"] == "[1]"


def scores(notes: list[str], failed: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"latent": range(len(notes)), "control_note": notes, "n_failed": failed})


def test_control_coverage_and_example_failures_warn():
    covered = control_coverage(scores(["", "", "no control: x"], [0, 0, 0]))
    assert covered.passed and covered.metadata["control_share"] == 2 / 3
    uncovered = control_coverage(scores(["no control: x"], [0]))
    assert not uncovered.passed and uncovered.severity == WARN
    nothing_scored = pd.DataFrame()  # what an empty shard's scoring gives
    assert control_coverage(nothing_scored).passed and math.isnan(
        control_coverage(nothing_scored).metadata["control_share"]
    )
    assert example_failures(nothing_scored, scored_examples=0).passed
    few = example_failures(scores(["", ""], [1, 0]), scored_examples=19)
    assert few.passed and (
        few.metadata["examples"],
        few.metadata["failed"],
        few.metadata["failure_share"],
    ) == (20, 1, 0.05)
    many = example_failures(scores(["", ""], [5, 5]), scored_examples=10)
    assert not many.passed and many.severity == WARN and many.metadata["failure_share"] == 0.5


def test_shards_present_names_the_missing_shards_per_coder():
    expected = {"a/l1": ["00", "01", "02"], "b/l2": ["00"]}
    assert shards_present(expected, {"a/l1": ["00", "01", "02"], "b/l2": ["00"]}).passed
    missing = shards_present(expected, {"a/l1": ["01"]})
    assert not missing.passed and missing.severity == WARN
    assert (
        missing.metadata["missing_by_coder"] == {"a/l1": ["00", "02"], "b/l2": ["00"]}
        and missing.metadata["missing_shards"] == 3
    )


def evaluations(result) -> dict[tuple[str, str], object]:
    """(asset, check) → its evaluation in a run."""
    return {
        (e.asset_key.to_user_string(), e.check_name): e
        for e in result.get_asset_check_evaluations()
    }


def test_checks_are_recorded_per_partition_and_a_shard_of_rare_latents_is_flagged_not_failed(
    registered,
):
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    assets = all_assets()
    with ScriptedLLMServer(answer_by_prompt) as server:
        resources = make_resources(registered, max_latents=2, llm=resource(server))

        def run(selection, partition, config=None):
            return materialize(
                assets,
                selection=selection,
                partition_key=partition,
                resources=resources,
                instance=instance,
                run_config=config or {},
                raise_on_error=False,
            )

        corpus = evaluations(
            run(["corpus"], None, {"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}})
        )[("corpus", "token_count")]
        assert (
            corpus.passed
            and corpus.metadata["tokens"].value == 64 * 48
            and len(corpus.metadata["content_hash"].value) == 16
        )
        assert run(["activations"], f"{TINY_CODER}|00").success

        shard = run(
            ["exemplars", "explanations", "scores/detection"],
            f"{TINY_CODER}|00",
            {"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}},
        )
        assert shard.success
        checked = evaluations(shard)
        assert {e.partition for e in checked.values()} == {f"{TINY_CODER}|00"}
        explainable = checked[("exemplars", "explainable_latents")]
        assert (
            explainable.passed
            and 0
            < explainable.metadata["explainable_latents"].value
            <= explainable.metadata["live_latents"].value
        )
        assert checked[("explanations", "explanation_failures")].metadata["latents"].value == 2
        assert checked[("explanations", "explanations_not_empty")].passed
        failures = checked[("scores/detection", "example_failures")]
        assert (
            failures.passed
            and failures.metadata["failure_share"].value == 0
            and failures.metadata["examples"].value == 2 * 2 * (5 + 5)
        )  # 2 latents, each with its control, on 5 + 5 test windows
        assert (
            checked[("scores/detection", "control_coverage")].metadata["control_share"].value == 1
        )

        asked = len(server.requests)
        nothing_qualifies = {
            "ops": {
                "exemplars": {"config": {**TINY_EXEMPLARS_CONFIG, "min_activating_windows": 10**9}}
            }
        }
        rare = run(["exemplars", "explanations"], f"{TINY_CODER}|01", nothing_qualifies)
        summary = run(["score_summary"], None)

    assert rare.success  # a shard whose latents all fire too rarely: flagged, not an error
    flagged = evaluations(rare)[("exemplars", "explainable_latents")]
    assert (
        not flagged.passed
        and flagged.severity == WARN
        and flagged.metadata["live_latents"].value > 0
        and flagged.metadata["explainable_latents"].value == 0
    )
    assert [m.partition for m in rare.asset_materializations_for_node("explanations")] == [
        f"{TINY_CODER}|01"
    ] and len(server.requests) == asked  # empty, nothing asked

    coverage = evaluations(summary)[("score_summary", "shards_present")]
    assert not coverage.passed and coverage.severity == WARN
    assert coverage.metadata["missing_by_coder"].value == {
        TINY_CODER: [f"{i:02d}" for i in range(1, 8)]
    }
