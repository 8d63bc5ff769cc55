"""Stability across reseeds (`[explanations] stability_latents`): a second draw of top windows, disjoint from
every other window of the latent, a second explanation from it, both scored on the same windows, and the
paired difference reported per coder. Off (0), nothing changes: no digest, no table, no score."""

import re
import zlib

import numpy as np
import pandas as pd
import pytest

from assets.exemplars import ExemplarsConfig, exemplar_batches
from assets.explanations import ExplanationsConfig
from assets.records import RESEED, LatentRecord
from assets.score_metrics import mean_interval
from assets.stability import current_reseeds, reseed_stability
from tests.assets.test_exemplars import WINDOW, sources_without_index, stats_for, synthetic_shard
from tests.scripted_llm_server import answer_by_prompt


def code_version(asset) -> str:
    return next(iter(asset.code_versions_by_key.values()))


def test_off_changes_no_digest_and_no_code_version():
    from assets.exemplars import exemplars_asset
    from assets.explanations import explanations_asset
    from assets.stage_config import digest_values, settings_digest, with_defaults

    assert "stability_latents" not in digest_values(ExplanationsConfig())
    off = with_defaults(ExplanationsConfig, {"stability_latents": 0}, "explanations")()
    on = with_defaults(ExplanationsConfig, {"stability_latents": 2}, "explanations")()
    assert settings_digest(off) == settings_digest(ExplanationsConfig()) != settings_digest(on)
    assert (
        code_version(explanations_asset({}))
        == code_version(explanations_asset({"stability_latents": 0}))
        != code_version(explanations_asset({"stability_latents": 2}))
    )
    assert code_version(exemplars_asset({})) == code_version(exemplars_asset({}, reseed_latents=0))
    assert code_version(exemplars_asset({}, reseed_latents=2)).endswith("-reseed2")


def exemplars_of(config: ExemplarsConfig, reseed_latents: int) -> pd.DataFrame:
    tokens, shard = synthetic_shard(n_seq=80)
    batches = exemplar_batches(
        shard,
        tokens,
        config,
        sources_without_index(tokens),
        stats_for(shard),
        tokens.size,
        reseed_latents=reseed_latents,
    )
    return pd.concat([frame for frame, _ in batches], ignore_index=True)


@pytest.mark.parametrize("sampler", ["top", "random"])
def test_the_reseed_draw_is_disjoint_from_every_other_window_and_changes_no_other_draw(sampler):
    config = ExemplarsConfig(
        example_ctx_len=WINDOW,
        sampler=sampler,
        n_examples_train=4,
        n_examples_test=5,
        n_non_activating=4,
        non_activating_sources=["random"],
    )
    off, on = exemplars_of(config, 0), exemplars_of(config, 2)
    pd.testing.assert_frame_equal(
        on[on["split"] != RESEED].reset_index(drop=True), off
    )  # every other window as it was, in the same order
    drawn = on[on["split"] == RESEED]
    assert sorted(set(drawn["latent"])) == [3, 4]  # the first two latents of the shard
    for latent, second in drawn.groupby("latent"):
        rows = on[on["latent"] == latent]
        activating = rows[(rows["kind"] == "activating") & (rows["split"] != RESEED)]
        assert len(second) == 4 and (second["kind"] == "activating").all()
        assert not set(zip(second["sequence"], second["start"], strict=True)) & set(
            zip(activating["sequence"], activating["start"], strict=True)
        )
        if sampler == "top":  # the next strongest windows after the explainer's first draw
            train = activating[activating["split"] == "train"]
            assert second["max_activation"].max() <= train["max_activation"].min()


def test_a_reseeded_record_shows_the_explainer_the_second_draw_and_keeps_the_rest():
    windows = pd.DataFrame(
        {
            "split": ["train", "train", "train", RESEED, RESEED, "valid", "test"],
            "kind": ["activating", "activating", "random", "activating", "activating"]
            + ["activating", "activating"],
            "tokens": [[0], [1], [2], [3], [4], [5], [6]],
            "activations": [[1.0]] * 7,
            "max_activation": [1.0, 0.9, 0.0, 0.8, 0.7, 0.5, 0.5],
        }
    )
    record = LatentRecord("c/h", 1, windows, None, [f"t{i}" for i in range(7)])
    second = record.reseeded()
    assert [tokens for tokens, _ in second.shown_examples()[0]] == [["t3"], ["t4"]]
    assert [tokens for tokens, _ in record.shown_examples()[0]] == [["t0"], ["t1"]]
    assert second.train("random")["tokens"].tolist() == [[2]]  # counter-examples kept
    assert sorted(second.windows["split"]) == ["test", "train", "train", "train", "valid"]


