"""Semantic search over stored explanations: no table is no hits; anything else wrong is said, not hidden."""
import numpy as np
import pytest

from storage.vector_store import EXPLANATIONS_TABLE, search_explanations, upsert_explanations


def test_no_table_yet_is_no_hits(tmp_path):
    assert search_explanations(tmp_path / "lancedb", np.ones(8)) == []


def test_a_damaged_table_raises_instead_of_finding_nothing(tmp_path):
    (tmp_path / f"{EXPLANATIONS_TABLE}.lance").mkdir()  # a table folder without its data
    with pytest.raises(Exception):
        search_explanations(tmp_path, np.ones(8))


def test_a_query_of_another_embedder_names_both_sizes(tmp_path):
    upsert_explanations(tmp_path, "c/h", [0, 1], ["commas", "file paths"], np.random.default_rng(0).normal(size=(2, 8)))
    assert [hit["latent"] for hit in search_explanations(tmp_path, np.ones(8), limit=2)] != []
    with pytest.raises(ValueError, match=r"3 dimensions .* vectors of 8\. Fix: embed the query with the embedder"):
        search_explanations(tmp_path, np.ones(3))
