"""The embedding scorer on whole windows (`span_tokens = 0`) reads the vectors of corpus grid windows
from the contexts table, and on single tokens (`span_tokens = 1`) those of tokens from the tokens
table (embedded there as the very text it would embed), and scores exactly as if it had embedded
them itself; and a
partition read a chunk of latents at a time is scored and explained as when read whole."""

import asyncio
import re

import numpy as np
import pandas as pd
from dagster import DagsterInstance

from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings
from assets.explanations import ExplanationsConfig, explain_all
from assets.prompts import corpus_prompt_vocab, window_embedding
from assets.scorers import SCORERS, ScorerDeps, scorer_settings
from assets.scores import score_partition
from resources.embedder import EmbedderResource
from resources.llm import LLMResource
from storage.corpus import load_corpus
from storage.layout import DataRoot
from storage.vector_store import CorpusWindows
from tests.conftest import TINY_CODER, add_coders, pipeline_until_exemplars
from tests.scripted_llm_server import ScriptedLLMServer


class Counting:
    """The real MiniLM, counting every text it is asked to embed."""

    def __init__(self):
        self.embedder, self.texts = EmbedderResource(), []
        self.model = self.embedder.model

    def embed(self, texts):
        self.texts += texts
        return self.embedder.embed(texts)


def score(exemplars, explanations, vocab, windows=None, span_tokens=0):
    embedder = Counting()
    scorer = SCORERS["embedding"](
        scorer_settings({"embedding": {"span_tokens": span_tokens}})["embedding"],
        ScorerDeps(embedder=embedder, corpus_windows=windows),
    )
    frame, examples = asyncio.run(score_partition(scorer, exemplars, explanations, vocab))
    return frame.set_index("latent"), examples, embedder.texts


def partition(registered):
    """The tiny coder's shard 00 after `exemplars` (which builds the contexts and tokens tables),
    with an explanation per latent."""
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    root = DataRoot.at(registered)
    corpus = load_corpus(root)
    vocab = corpus_prompt_vocab(corpus)
    path = root.exemplars_path(TINY_CODER, "00")
    exemplars = pd.read_parquet(path)
    latents = sorted(int(x) for x in exemplars.latent.unique())
    assert len(latents) >= 4

    def top_word(latent):
        activating = exemplars[(exemplars.latent == latent) & (exemplars.kind == "activating")]
        return vocab[activating.iloc[0].tokens[0]]

    explanations = pd.DataFrame(
        {
            "latent": latents,
            "explanation": [f"text like {top_word(latent)!r} ({latent})" for latent in latents],
            "status": "ok",
        }
    )
    windows = CorpusWindows(
        root.lancedb_dir,
        corpus.meta["hash"],
        corpus.tokens,
        window_embedding(EmbedderResource().model),
    )
    return root, corpus, vocab, path, exemplars, latents, explanations, windows


