"""Exemplar windows: samplers, placements, disjoint and seeded sets, tagged non-activating sources."""

import multiprocessing
import time

import numpy as np
import pytest

from assets.exemplars import (
    ExemplarsConfig,
    NegativeSources,
    activating_windows,
    decoder_neighbours,
    sample_test,
    sample_train,
)
from storage.activations import ShardActivations
from tests.conftest import build_exemplars

CTX, WINDOW = 64, 16


def synthetic_shard(seed=0, n_seq=40, latents=(3, 4, 5)):
    """Latent 3 fires on token 7 wherever it occurs; latent 4 fires where 3 does, one token later; 5 is random."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, 200, size=(n_seq, CTX)).astype(np.int32)
    tokens[rng.random(tokens.shape) < 0.05] = 7
    locs, vals = [], []
    for s, p in zip(*np.nonzero(tokens == 7), strict=False):
        locs.append((s, p, 3))
        vals.append(1.0 + rng.random())
        if p + 1 < CTX:
            locs.append((s, p + 1, 4))
            vals.append(0.5 + rng.random())
    for _ in range(60):
        locs.append((rng.integers(n_seq), rng.integers(CTX), 5))
        vals.append(rng.random() + 0.1)
    locs = np.asarray(locs, np.int32)
    _, unique = np.unique(locs, axis=0, return_index=True)
    locs, vals = locs[unique], np.asarray(vals, np.float32)[unique]
    order = np.lexsort((locs[:, 1], locs[:, 0], locs[:, 2]))
    return tokens, ShardActivations(locs[order], vals[order])


def sources_without_index(tokens, neighbours=None, neighbour_acts=None):
    blocks_per_seq = tokens.shape[1] // WINDOW
    return NegativeSources(
        blocks_per_seq, tokens.shape[0] * blocks_per_seq, neighbours or {}, neighbour_acts, None
    )


def stats_for(shard, width=8):
    count = np.bincount(shard.locations[:, 2], minlength=width)
    return {"count": count, "max": np.zeros(width) + 2, "sum": count * 1.0}


def overlaps(a_seq, a_start, b_seq, b_start) -> bool:
    return any(
        s1 == s2 and abs(x1 - x2) < WINDOW
        for s1, x1 in zip(a_seq, a_start, strict=False)
        for s2, x2 in zip(b_seq, b_start, strict=False)
    )


@pytest.mark.parametrize("placement", ["block", "centered", "preceding"])
def test_windows_never_overlap_and_are_strongest_first(placement):
    tokens, shard = synthetic_shard()
    latent, locs, vals = next(shard.by_latent())
    w = activating_windows(locs, vals, CTX, WINDOW, placement)
    assert len(w) > 10 and (w.start >= 0).all() and (w.start + WINDOW <= CTX).all()
    assert np.all(np.diff(w.acts.max(1)) <= 1e-6)
    assert not any(
        overlaps([w.sequence[i]], [w.start[i]], np.delete(w.sequence, i), np.delete(w.start, i))
        for i in range(len(w))
    )
    inside = (w.start > 0) & (w.start + WINDOW < CTX)
    anchor = {"centered": WINDOW // 2, "preceding": WINDOW - 1}.get(placement)
    if (
        anchor is not None
    ):  # the token the window was placed around fires where the placement puts it
        assert (w.acts[inside, anchor] > 0).all()
    for s, st, a in zip(
        w.sequence, w.start, w.acts, strict=False
    ):  # activations are this latent's, at the right tokens
        assert np.array_equal(a > 0, tokens[s, st : st + WINDOW] == 7)


@pytest.mark.parametrize("sampler", ["top", "quantiles", "random"])
def test_samplers_are_disjoint_seeded_and_sized(sampler):
    tokens, shard = synthetic_shard()
    _, locs, vals = next(shard.by_latent())
    w = activating_windows(locs, vals, CTX, WINDOW, "block")
    config = ExemplarsConfig(sampler=sampler, n_examples_train=10, n_examples_test=5)
    draws = []
    for seed in (1, 1, 2):
        rng = np.random.default_rng(seed)
        train = sample_train(w, config, rng)
        test, quantiles = sample_test(w, train, config, rng)
        assert len(train) == 10 and len(test) == 5 and not set(train) & set(test)
        assert list(quantiles) == [1, 2, 3, 4, 5]
        draws.append((tuple(train), tuple(test)))
    assert draws[0] == draws[1]
    assert draws[0] != draws[2] or sampler == "top"
    if sampler == "top":
        assert list(draws[0][0]) == list(range(10))
    if sampler == "quantiles":  # one window from each fifth of the ranking, weakest included
        assert max(draws[0][0]) >= len(w) * 4 // 5


def test_random_negatives_alone_still_give_the_contrastive_explainer_its_counter_examples():
    tokens, shard = synthetic_shard()
    config = ExemplarsConfig(
        example_ctx_len=WINDOW,
        n_examples_train=6,
        n_examples_test=5,
        n_non_activating=6,
        n_non_activating_train=4,
        non_activating_sources=["random"],
    )
    frame, _ = build_exemplars(
        shard, tokens, config, sources_without_index(tokens), stats_for(shard), tokens.size
    )
    counters = frame[(frame.split == "train") & (frame.kind != "activating")]
    assert counters.groupby("latent").size().to_dict() == {3: 4, 4: 4, 5: 4} and set(
        counters.kind
    ) == {"random"}


def test_non_activating_windows_are_tagged_zero_and_unique():
    tokens, shard = synthetic_shard()
    neighbours = {3: [4], 4: [3], 5: [3]}
    config = ExemplarsConfig(
        example_ctx_len=WINDOW,
        n_examples_train=6,
        n_examples_test=5,
        n_non_activating=8,
        non_activating_sources=["random", "neighbour"],
    )
    frame, latents = build_exemplars(
        shard,
        tokens,
        config,
        sources_without_index(tokens, neighbours, shard),
        stats_for(shard),
        tokens.size,
    )
    assert set(latents["latent"]) == {3, 4, 5}
    for latent, group in frame.groupby("latent"):
        fired = {(s, p) for s, p, fired_latent in shard.locations if fired_latent == latent}
        test_negatives = group[(group.kind != "activating") & (group.split == "test")]
        assert set(test_negatives.kind) == {"random", "neighbour"} and len(test_negatives) == 8
        valid = group[group.split == "valid"]
        assert (valid.kind == "activating").sum() == 5 and (valid.kind == "random").sum() == 5
        assert (
            len(group[(group.split == "train") & (group.kind != "activating")]) == 5
        )  # contrastive negatives
        for row in group[group.kind != "activating"].itertuples():
            assert not any((row.sequence, p) in fired for p in range(row.start, row.start + WINDOW))
        windows = list(zip(group.sequence, group.start, strict=False))
        assert len(windows) == len(
            set(windows)
        )  # no window used twice for one latent, across all splits
    # latent 4 fires right after each token 7; where latent 3 is zero, that is a block opening just after a 7
    neighbour_rows = frame[
        (frame.latent == 3) & (frame.kind == "neighbour") & (frame.split == "test")
    ]
    assert len(neighbour_rows) and all(
        tokens[row.sequence, row.start - 1] == 7 for row in neighbour_rows.itertuples()
    )


def test_latent_statistics_report_top_tokens_quantiles_and_neighbours():
    tokens, shard = synthetic_shard()
    config = ExemplarsConfig(
        example_ctx_len=WINDOW, non_activating_sources=["random"], n_quantiles=4
    )
    _, latents = build_exemplars(
        shard,
        tokens,
        config,
        sources_without_index(tokens, {3: [4, 5]}),
        stats_for(shard),
        tokens.size,
    )
    row = latents.set_index("latent").loc[3]
    assert row.top_tokens[0] == 7 and row.neighbours == [4, 5]
    assert len(row.quantile_boundaries) == 5 and list(row.quantile_boundaries) == sorted(
        row.quantile_boundaries
    )
    assert row.frequency == pytest.approx((tokens == 7).sum() / tokens.size)


def test_decoder_neighbours_are_the_most_similar_directions():
    import torch

    from resources.sparse_coders import SparseCoder

    directions = torch.eye(6)[[0, 0, 1, 1, 2, 3]] + 0.01 * torch.arange(6).unsqueeze(1)
    coder = SparseCoder("x", "h", "relu", d_in=6, width=6, decoder_weight=directions)
    found = decoder_neighbours(coder, [0, 2], n=1)
    assert found == {0: [1], 2: [3]}


def _build_contexts(db_dir, name, calls_path, vectors):
    from storage.vector_store import ensure_contexts

    def build():
        with open(calls_path, "a") as f:
            f.write("x")
        time.sleep(0.5)
        return [f"text {i}" for i in range(len(vectors))], vectors

    ensure_contexts(db_dir, name, build)


def test_contexts_table_is_built_once_under_concurrency_and_searchable(tmp_path):
    from storage.vector_store import ContextIndex

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_build_contexts, args=(tmp_path, "contexts_x_16", tmp_path / "calls", vectors)
        )
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert (tmp_path / "calls").read_text() == "x"
    index = ContextIndex(tmp_path, "contexts_x_16")
    assert index.table.count_rows() == 300
    exact = np.argsort(-(vectors @ vectors[17]))[:5]
    assert list(index.nearest(vectors[17], 5)) == list(exact)
    # one search for many queries answers each as its own search does, and a longer answer starts with the
    # shorter one: exemplars search all latents' hard negatives at once and cut each answer on that ground
    queries = vectors[[17, 3, 250]] + 0.1 * rng.normal(size=(3, 32)).astype(np.float32)
    for query, found in zip(queries, index.nearest_many(queries, 40), strict=False):
        assert list(found) == list(index.nearest(query, 40)) and list(found[:7]) == list(
            index.nearest(query, 7)
        )


def _random_embed(texts):
    return np.stack([np.random.default_rng(int(text.split()[-1])).normal(size=8) for text in texts])


def _sync(db_dir, start):
    from storage.vector_store import sync_explanations

    latents = range(start, start + 50)
    shard = f"{start // 50:02d}"
    sync_explanations(
        db_dir, "random-8", "c/h", shard, {i: f"explanation {i}" for i in latents}, _random_embed
    )


def test_explanation_syncs_are_idempotent_and_safe_when_concurrent(tmp_path):
    import lancedb

    from storage.vector_store import explanations_table_name

    _sync(tmp_path, 0)
    _sync(tmp_path, 0)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_sync, args=(tmp_path, start)) for start in (50, 100, 50)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    rows = (
        lancedb.connect(str(tmp_path)).open_table(explanations_table_name("random-8")).to_pandas()
    )
    assert len(rows) == rows["id"].nunique() == 150
    assert sorted(rows["latent"]) == list(range(150))