def test_stability_is_the_paired_mean_absolute_difference_with_its_interval():
    first = pd.Series([0.9, 0.6, 0.8, np.nan], index=[1, 2, 3, 4])
    second = pd.Series([0.7, 0.6, 0.5, 0.4], index=[1, 2, 3, 4])
    similarity = pd.Series([0.5, 0.9, 0.7, 0.1], index=[1, 2, 3, 4])
    said = reseed_stability(first, second, similarity)
    differences = [0.2, 0.0, 0.3]  # latent 4 has no first score: not paired
    lo, hi = mean_interval(differences)
    assert said["latents"] == 3
    assert said["mean_abs_difference"] == pytest.approx(np.mean(differences))
    assert said["mean_abs_difference_interval"] == pytest.approx([max(0.0, lo), hi])
    assert said["similarity"] == pytest.approx(0.7)
    assert said["similarity_interval"] == pytest.approx(list(mean_interval([0.5, 0.9, 0.7])))


def test_only_second_texts_of_current_explanations_count():
    reseeds = pd.DataFrame(
        {
            "latent": [1, 2, 3],
            "explanation": ["b1", "b2", ""],
            "first_explanation": ["a1", "an older text", "a3"],
            "similarity": [0.5, 0.6, np.nan],
            "status": ["ok", "ok", "failed"],
        }
    )
    explanations = pd.DataFrame(
        {"latent": [1, 2, 3], "explanation": ["a1", "a2", "a3"], "status": "ok"}
    )
    assert current_reseeds(reseeds, explanations)["latent"].tolist() == [1]
    assert current_reseeds(None, explanations).empty


def judge_by_prompt(messages) -> str:
    """`answer_by_prompt`, except that a judge's 0/1 list is drawn from its prompt (which holds the explanation):
    two texts of one latent are judged differently, so their scores may differ."""
    answer = answer_by_prompt(messages)
    asked = re.search(r"Answer with (\d+) numbers", messages[-1]["content"])
    if asked is None or answer.startswith("Explanation"):
        return (
            answer  # the explainer's answer: its own for each prompt, so for each draw of windows
        )
    bits = zlib.crc32(messages[-1]["content"].encode())
    return str([(bits >> i) & 1 for i in range(int(asked.group(1)))])


def test_the_pipeline_re_explains_scores_and_reports_both_texts_and_off_changes_nothing(
    registered,
):
    """Through the exemplars, explanations and scores/detection assets on the tiny coder, with a scripted
    LLM: off, no reseed table is written; on, the first two latents get a second text from windows none of
    their others are, detection scores it on the same windows, and the summary, `autointerp scores` numbers
    and the latent page show it beside the first. The first texts' scores are those made with it off."""
    from dagster import DagsterInstance

    from assets.scorers import SCORERS
    from assets.scores import coder_summary, summary_table
    from autointerp_defs.definitions import build_definitions
    from autointerp_defs.readside.app import Viewer
    from storage.store import TableStore
    from tests.conftest import (
        TINY_CODER,
        TINY_EXEMPLARS_CONFIG,
        add_coders,
        llm_resource,
        make_resources,
        pipeline_until_exemplars,
    )
    from tests.scripted_llm_server import ScriptedLLMServer

    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    store = TableStore.at(registered)
    partition = f"{TINY_CODER}|00"
    exemplars_config = {
        "ops": {
            "exemplars": {
                "config": {**TINY_EXEMPLARS_CONFIG, "n_examples_train": 3, "n_examples_valid": 1}
            }
        }
    }

    def materialize(stability: int, server) -> None:
        from dagster import materialize as run

        assets = list(
            build_definitions("local", {"explanations": {"stability_latents": stability}}).assets
        )
        resources = make_resources(
            registered, max_latents=4, llm=llm_resource(server, cache_dir="")
        )
        for selection, config in (
            (["exemplars"], exemplars_config),
            (["explanations"], {}),
            (["scores/detection"], {}),
        ):
            run(
                assets,
                selection=selection,
                partition_key=partition,
                resources=resources,
                instance=instance,
                run_config=config,
                raise_on_error=True,
            )

    with ScriptedLLMServer(judge_by_prompt) as server:
        materialize(0, server)
        assert not store.explanation_reseeds(TINY_CODER, "00").exists()
        assert not store.reseed_scores(TINY_CODER, "00", "detection").exists()
        scores_off = store.scores(TINY_CODER, "00", "detection").read()
        explanations_off = store.explanations(TINY_CODER, "00").read()
        materialize(2, server)

    explained = store.explanations(TINY_CODER, "00").read()
    pd.testing.assert_frame_equal(
        explained.drop(columns="exemplars_fingerprint"),
        explanations_off.drop(columns="exemplars_fingerprint"),
    )  # the first texts: the same windows, the same answers
    pd.testing.assert_frame_equal(store.scores(TINY_CODER, "00", "detection").read(), scores_off)

    exemplars = store.exemplars(TINY_CODER, "00").read()
    reseeds = store.explanation_reseeds(TINY_CODER, "00").read()
    drawn = exemplars[exemplars["split"] == RESEED]
    assert sorted(reseeds["latent"]) == sorted(set(drawn["latent"])) and len(reseeds) == 2
    first = explained.set_index("latent")["explanation"]
    for row in reseeds.itertuples():
        mine = exemplars[exemplars["latent"] == row.latent]
        second = mine[mine["split"] == RESEED]
        others = mine[(mine["split"] != RESEED) & (mine["kind"] == "activating")]
        assert not set(zip(second["sequence"], second["start"], strict=True)) & set(
            zip(others["sequence"], others["start"], strict=True)
        )
        assert row.status == "ok" and row.windows == len(second) > 0
        assert (
            row.first_explanation == first[row.latent] != row.explanation
        )  # other windows, other text
        assert -1.0 <= row.similarity <= 1.0

    scored = store.reseed_scores(TINY_CODER, "00", "detection").read().set_index("latent")
    assert sorted(scored.index) == sorted(reseeds["latent"])
    assert (scored.loc[reseeds["latent"], "explanation"] == reseeds["explanation"].values).all()
    assert (scored["control_explanation"] == "").all() and scored["n_scored"].gt(0).all()

    table = summary_table(store, TINY_CODER, {"detection": SCORERS["detection"]}).set_index(
        "latent"
    )
    main = SCORERS["detection"].main_metric
    firsts = scores_off.set_index("latent")[main]
    assert table.loc[scored.index, "detection_reseed"].tolist() == scored[main].tolist()
    assert table["detection_reseed"].notna().sum() == 2
    said = coder_summary(table.reset_index(), {"detection": SCORERS["detection"]})["detection"]
    differences = (firsts[scored.index] - scored[main]).abs()
    assert said["stability"]["latents"] == 2
    assert said["stability"]["mean_abs_difference"] == pytest.approx(differences.mean())
    assert said["stability"]["similarity"] == pytest.approx(reseeds["similarity"].mean())

    page = Viewer(store).latent(TINY_CODER, int(reseeds["latent"].iloc[0]))
    shown = page["explanation"]["reseed"]
    assert shown["text"] == reseeds["explanation"].iloc[0] != page["explanation"]["text"]
    assert shown["scores"]["detection"]["score"] == pytest.approx(
        scored.loc[reseeds["latent"].iloc[0], main]
    )
    other = int(explained.loc[~explained["latent"].isin(reseeds["latent"]), "latent"].iloc[0])
    assert Viewer(store).latent(TINY_CODER, other)["explanation"]["reseed"] is None


