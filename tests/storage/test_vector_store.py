"""The explanations tables of LanceDB: one per embedder, each shard's rows exactly its committed ok
explanations, and search that shows only what the committed explanations tables hold."""

import hashlib

import numpy as np
import pandas as pd
import pytest

from storage.layout import DataRoot
from storage.store import TableStore
from storage.tables import TABLES, write_table
from storage.vector_store import (
    EmbeddingMismatchError,
    explanations_table_name,
    search_explanations,
    sql_quoted,
    sync_explanations,
)

CODER = "tiny/model.layers.3"


class WordEmbedder:
    """A small fake embedder: each word hashed to one of `dim` axes, the sum normalized, so texts that share
    words are near. Counts the texts it embeds."""

    def __init__(self, model: str = "words-16", dim: int = 16):
        self.model, self.dim, self.embedded = model, dim, []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.embedded += texts
        vectors = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for word in text.split():
                vectors[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.dim] += 1
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def commit(root: DataRoot, shard: str, rows: dict[int, tuple[str, str]]) -> dict[int, str]:
    """Write the shard's explanations table (latent → (status, text)); returns its ok explanations,
    as the asset syncs them."""
    frame = pd.DataFrame(
        {
            "latent": list(rows),
            "explainer": "highlighted",
            "explanation": [text for _, text in rows.values()],
            "status": [status for status, _ in rows.values()],
            "error": "",
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "model": "m",
            "candidates": [[text] for _, text in rows.values()],
            "candidate_scores": [[float("nan")] for _ in rows],
            "examples_dropped": 0,
            "exemplars_fingerprint": "x",
        }
    )
    path = root.explanations_path(CODER, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(frame[TABLES["explanations"].columns], path, "explanations")
    return {latent: text for latent, (status, text) in rows.items() if status == "ok"}


def held(root: DataRoot, embedder: str) -> dict[tuple[str, int], str]:
    import lancedb

    rows = (
        lancedb.connect(str(root.lancedb_dir))
        .open_table(explanations_table_name(embedder))
        .to_pandas()
    )
    return {
        (shard, latent): text
        for shard, latent, text in zip(
            rows["shard"], rows["latent"], rows["explanation"], strict=False
        )
    }


def found(
    root: DataRoot, embedder: WordEmbedder, query: str, limit: int = 10
) -> list[tuple[str, int, str]]:
    return [
        (hit["shard"], hit["latent"], hit["explanation"])
        for hit in search_explanations(
            TableStore(root), embedder.model, embedder.embed([query])[0], limit
        )
    ]


def test_a_shards_rows_are_exactly_its_ok_explanations(tmp_path):
    root, embedder = DataRoot.at(tmp_path), WordEmbedder()
    first = commit(
        root,
        "00",
        {0: ("ok", "closing a file"), 1: ("ok", "opening a socket"), 2: ("ok", "the letter x")},
    )
    sync_explanations(root.lancedb_dir, embedder.model, CODER, "00", first, embedder.embed)
    other = commit(root, "01", {1024: ("ok", "the letter x in names")})
    sync_explanations(root.lancedb_dir, embedder.model, CODER, "01", other, embedder.embed)
    assert ("00", 1, "opening a socket") in found(root, embedder, "opening a socket")

    # re-materialized: latent 1 failed, latent 2 has a new text, latent 0 is unchanged
    embedder.embedded.clear()
    again = commit(
        root, "00", {0: ("ok", "closing a file"), 1: ("failed", ""), 2: ("ok", "the letter y")}
    )
    sync_explanations(root.lancedb_dir, embedder.model, CODER, "00", again, embedder.embed)
    assert held(root, embedder.model) == {
        ("00", 0): "closing a file",
        ("00", 2): "the letter y",
        ("01", 1024): "the letter x in names",
    }
    assert embedder.embedded == ["the letter y"]  # only what changed is embedded again
    assert all(
        text not in ("opening a socket", "the letter x")
        for _, _, text in found(root, embedder, "opening a socket the letter x")
    )

    # a shard with no ok explanation any more holds no row
    sync_explanations(
        root.lancedb_dir,
        embedder.model,
        CODER,
        "00",
        commit(root, "00", {0: ("failed", ""), 2: ("failed", "")}),
        embedder.embed,
    )
    assert held(root, embedder.model) == {("01", 1024): "the letter x in names"}


def test_each_embedder_has_its_own_table_and_search_reads_its_own(tmp_path):
    root, small, large = (
        DataRoot.at(tmp_path),
        WordEmbedder("words-8", 8),
        WordEmbedder("words-16", 16),
    )
    assert explanations_table_name(small.model) != explanations_table_name(large.model)
    texts = commit(root, "00", {0: ("ok", "closing a file"), 1: ("ok", "opening a socket")})
    sync_explanations(root.lancedb_dir, small.model, CODER, "00", {0: texts[0]}, small.embed)
    sync_explanations(root.lancedb_dir, large.model, CODER, "00", texts, large.embed)
    assert held(root, small.model) == {("00", 0): "closing a file"}
    assert found(root, small, "opening a socket") == [("00", 0, "closing a file")]
    assert [latent for _, latent, _ in found(root, large, "opening a socket")][0] == 1
    assert (
        search_explanations(TableStore(root), "never-used", np.ones(4, np.float32)) == []
    )  # nothing embedded with it: no results

    # the same name now giving vectors of another length: a clear error, never a wrong comparison
    changed = WordEmbedder("words-8", 12)
    with pytest.raises(
        EmbeddingMismatchError,
        match=r"has 12 dimensions, but the explanations table explanations_\w+ holds vectors of 8",
    ):
        search_explanations(TableStore(root), changed.model, changed.embed(["a file"])[0])
    with pytest.raises(EmbeddingMismatchError, match="holds vectors of 8"):
        sync_explanations(
            root.lancedb_dir, changed.model, CODER, "00", {1: "opening a socket"}, changed.embed
        )


def test_search_shows_only_what_the_committed_explanations_hold(tmp_path):
    """A crash after the explanations table is written and before the sync leaves old rows in the vector
    table: search leaves them out, and the next sync puts the table in step."""
    root, embedder = DataRoot.at(tmp_path), WordEmbedder()
    first = commit(root, "00", {0: ("ok", "closing a file"), 1: ("ok", "opening a socket")})
    sync_explanations(root.lancedb_dir, embedder.model, CODER, "00", first, embedder.embed)
    assert {
        latent for _, latent, _ in found(root, embedder, "closing a file opening a socket")
    } == {0, 1}

    second = commit(
        root, "00", {0: ("ok", "reading a file"), 1: ("failed", "")}
    )  # written; the sync never ran
    assert found(root, embedder, "closing a file opening a socket") == []
    sync_explanations(root.lancedb_dir, embedder.model, CODER, "00", second, embedder.embed)
    assert found(root, embedder, "closing a file opening a socket") == [("00", 0, "reading a file")]


def test_a_broken_table_is_an_error_not_an_empty_answer(tmp_path):
    root, embedder = DataRoot.at(tmp_path), WordEmbedder()
    (root.lancedb_dir / f"{explanations_table_name(embedder.model)}.lance").mkdir(
        parents=True
    )  # there, but not a table
    with pytest.raises(ValueError, match=explanations_table_name(embedder.model)):
        search_explanations(TableStore(root), embedder.model, embedder.embed(["a file"])[0])


def test_a_coder_whose_name_holds_a_quote_changes_only_its_own_rows(tmp_path):
    """A coder's name goes into LanceDB's filters as a string literal (`sql_quoted`): a quote in it
    neither breaks the filter nor reaches another coder's rows."""
    root, embedder, quoted = DataRoot.at(tmp_path), WordEmbedder(), "o'neil/model.layers.3"
    for coder, rows in (
        (CODER, {5: "closing a file"}),
        (quoted, {0: "a quote", 1: "two quotes"}),
        (quoted, {1: "two quotes"}),
    ):
        sync_explanations(root.lancedb_dir, embedder.model, coder, "00", rows, embedder.embed)
    assert held(root, embedder.model) == {("00", 5): "closing a file", ("00", 1): "two quotes"}
    assert sql_quoted("o'neil") == "'o''neil'"
