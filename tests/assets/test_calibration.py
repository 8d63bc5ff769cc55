"""The judge's calibration card (`assets/calibration.py`) on planted-truth latents of the embedded corpus.

A scripted explainer names the class of the spans its prompt marks; a literal judge answers from what the
description says (a digit, a negation word, …, or the tokens it names, for latents it cannot name); a random
judge answers by a hash of the description and the text, whatever they mean. The card must show a large
planted gap and a random gap near 0 for the first, and a planted gap near 0, said 'cannot tell', for the other.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

import numpy as np
import pytest

from tests.conftest import TINY_EXEMPLARS_CONFIG, llm_resource
from tests.scripted_llm_server import ScriptedLLMServer

WORDS = "not|no|never|nothing|neither|nor|cannot|without"
NEGATION_PATTERN = rf"\b(?:{WORDS}|{WORDS.title()})\b"
PHRASES = {
    "digits": r"\d",
    "negation words": NEGATION_PATTERN,
    "colons and semicolons": r"[:;]",
    "words inside parentheses": r"\([^()]+\)",
}
"""What the scripted explainer writes for each planted class, and what the literal judge reads it as."""


def span_class(span: str, before: str, after: str) -> str | None:
    word = span.strip()
    if word.isdigit():
        return "digits"
    if re.fullmatch(NEGATION_PATTERN, word):
        return "negation words"
    if word and set(word) <= {":", ";"}:
        return "colons and semicolons"
    if "(" in before[-2:] and ")" in after[:2]:
        return "words inside parentheses"
    return None


def scripted_explainer(user: str) -> str:
    """The commonest planted class of the marked spans; else the commonest marked span itself."""
    spans = [
        (m.group(1), user[: m.start()], user[m.end() :]) for m in re.finditer(r"<<(.*?)>>", user)
    ]
    classes = Counter(c for c in (span_class(*s) for s in spans) if c)
    if classes and classes.most_common(1)[0][1] * 2 >= len(spans):
        return f"Explanation: {classes.most_common(1)[0][0]}"
    word = Counter(s.strip() for s, _, _ in spans if s.strip()).most_common(1)
    return f"Explanation: the token {word[0][0] if word else 'the'}"


def description_and_examples(user: str) -> tuple[str, list[str]]:
    description = re.search(r"^Description: (.*)$", user, re.MULTILINE).group(1)
    return description, re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)


def literal_judge(messages: list[dict]) -> str:
    user = messages[-1]["content"]
    if "Description:" not in user:
        return scripted_explainer(user)
    description, examples = description_and_examples(user)
    pattern = PHRASES.get(description) or re.escape(description.removeprefix("the token "))
    return str(
        [int(bool(re.search(pattern, e.replace("<<", "").replace(">>", "")))) for e in examples]
    )


def random_judge(messages: list[dict]) -> str:
    user = messages[-1]["content"]
    if "Description:" not in user:
        return scripted_explainer(user)
    description, examples = description_and_examples(user)
    return str([zlib.crc32(f"{description}|{e}".encode()) & 1 for e in examples])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, subject):
    from assets.corpus import CorpusConfig, build_corpus
    from storage.corpus import load_corpus
    from storage.layout import DataRoot

    root = DataRoot.at(tmp_path_factory.mktemp("calibration"))
    build_corpus(CorpusConfig(ctx_len=64, n_tokens=64 * 160), subject.tokenizer(), root)
    return load_corpus(root)


@pytest.fixture(scope="module")
def embedder():
    from resources.embedder import EmbedderResource

    return EmbedderResource()


def card_with(llm, corpus, embedder, scorers=("detection",), latents_per_class=3) -> dict:
    """The calibration card of the judge behind `llm` (an LLM resource), which also explains, with `scorers`
    as the judges; `bench/trust.py` makes its cards with it too."""
    from assets.calibration import calibrate
    from assets.exemplars import ExemplarsConfig
    from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings
    from assets.explanations import ExplanationsConfig
    from assets.scorers import SCORERS, ScorerDeps, scorer_settings

    client = llm.client()
    explainer = EXPLAINERS["highlighted"](ExplainerSettings(), ExplainerDeps(llm=client))
    judges = {
        name: SCORERS[name](
            scorer_settings()[name], ScorerDeps(llm=client, models=f"judge={llm.identity()}")
        )
        for name in scorers
    }
    return calibrate(
        corpus,
        explainer,
        ExplanationsConfig(),
        judges,
        embedder.embed,
        ExemplarsConfig(**TINY_EXEMPLARS_CONFIG, non_activating_sources=["random"]),
        latents_per_class=latents_per_class,
        random_latents=4,
    )


def card_of(reply, corpus, embedder) -> tuple[dict, ScriptedLLMServer]:
    with ScriptedLLMServer(reply) as server:
        card = card_with(llm_resource(server, cache_dir=""), corpus, embedder)
    return card | {"judge": "openai:m"}, server


def test_the_planted_coder_fires_on_its_classes_only(corpus):
    from resources.planted_coder import CAPITALIZED, NEGATION, PlantedCoder, planted_latents

    latents = planted_latents(1, 2)
    locations, values = PlantedCoder(latents).encode(
        corpus.tokens, corpus.vocab, corpus.special_ids
    )
    fired = {
        latent: {
            corpus.vocab[corpus.tokens[s, p]] for s, p, _ in locations[locations[:, 2] == latent]
        }
        for latent in range(len(latents))
    }
    assert all(t.strip().isdigit() for t in fired[0]) and {"1", "2"} & fired[0]
    assert {t.strip() for t in fired[1]} <= NEGATION | CAPITALIZED
    assert " not" in fired[1] and " None" not in fired[1]
    assert {t.strip() for t in fired[2]} <= {":", ";", "::", ";;", ":;"}
    assert not any("(" in t or ")" in t for t in fired[3]) and len(fired[3]) > 20
    assert fired[4] == fired[0] | fired[1]  # two senses: digits or negation words
    assert np.all((values >= 0.5) & (values < 1.5))
    # the random latents fire on about 1 % of the tokens, wherever they are, and differ from each other
    for latent in (5, 6):
        share = (locations[:, 2] == latent).sum() / corpus.tokens.size
        assert 0.005 < share < 0.02
    assert not np.array_equal(
        locations[locations[:, 2] == 5][:, :2], locations[locations[:, 2] == 6][:, :2]
    )
    assert np.all(np.diff(locations[:, 2]) >= 0)  # the activation cache's order: by latent


def test_a_judge_that_reads_the_explanation_gets_a_card_that_tells(corpus, embedder):
    from assets.calibration import card_line

    card, server = card_of(literal_judge, corpus, embedder)
    detection = card["scorers"]["detection"]
    planted, random = detection["planted"], detection["random"]
    assert card["planted_latents"] == 15 and card["random_latents_with_exemplars"] == 4
    assert planted["latents"] == 15 and random["latents"] == 4
    assert planted["gap"] > 0.3 and planted["gap_interval"][0] > 0
    assert planted["mean"] > 0.8 and planted["mean_interval"][0] > 0.7
    assert abs(random["gap"]) < 0.15
    assert detection["verdict"].startswith(
        "can tell: on the planted latents, the explanation beats the shuffled-explanation control (gap "
    )
    assert card["verdict"] == "can tell (detection)"
    assert card["named"]["rate"] >= 0.8 and card["named"]["threshold"] == 0.5
    line = card_line(card, "detection")
    assert line.startswith("judged by openai:m: planted detection ") and line.endswith("can tell")
    assert len(server.requests) > 19  # each latent was explained and judged through the endpoint


def test_a_judge_that_answers_at_random_cannot_tell(corpus, embedder):
    card, _ = card_of(random_judge, corpus, embedder)
    detection = card["scorers"]["detection"]
    assert abs(detection["planted"]["gap"]) < 0.15
    assert detection["planted"]["gap_interval"][0] <= 0 <= detection["planted"]["gap_interval"][1]
    assert detection["verdict"].startswith(
        "cannot tell: the judge does not tell the planted latents' explanations from the "
        "shuffled-explanation control; gap "
    )
    assert card["verdict"].startswith("cannot tell")
    assert card["named"]["rate"] >= 0.8  # the explainer is the same: it names the classes still


def test_a_card_is_named_beside_every_score_its_judge_made(tmp_path):
    """The summary's `detection_calibration` names the card of the judge of each latent's score; the scorer's
    metadata and the browser's coders page say its line; a judge without a card is said to have none."""
    import pandas as pd

    from assets.cards import card_metadata
    from assets.scorers import SCORERS
    from assets.scores import summary_sources, summary_table
    from autointerp_defs.readside import reader
    from storage.calibration_cards import write_card
    from storage.store import TableStore
    from tests.conftest import two_shards_of_scores

    root = two_shards_of_scores(tmp_path)
    for shard, judge in (("00", "openai:m"), ("01", "openai:other")):
        path = root.scores_path("c/h", shard, "detection")
        pd.read_parquet(path).assign(models=f"judge={judge}").to_parquet(path)
    card = {
        "judge": "openai:m",
        "scorers": {
            "detection": {
                "planted": {"mean": 0.91, "mean_interval": [0.87, 0.94], "gap": 0.4, "latents": 10},
                "random": {"gap": 0.01, "latents": 4},
                "verdict": "can tell: …",
            }
        },
    }
    write_card(root, "openai:m", card)
    store = TableStore.at(tmp_path)
    scorers = {"detection": SCORERS["detection"], "embedding": SCORERS["embedding"]}
    table = summary_table(store, "c/h", scorers).set_index("latent")
    named = str(root.calibration_card_path("openai:m").relative_to(root.root))
    assert named.startswith("calibration/") and named.endswith(".json")
    assert table.loc[[1, 2], "detection_calibration"].tolist() == [named, named]
    assert table.loc[700, "detection_calibration"] == ""  # its judge has no card
    assert "embedding_calibration" not in table  # the embedding scorer asks no judge
    assert f"calibration/{root.calibration_card_path('openai:m').name}" in summary_sources(
        store, "c/h", scorers
    )  # a card made later rebuilds the summary
    line = (
        "judged by openai:m: planted detection 0.91 [0.87, 0.94], gap +0.40, random +0.01 "
        "(10 planted, 4 random latents): can tell"
    )
    assert card_metadata(root, "openai:m", "detection")["calibration"] == line
    assert "no calibration card" in card_metadata(root, "openai:other", "detection")["calibration"]
    assert reader.calibration(store, "c/h", "detection", ["00", "01"]) == line  # most scores' judge
    assert reader.calibration(store, "c/h", "embedding", ["00"]) is None


