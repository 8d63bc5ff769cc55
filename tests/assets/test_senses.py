"""Several senses per latent (`[explanations] senses`), proved on latents planted with one or two senses
(`tests/planted_latents.py`): the scripted explainer names the commonest class its prompt shows, so a
latent gets both of its senses named only when each sense is explained from its own windows."""

import asyncio

import pytest

from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings
from assets.explanations import ExplanationsConfig, explain_all
from resources.embedder import EmbedderResource
from tests.conftest import llm_resource
from tests.planted_latents import planted_exemplars, scripted_llm, senses_of
from tests.scripted_llm_server import ScriptedLLMServer

PLANTED = {
    1: ("digits",),
    2: ("capitalized words",),
    3: ("symbols",),
    4: ("digits", "capitalized words"),
    5: ("capitalized words", "symbols"),
    6: ("digits", "symbols"),
}


@pytest.fixture(scope="module")
def planted(subject):
    tokenizer = subject.tokenizer()
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return planted_exemplars(tokenizer, PLANTED), vocab


def explain(server, exemplars, vocab, senses: int):
    explainer = EXPLAINERS["highlighted"](
        ExplainerSettings(), ExplainerDeps(llm=llm_resource(server).client())
    )
    rows = []
    frame = asyncio.run(
        explain_all(
            explainer,
            ExplanationsConfig(senses=senses),
            exemplars,
            None,
            sorted(PLANTED),
            vocab,
            EmbedderResource().embed,
            senses=rows,
        )
    )
    return frame.set_index("latent"), rows


def test_two_sense_latents_get_both_senses_named_and_one_sense_latents_one_explanation(planted):
    exemplars, vocab = planted
    with ScriptedLLMServer(scripted_llm) as server:
        single, no_senses = explain(server, exemplars, vocab, senses=1)
        several, senses = explain(server, exemplars, vocab, senses=3)
    assert no_senses == [] and all(
        len(senses_of(e)) == 1 for e in single["explanation"]
    )  # today's behaviour: one class named
    assert (several["status"] == "ok").all()
    for latent, classes in PLANTED.items():
        named = {cls for cls, _ in senses_of(several.loc[latent, "explanation"])}
        assert named == set(classes), (latent, several.loc[latent, "explanation"])
        rows = [r for r in senses if r["latent"] == latent]
        assert len(rows) == (len(classes) if len(classes) > 1 else 0)
        assert sorted(r["explanation"] for r in rows) == (
            sorted(classes) if len(classes) > 1 else []
        )
        assert sum(r["windows"] for r in rows) in (
            0,
            8,
        )  # every train activating window is in one sense


def test_senses_at_one_keep_the_code_version_they_had_before_the_option_existed():
    from assets.stage_config import settings_digest, with_defaults

    before = {
        key: value
        for key, value in ExplanationsConfig().model_dump().items()
        if key not in ("senses", "refine_rounds", "stability_latents")
    }  # all added later
    assert settings_digest(ExplanationsConfig()) == settings_digest(before)
    assert settings_digest(
        with_defaults(ExplanationsConfig, {"senses": 1}, "explanations")()
    ) == settings_digest(before)
    assert settings_digest(
        with_defaults(ExplanationsConfig, {"senses": 3}, "explanations")()
    ) != settings_digest(before)


def test_each_sense_is_scored_by_detection_on_its_own_test_windows_against_the_rest(planted):
    import pandas as pd

    from assets.scorers import SCORERS, ScorerDeps, scorer_settings
    from assets.scores import score_senses

    exemplars, vocab = planted
    with ScriptedLLMServer(scripted_llm) as server:
        _, senses = explain(server, exemplars, vocab, senses=3)
        scorer = SCORERS["detection"](
            scorer_settings()["detection"], ScorerDeps(llm=llm_resource(server).client())
        )
        scored = asyncio.run(score_senses(scorer, exemplars, pd.DataFrame(senses), vocab))
    assert sorted(zip(scored["latent"], scored["sense"], strict=False)) == sorted(
        (r["latent"], r["sense"]) for r in senses
    )
    # a sense's explanation finds its own windows: the scripted one is the bare class, so it also
    # fits the hard negatives
    assert (scored["balanced_accuracy"] >= 0.8).all() and (
        scored["balanced_accuracy"] > scored["control_balanced_accuracy"]
    ).all()


def test_the_explanations_asset_stores_the_senses_beside_their_union(registered):
    """Through the asset on the tiny coder: the senses table is written with the explanations, and every latent
    with senses has their union as its explanation (the tiny coder's latents come out with one sense each, so
    this proves the wiring; the senses themselves are proved on the planted latents above)."""
    from dagster import DagsterInstance

    from assets.senses import JOIN
    from storage.store import TableStore
    from tests.conftest import TINY_CODER, add_coders, make_resources, pipeline_until_exemplars, run
    from tests.scripted_llm_server import answer_by_prompt

    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    with ScriptedLLMServer(
        answer_by_prompt
    ) as server:  # a different explanation for each prompt: every cluster a sense
        result = run(
            ["explanations"],
            f"{TINY_CODER}|00",
            make_resources(registered, max_latents=3, llm=llm_resource(server, cache_dir="")),
            instance,
            {"ops": {"explanations": {"config": {"senses": 2}}}},
        )
    store = TableStore.at(registered)
    explained, senses = (
        store.explanations(TINY_CODER, "00").read(),
        store.explanation_senses(TINY_CODER, "00").read(),
    )
    assert (explained["status"] == "ok").all() and len(explained) == 3
    for latent, rows in senses.groupby("latent"):
        assert (
            JOIN.join(rows.sort_values("sense")["explanation"])
            == explained.set_index("latent").loc[latent, "explanation"]
            and len(rows) == 2
        )
    metadata = result.asset_materializations_for_node("explanations")[0].metadata
    assert metadata["latents_with_several_senses"].value == senses["latent"].nunique()