def test_the_summary_and_autointerp_scores_pair_each_second_text_with_its_first(tmp_path, capsys):
    """On the scores of `two_shards_of_scores` (detection: latent 1 0.9, latent 2 0.6): without second texts the
    summary and its sources are as before; with them, `detection_reseed` and `reseed_similarity` pair each
    current second text's score with the first's, and `autointerp scores` reports the mean difference."""
    import json

    from assets.scorers import SCORERS
    from assets.scores import summary_sources, summary_table
    from autointerp_defs.cli import print_scores
    from storage.store import TableStore
    from storage.tables import write_table
    from tests.conftest import two_shards_of_scores

    root = two_shards_of_scores(tmp_path)
    store = TableStore(root)
    scorers = {"detection": SCORERS["detection"]}
    before, sources = summary_table(store, "c/h", scorers), summary_sources(store, "c/h", scorers)
    assert not [c for c in before.columns if "reseed" in c]
    reseeds = pd.DataFrame(
        {
            "latent": [1, 2],
            "explanation": ["f1", "f2"],
            "first_explanation": ["e1", "e2a or e2b"],
            "windows": 4,
            "similarity": [0.4, 0.6],
            "status": "ok",
            "error": "",
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
    )
    write_table(reseeds, store.explanation_reseeds("c/h", "00").path, "explanation_reseeds")
    pd.DataFrame(
        {"latent": [1, 2], "explanation": ["f1", "f2"], "balanced_accuracy": [0.5, 0.7]}
    ).to_parquet(store.reseed_scores("c/h", "00", "detection").path)
    after = summary_sources(store, "c/h", scorers)
    assert {k: v for k, v in after.items() if "reseeds" not in k} == sources
    assert set(after) - set(sources) == {"00/reseeds", "00/detection.reseeds"}
    table = summary_table(store, "c/h", scorers)
    pd.testing.assert_frame_equal(
        table[before.columns], before
    )  # the columns it had are as they were
    assert table.set_index("latent")["detection_reseed"].to_dict() == pytest.approx(
        {1: 0.5, 2: 0.7, 700: np.nan}, nan_ok=True
    )
    write_table(table, root.score_summary_path("c/h"), "score_summary")
    print_scores(store, "c/h", scorers, as_json=True)
    said = json.loads(capsys.readouterr().out)["scorers"]["detection"]["stability"]
    assert said["latents"] == 2 and said["mean_abs_difference"] == pytest.approx(0.25)
    assert said["similarity"] == pytest.approx(0.5)
    print_scores(store, "c/h", scorers)
    assert "reseeded: mean |first - second| 0.250 [0.000, " in capsys.readouterr().out