def test_the_calibration_asset_makes_one_card_per_judge(tmp_path):
    from dagster import DagsterInstance

    from storage.calibration_cards import read_card
    from storage.layout import DataRoot
    from tests.conftest import TINY_CORPUS_CONFIG, make_resources, run

    instance = DagsterInstance.ephemeral()
    config = {"latents_per_class": 1, "random_latents": 2}
    with ScriptedLLMServer(literal_judge) as server:
        resources = make_resources(tmp_path, llm=llm_resource(server))
        run(
            ["corpus"],
            None,
            resources,
            instance,
            {"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
        )
        made = run(
            ["calibration"], None, resources, instance, {"ops": {"calibration": {"config": config}}}
        )
        asked = len(server.requests)
        again = run(
            ["calibration"], None, resources, instance, {"ops": {"calibration": {"config": config}}}
        )
        assert len(server.requests) == asked > 0  # the judge has its card: nothing asked again
    card = read_card(DataRoot.at(tmp_path), "openai:m")
    assert card["judge"] == "openai:m" and card["latents_per_class"] == 1
    assert card["explainer"] == "openai:m" and card["embedder"].startswith("all-MiniLM-L6-v2@")
    meta = made.asset_materializations_for_node("calibration")[0].metadata
    assert meta["detection_card"].value.startswith("judged by openai:m: planted detection")
    assert "fuzzing_card" in meta and meta["judge_model"].value == "openai:m"
    assert (
        again.asset_materializations_for_node("calibration")[0].metadata["verdict"]
        == meta["verdict"]
    )


def test_autointerp_calibrate_prints_the_card_and_asks_once_per_judge(
    tmp_path, monkeypatch, capsys
):
    from autointerp_defs.cli import main
    from autointerp_defs.instance import write_instance

    write_instance(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    deployment = tmp_path / "scripted.toml"
    command = ["--deployment", str(deployment), "calibrate", "--latents-per-class", "1"]
    with ScriptedLLMServer(literal_judge) as server:
        deployment.write_text(
            f"""automated_scorers = ["detection", "embedding"]
[settings]
data_dir = "{tmp_path / "data"}"
[llm]
backend = "openai"
base_url = "{server.base_url}"
model = "m"
[corpus]
ctx_len = 64
n_tokens = {64 * 160}
[exemplars]
example_ctx_len = 16
n_examples_train = 6
n_examples_test = 5
n_non_activating = 5
min_activating_windows = 6
non_activating_sources = ["random"]
"""
        )
        main(command)  # the corpus first: this data root has none
        printed = capsys.readouterr().out
        asked = len(server.requests)
        main(command)
        again = capsys.readouterr().out
        assert len(server.requests) == asked > 0  # the judge has its card
    lines = printed.splitlines()
    assert lines[0].startswith("calibrating the judge openai:m on the instance at ")
    assert lines[1].startswith("judged by openai:m: planted detection ")
    assert "(5 planted, 4 random latents)" in lines[1]  # N, stated
    assert lines[2].startswith("  can tell: ") or lines[2].startswith("  cannot tell: ")
    assert lines[3].startswith("explanations naming their planted class: ")
    assert (
        lines[4].startswith(f"card {tmp_path / 'data' / 'calibration'}/")
        and "latents per class: 1" in lines[4]
    )
    assert again.splitlines()[1:4] == lines[1:4]  # the same card, read again
    assert not any("embedding" in line for line in lines)  # it asks no judge: not calibrated