def test_grid_windows_are_read_from_the_contexts_table_and_score_the_same(registered, monkeypatch):
    root, corpus, vocab, path, exemplars, latents, explanations, windows = partition(registered)
    read, read_examples, read_texts = score(path, explanations, vocab, windows)
    embedded, embedded_examples, embedded_texts = score(exemplars, explanations, vocab)

    # the default block placement puts every window on the grid: only the explanations are embedded
    assert sorted(read_texts) == sorted(explanations.explanation)
    assert (
        len(set(embedded_texts) - set(explanations.explanation)) > 100
    )  # without the table, every distinct window is embedded
    assert read.index.tolist() == embedded.index.tolist() == latents
    for metric in ("roc_auc", "control_roc_auc", "accuracy", "control_accuracy", "gap"):
        np.testing.assert_allclose(read[metric], embedded[metric], atol=1e-9, err_msg=metric)
    np.testing.assert_allclose(read_examples["score"], embedded_examples["score"], atol=1e-5)
    assert (
        read_examples[["latent", "source", "example", "label"]].to_numpy()
        == embedded_examples[["latent", "source", "example", "label"]].to_numpy()
    ).all()

    # read 16 latents at a time from the file: the same rows as the partition read whole (explanations
    # embedded in other batches move by MiniLM's batch noise, ~1e-7)
    monkeypatch.setattr("assets.latent_queue.LATENTS_PER_CHUNK", 16)
    chunked, chunked_examples, _ = score(path, explanations, vocab, windows)
    pd.testing.assert_frame_equal(chunked, read, check_exact=False, atol=1e-5)
    pd.testing.assert_frame_equal(chunked_examples, read_examples, check_exact=False, atol=1e-5)

    # explanations too: the explainer is shown the same windows (the scripted answer names the first one)
    def explainer(messages):
        first = re.search(r"Example 1: (.*)", messages[-1]["content"])
        return f"Explanation: {first.group(1)[:60] if first else 'none'}"

    with ScriptedLLMServer(explainer) as server:

        def client():
            return LLMResource(
                backend="openai", base_url=server.base_url, model="m", cache_dir=""
            ).client()

        settings = ExplainerSettings()
        by_chunk = asyncio.run(
            explain_all(
                EXPLAINERS["highlighted"](settings, ExplainerDeps(llm=client())),
                ExplanationsConfig(),
                path,
                None,
                latents,
                vocab,
                embed=None,
            )
        )
        monkeypatch.setattr("assets.latent_queue.LATENTS_PER_CHUNK", 1024)
        whole = asyncio.run(
            explain_all(
                EXPLAINERS["highlighted"](settings, ExplainerDeps(llm=client())),
                ExplanationsConfig(),
                exemplars,
                None,
                latents,
                vocab,
                embed=None,
            )
        )
    assert (by_chunk.status == "ok").all() and by_chunk.explanation.nunique() > len(latents) // 2
    pd.testing.assert_frame_equal(by_chunk, whole)

    # only a window whose tokens are the corpus's at a grid place is read
    ids = corpus.tokens[3, 16:32]
    assert windows.vector(3, 16, ids) is not None
    assert (
        windows.vector(3, 16, ids[::-1]) is None
    )  # other tokens at that place (a corpus rebuilt since)
    assert windows.vector(3, 8, corpus.tokens[3, 8:24]) is None  # off the grid
    assert (
        CorpusWindows(
            root.lancedb_dir,
            corpus.meta["hash"],
            corpus.tokens,
            window_embedding("another-embedder"),
        ).vector(3, 16, ids)
        is None
    )


def test_single_tokens_are_read_from_the_tokens_table_and_score_the_same(registered):
    root, corpus, vocab, path, exemplars, latents, explanations, windows = partition(registered)
    read, read_examples, read_texts = score(path, explanations, vocab, windows, span_tokens=1)
    embedded, embedded_examples, embedded_texts = score(
        exemplars, explanations, vocab, span_tokens=1
    )

    assert sorted(read_texts) == sorted(
        explanations.explanation
    )  # every token's vector is in the table
    assert (
        len(set(embedded_texts) - set(explanations.explanation)) > 100
    )  # without it, every distinct token text is embedded
    np.testing.assert_allclose(read_examples["score"], embedded_examples["score"], atol=1e-5)
    assert (
        read_examples[["latent", "source", "example", "label"]].to_numpy()
        == embedded_examples[["latent", "source", "example", "label"]].to_numpy()
    ).all()
    # texts MiniLM reads alike (it lowercases and drops spaces: " The", "the") are near-ties that its batch
    # noise (~1e-7) may order either way; a swap moves an AUC by a pair of its few windows
    for metric in ("roc_auc", "control_roc_auc"):
        differ = (read[metric] - embedded[metric]).abs()
        assert differ.max() <= 0.05 + 1e-9 and (differ > 0).mean() < 0.05, (
            metric,
            differ[differ > 0],
        )

    # the table holds the corpus's tokens, for this embedder and rendering only
    assert windows.token_vectors(corpus.tokens[3, :5]).shape == (5, 384)
    assert windows.token_vectors([int(corpus.tokens.max()) + 1]) is None
    assert (
        CorpusWindows(
            root.lancedb_dir,
            corpus.meta["hash"],
            corpus.tokens,
            window_embedding("another-embedder"),
        ).token_vectors(corpus.tokens[3, :5])
        is None
    )