def test_the_scores_stage_scores_each_sense_on_its_own_windows_and_one_sense_latents_not(
    registered, planted
):
    """Through the explanations and scores/detection assets, on the planted latents written as the tiny coder's
    exemplars: each sense of a two-sense latent gets a `sense_scores` row whose positives are exactly its own
    test windows (recall 1: a window of the other sense counted as its own would be judged silent), and
    beats its control; one-sense latents get none, and the union is scored as every latent's explanation."""
    from dagster import DagsterInstance

    from storage.store import TableStore
    from storage.tables import write_table
    from tests.conftest import TINY_CODER, add_coders, make_resources, pipeline_until_exemplars, run

    exemplars, _ = planted
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    store = TableStore.at(registered)
    write_table(exemplars, store.exemplars(TINY_CODER, "00").path, "exemplars")
    store.latent_profiles(
        TINY_CODER, "00"
    ).path.unlink()  # the tiny coder's latents' profiles, not the planted ones'
    partition = f"{TINY_CODER}|00"
    with ScriptedLLMServer(scripted_llm) as server:
        resources = make_resources(
            registered, max_latents=len(PLANTED), llm=llm_resource(server, cache_dir="")
        )
        run(
            ["explanations"],
            partition,
            resources,
            instance,
            {"ops": {"explanations": {"config": {"senses": 3}}}},
        )
        result = run(["scores/detection"], partition, resources, instance)
    senses = store.explanation_senses(TINY_CODER, "00").read()
    scored = store.sense_scores(TINY_CODER, "00", "detection").read().set_index(["latent", "sense"])
    two_senses = {latent for latent, classes in PLANTED.items() if len(classes) == 2}
    assert set(senses["latent"]) == two_senses and sorted(scored.index) == sorted(
        zip(senses["latent"], senses["sense"], strict=False)
    )
    for row in senses.itertuples():
        mine = scored.loc[(row.latent, row.sense)]
        assert (
            mine["explanation"] == row.explanation and len(row.test_windows) == 5
        )  # the planted test split: 10 activating windows, 5 of each class
        assert (
            mine["recall"] == 1.0
            and mine["balanced_accuracy"] >= 0.8
            and mine["balanced_accuracy"] > mine["control_balanced_accuracy"]
        ), (row, mine.to_dict())
    union = store.scores(TINY_CODER, "00", "detection").read()
    assert sorted(union["latent"]) == sorted(PLANTED) and (union["explanation"] != "").all()
    assert result.asset_materializations_for_node("scores__detection")[0].metadata[
        "senses_scored"
    ].value == len(senses)


def test_only_senses_of_current_explanations_with_their_test_windows_are_scored(tmp_path):
    """A latent whose explanation was since replaced keeps its old senses' rows: they are not scored. A senses
    table written before `test_windows` existed is read, scores no sense, and says the fix."""
    import pandas as pd

    from assets.scores import scorable_senses
    from storage.store import TableStore

    store = TableStore.at(tmp_path)
    explanations = pd.DataFrame(
        {"latent": [4, 5], "explanation": ["digits or symbols", "a replacing text"], "status": "ok"}
    )
    senses = pd.DataFrame(
        [
            {
                "latent": latent,
                "sense": sense,
                "explanation": text,
                "windows": 4,
                "clusters": [sense],
                "test_windows": [sense],
            }
            for latent, texts in ((4, ["digits", "symbols"]), (5, ["digits", "capitalized words"]))
            for sense, text in enumerate(texts)
        ]
    )
    path = store.explanation_senses("c/h", "00").path
    path.parent.mkdir(parents=True)
    said = []
    senses.to_parquet(path)
    assert scorable_senses(store, "c/h", "00", explanations, said.append)[
        ["latent", "explanation"]
    ].values.tolist() == [[4, "digits"], [4, "symbols"]]
    senses.drop(columns="test_windows").to_parquet(path)
    assert scorable_senses(store, "c/h", "00", explanations, said.append).empty
    assert len(said) == 1 and "Fix: re-materialize `explanations`" in said[0]


def test_only_deployments_with_senses_re_explain_to_record_the_test_windows():
    from dagster import AssetKey

    from assets.explanations import explanations_asset

    def version(defaults):
        return explanations_asset(defaults).code_versions_by_key[AssetKey("explanations")]

    assert version({}) == version({"senses": 1}) and "senses" not in version({})
    assert version({"senses": 2}).endswith("-senses2")
