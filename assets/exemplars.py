"""Stage 3, `exemplars`: per live latent, windows to explain (`train`) and a disjoint set to score (`test`).

Activating windows of `example_ctx_len` tokens are placed on a fixed grid (`block`, delphi) or
around the activating token (`centered`, or `preceding`: the token last, its context before it),
never overlapping each other. The explainer's windows come from a sampler (`top`: strongest,
as OpenAI and Transluce; `quantiles`: stratified over activation quantiles, as delphi; `random`).
The scorer's activating windows (`test`) are others, stratified by quantile; a few more
(`valid`) are kept apart for choosing among candidate explanations; the contrastive explainer's
non-activating windows are in `train`. Non-activating windows are tagged with their source:
`random` (latent zero), `neighbour` (where the latents with the most similar decoder directions
fire but this one does not) and `embedding` (the windows nearest to the activating ones by
all-MiniLM-L6-v2, found in LanceDB). Everything is seeded per latent: the same seed gives the same
windows.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetsDefinition,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.automation import CODE_CHANGED, FOLLOW, in_pool
from assets.checks import exemplars_specs, explainable_latents, result
from assets.partitions import backfill_policy, coder_and_shard, each_shard, shard_partitions
from assets.prompts import corpus_prompt_vocab, token_text, window_embedding, window_text
from assets.records import RESEED
from assets.stage_config import NO_MODELS, Models, settings_digest, with_defaults
from resources.embedder import EmbedderResource
from resources.settings import AutointerpSettings
from resources.sparse_coders import SparseCoder, coder_fingerprint, load_registered
from storage.activations import (
    ShardActivations,
    check_shard_complete,
    load_latent_stats,
    read_cache_meta,
    read_latents,
    read_shard,
    shard_keys,
)
from storage.corpus import load_corpus
from storage.layout import DataRoot
from storage.tables import TABLES
from storage.vector_store import (
    ContextIndex,
    contexts_table_name,
    ensure_contexts,
    ensure_token_vectors,
)

NON_ACTIVATING_SOURCES = ("random", "neighbour", "embedding")


class ExemplarsConfig(Config):
    example_ctx_len: int = Field(default=32, description="Tokens per example window.")
    sampler: Literal["top", "quantiles", "random"] = Field(
        default="top",
        description="How the explainer's windows are chosen: strongest, stratified over quantiles, or uniformly.",
    )
    window_placement: Literal["block", "centered", "preceding"] = Field(
        default="block",
        description="Fixed grid of windows, or windows centred on / ending at the activating token.",
    )
    n_examples_train: int = Field(
        default=15, description="Activating windows shown to the explainer."
    )
    n_examples_test: int = Field(
        default=10,
        description="Activating windows held out for scoring, stratified over quantiles.",
    )
    n_examples_valid: int = Field(
        default=5,
        description="Activating (and as many random non-activating) "
        "windows held out for choosing among candidate explanations (best-of-N).",
    )
    n_non_activating_train: int = Field(
        default=5,
        description="Non-activating windows shown to the contrastive explainer "
        "(embedding hard negatives, else neighbour, else random).",
    )
    n_quantiles: int = Field(
        default=5, description="Activation quantiles for the `quantiles` sampler and the test set."
    )
    n_non_activating: int = Field(
        default=10, description="Non-activating windows for scoring, split evenly over the sources."
    )
    non_activating_sources: list[str] = Field(
        default=list(NON_ACTIVATING_SOURCES),
        description="Any of 'random', 'neighbour' (decoder-similar latents fire), 'embedding' "
        "(MiniLM hard negatives via LanceDB).",
    )
    n_neighbours: int = Field(
        default=10, description="Decoder neighbours per latent (cosine of decoder directions)."
    )
    min_activating_windows: int = Field(
        default=8, description="Skip latents that fire in fewer windows than this."
    )
    seed: int = Field(default=0, description="Seed of all sampling.")


@dataclass
class Windows:
    """Windows of one latent: sequence, start, per-token activations `[n, L]`, sorted by max activation."""

    sequence: np.ndarray
    start: np.ndarray
    acts: np.ndarray

    def take(self, index) -> "Windows":
        index = np.asarray(index, dtype=int)
        return Windows(self.sequence[index], self.start[index], self.acts[index])

    def __len__(self) -> int:
        return len(self.sequence)


def activating_windows(
    locations: np.ndarray, values: np.ndarray, ctx_len: int, window: int, placement: str
) -> Windows:
    """Non-overlapping activating windows of one latent, strongest first."""
    seq, pos = locations[:, 0].astype(np.int64), locations[:, 1].astype(np.int64)
    cells = seq * ctx_len + (pos // window) * window
    order = np.lexsort((-values, cells))
    first = np.concatenate([[True], cells[order][1:] != cells[order][:-1]])
    anchors = order[first]  # the strongest token of each grid cell
    anchors = anchors[np.argsort(-values[anchors], kind="stable")]
    if placement == "block":
        starts = (pos[anchors] // window) * window
        chosen_seq, chosen_start = seq[anchors], starts
        keep = chosen_start + window <= ctx_len
        chosen_seq, chosen_start = chosen_seq[keep], chosen_start[keep]
    else:
        offset = window // 2 if placement == "centered" else window - 1
        taken: dict[int, list[int]] = {}
        chosen_seq, chosen_start = [], []
        for a in anchors:
            s = int(min(max(pos[a] - offset, 0), ctx_len - window))
            if all(abs(s - other) >= window for other in taken.get(int(seq[a]), [])):
                taken.setdefault(int(seq[a]), []).append(s)
                chosen_seq.append(int(seq[a]))
                chosen_start.append(s)
        chosen_seq, chosen_start = (
            np.asarray(chosen_seq, np.int64),
            np.asarray(chosen_start, np.int64),
        )
    keys = seq * ctx_len + pos
    key_order = np.argsort(keys, kind="stable")
    sorted_keys = keys[key_order]
    acts = np.zeros((len(chosen_seq), window), np.float32)
    lo = np.searchsorted(sorted_keys, chosen_seq * ctx_len + chosen_start)
    hi = np.searchsorted(sorted_keys, chosen_seq * ctx_len + chosen_start + window)
    for i, (a, b) in enumerate(zip(lo, hi, strict=False)):
        rows = key_order[a:b]
        acts[i, pos[rows] - chosen_start[i]] = values[rows]
    return Windows(chosen_seq, chosen_start, acts).take(np.argsort(-acts.max(1), kind="stable"))


def sample_train(windows: Windows, config: ExemplarsConfig, rng: np.random.Generator) -> np.ndarray:
    n = min(config.n_examples_train, len(windows) // 2)
    if config.sampler == "top":
        return np.arange(n)
    if config.sampler == "random":
        return np.sort(rng.choice(len(windows), size=n, replace=False))
    per = max(1, n // config.n_quantiles)
    picked = [
        rng.choice(stratum, size=min(per, len(stratum)), replace=False)
        for stratum in np.array_split(np.arange(len(windows)), config.n_quantiles)
        if len(stratum)
    ]
    return np.sort(np.concatenate(picked))[:n]


def sample_test(
    windows: Windows, train: np.ndarray, config: ExemplarsConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out windows stratified over quantiles (1 = strongest); disjoint from `train`."""
    rest = np.setdiff1d(np.arange(len(windows)), train)
    per = max(1, config.n_examples_test // config.n_quantiles)
    index, quantile = [], []
    for q, stratum in enumerate(np.array_split(rest, config.n_quantiles), start=1):
        if len(stratum):
            picked = rng.choice(stratum, size=min(per, len(stratum)), replace=False)
            index.extend(picked)
            quantile.extend([q] * len(picked))
    return np.asarray(index, dtype=int), np.asarray(quantile, dtype=int)


def sample_reseed(
    windows: Windows, used: np.ndarray, n: int, config: ExemplarsConfig, latent: int
) -> np.ndarray:
    """A second draw of `n` explainer windows (as many as the first) from those the latent uses nowhere else
    (`used`), with another seed: the next strongest for the `top` sampler, else a uniform draw; none where
    fewer are left. Its own generator, so every other draw is the one made without it."""
    rest = np.setdiff1d(np.arange(len(windows)), used)
    if len(rest) < n or not n:
        return rest[:0]
    if config.sampler == "top":
        return rest[:n]
    rng = np.random.default_rng([config.seed, latent, RESEED_STREAM])
    return np.sort(rng.choice(rest, size=n, replace=False))


RESEED_STREAM = 1
"""The reseed draw's generator is seeded with (seed, latent, this): another seed than the first draw's."""


NEIGHBOUR_SIMILARITY_BYTES = 64 << 20


def decoder_neighbours(
    coder: SparseCoder | None, latents: list[int], n: int
) -> dict[int, list[int]]:
    """The `n` latents whose decoder directions are most cosine-similar to each latent's."""
    if coder is None or coder.decoder_weight is None or not latents or n <= 0:
        return {}
    directions = coder.decoder_directions()
    out = {}
    rows = max(
        1, NEIGHBOUR_SIMILARITY_BYTES // (4 * directions.shape[0])
    )  # the similarity block stays this small at any width
    for start in range(0, len(latents), rows):
        chunk = np.asarray(latents[start : start + rows])
        sims = directions[torch.from_numpy(chunk)] @ directions.T
        sims[torch.arange(len(chunk)), torch.from_numpy(chunk)] = -2.0
        top = sims.topk(min(n, directions.shape[0] - 1), dim=1).indices.numpy()
        out.update({int(lat): top[i].tolist() for i, lat in enumerate(chunk)})
    return out


def split_counts(total: int, sources: list[str]) -> dict[str, int]:
    base, extra = divmod(total, max(1, len(sources)))
    return {source: base + (i < extra) for i, source in enumerate(sources)}


def grid_blocks(locations: np.ndarray, blocks_per_seq: int, window: int) -> np.ndarray:
    block = locations[:, 1].astype(np.int64) // window
    inside = block < blocks_per_seq
    return np.unique(locations[inside, 0].astype(np.int64) * blocks_per_seq + block[inside])


@dataclass
class NegativeSources:
    """What the non-activating sources need, loaded once per partition."""

    blocks_per_seq: int
    n_blocks: int
    neighbours: dict[int, list[int]]
    neighbour_acts: ShardActivations | None
    contexts: ContextIndex | None
    _rows_by_latent: tuple | None = field(default=None, init=False, repr=False)
    _nearest: dict = field(default_factory=dict, init=False, repr=False)

    def neighbour_rows(self, ids) -> np.ndarray:
        """Rows of `neighbour_acts` of latents `ids`, in stored order: the pairs are sorted by latent once,
        so each latent's lookup is a slice instead of a scan of every pair."""
        if self._rows_by_latent is None:
            order = np.argsort(self.neighbour_acts.locations[:, 2], kind="stable")
            self._rows_by_latent = (order, self.neighbour_acts.locations[order, 2])
        order, latents = self._rows_by_latent
        ids = np.unique(np.asarray(ids, dtype=latents.dtype))
        lo, hi = np.searchsorted(latents, ids, "left"), np.searchsorted(latents, ids, "right")
        return np.sort(
            np.concatenate(
                [order[a:b] for a, b in zip(lo, hi, strict=False)] + [np.zeros(0, order.dtype)]
            )
        )

    def neighbour_blocks(self, latent: int, window: int) -> np.ndarray:
        """Grid blocks where the latent's decoder neighbours fire, strongest first."""
        ids = self.neighbours.get(latent)
        if not ids or self.neighbour_acts is None:
            return np.zeros(0, np.int64)
        rows = self.neighbour_rows(ids)
        locs, vals = self.neighbour_acts.locations[rows], self.neighbour_acts.activations[rows]
        mine = locs[:, 1] // window < self.blocks_per_seq
        blocks = locs[mine, 0].astype(np.int64) * self.blocks_per_seq + locs[mine, 1] // window
        order = np.argsort(-vals[mine], kind="stable")
        _, first = np.unique(blocks[order], return_index=True)
        return blocks[order][np.sort(first)]

    def embedding_query(self, query_blocks: np.ndarray) -> np.ndarray:
        query = np.asarray(self.contexts.vectors[np.sort(query_blocks)]).mean(0)
        return query / max(np.linalg.norm(query), 1e-9)

    def prefetch_nearest(self, queries: list[np.ndarray], limits: list[int]) -> None:
        """Search every latent's hard negatives in one flat search over the table instead of one search
        per latent and split (each costs milliseconds of LanceDB overhead). Only without an ANN index:
        an exact search's nearest `limit` are the first `limit` of a longer answer, an ANN search's not."""
        if self.contexts is None or self.contexts.indexed:
            return
        wanted = [
            (np.sort(q).tobytes(), q, limit)
            for q, limit in zip(queries, limits, strict=False)
            if len(q)
        ]
        if not wanted:
            return
        limit = max(limit for *_, limit in wanted)
        found = self.contexts.nearest_many(
            np.stack([self.embedding_query(q) for _, q, _ in wanted]), limit
        )
        self._nearest = {
            key: (blocks, limit) for (key, _, _), blocks in zip(wanted, found, strict=False)
        }

    def embedding_blocks(self, query_blocks: np.ndarray, limit: int) -> np.ndarray:
        if self.contexts is None or not len(query_blocks):
            return np.zeros(0, np.int64)
        blocks, fetched = self._nearest.get(np.sort(query_blocks).tobytes(), (None, 0))
        if limit <= fetched:
            return blocks[:limit]
        return self.contexts.nearest(self.embedding_query(query_blocks), limit)


def non_activating_blocks(
    latent: int,
    used: set[int],
    train_blocks: np.ndarray,
    counts: dict[str, int],
    sources: NegativeSources,
    window: int,
    rng,
) -> list[tuple[str, np.ndarray]]:
    """Per source, grid blocks where the latent is zero and not in `used` (which this extends).
    Random windows go last and make up what another source could not supply, so sets keep their size."""
    chosen, shortfall = [], 0
    for source in sorted(counts, key=lambda s: s == "random"):
        n = counts[source] + (shortfall if source == "random" else 0)
        if n <= 0:
            continue
        if source == "random":
            candidates = rng.choice(
                sources.n_blocks, size=min(sources.n_blocks, 4 * n + len(used)), replace=False
            )
        elif source == "neighbour":
            candidates = sources.neighbour_blocks(latent, window)
        elif source == "embedding":
            candidates = sources.embedding_blocks(train_blocks, limit=n + len(used) + 16)
        else:
            raise ValueError(
                f"Unknown non-activating source {source!r}; use any of {NON_ACTIVATING_SOURCES}."
            )
        picked = [int(b) for b in candidates if int(b) not in used][:n]
        shortfall += n - len(picked) if source != "random" else 0
        used.update(picked)
        chosen.append((source, np.asarray(picked, np.int64)))
    return chosen


def window_rows(
    latent: int, split: str, kind: str, quantiles, windows: Windows, tokens: np.ndarray
) -> list[dict]:
    window = windows.acts.shape[1] if len(windows) else 0
    return [
        {
            "latent": latent,
            "split": split,
            "kind": kind,
            "quantile": int(q),
            "sequence": int(s),
            "start": int(st),
            "max_activation": float(a.max()),
            "tokens": tokens[s, st : st + window].astype(np.int32).tolist(),
            "activations": a.astype(np.float32).tolist(),
        }
        for s, st, a, q in zip(
            windows.sequence, windows.start, windows.acts, quantiles, strict=False
        )
    ]


def latent_statistics(
    latent: int,
    windows: Windows,
    locations: np.ndarray,
    values: np.ndarray,
    tokens: np.ndarray,
    stats: dict,
    n_tokens: int,
    n_quantiles: int,
    neighbours: list[int],
) -> dict:
    token_ids = tokens[locations[:, 0], locations[:, 1]]
    ids, inverse, counts = np.unique(token_ids, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=values) / counts
    frequent = counts >= 2
    order = np.argsort(-means[frequent])[:10]
    maxima = windows.acts.max(1)
    return {
        "latent": latent,
        "frequency": float(stats["count"][latent]) / max(n_tokens, 1),
        "max_activation": float(stats["max"][latent]),
        "mean_activation": float(stats["sum"][latent] / max(stats["count"][latent], 1)),
        "activating_windows": len(windows),
        "quantile_boundaries": np.quantile(maxima, np.linspace(0, 1, n_quantiles + 1))
        .astype(np.float32)
        .tolist(),
        "top_tokens": ids[frequent][order].astype(np.int32).tolist(),
        "top_token_mean_activation": means[frequent][order].astype(np.float32).tolist(),
        "neighbours": [int(n) for n in neighbours],
    }


EXEMPLAR_BATCH_LATENTS = 256
"""Latents whose window rows are built and written together: the stage holds one batch's rows, not the shard's."""


def exemplar_batches(
    shard_acts: ShardActivations,
    tokens: np.ndarray,
    config: ExemplarsConfig,
    sources: NegativeSources,
    stats: dict,
    n_tokens: int,
    batch_latents: int = EXEMPLAR_BATCH_LATENTS,
    reseed_latents: int = 0,
    reseed_among: int = 0,
):
    """(exemplar windows, per-latent statistics) of the shard's latents, `batch_latents` at a time; the first
    `reseed_latents` of them with windows to spare also get a second draw of explainer windows (split `reseed`),
    taken among the first `reseed_among` latents (those the explainer takes, `max_latents_per_shard`; 0: all)."""
    window = config.example_ctx_len
    ctx_len = tokens.shape[1]
    counts = split_counts(config.n_non_activating, list(config.non_activating_sources))
    hard = [s for s in ("embedding", "neighbour") if s in config.non_activating_sources] or [
        "random"
    ]
    # the contrastive explainer's counter-examples: the hardest source asked for, made up with random ones
    # (a dict literal {hard: n, "random": 0} would zero them when the hardest source is random itself)
    train_counts = {"random": 0} | {hard[0]: config.n_non_activating_train}
    split_negatives = [
        ("test", counts),
        ("train", train_counts),
        ("valid", {"random": config.n_examples_valid}),
    ]
    # First every latent's windows and training draws, so that the hard negatives of a batch of latents
    # are searched at once; each latent's generator then goes on where its training draw left it.
    planned = []
    for latent, locations, values in shard_acts.by_latent():
        windows = activating_windows(locations, values, ctx_len, window, config.window_placement)
        if len(windows) < config.min_activating_windows:
            continue
        rng = np.random.default_rng([config.seed, latent])
        train = sample_train(windows, config, rng)
        used = set(grid_blocks(locations, sources.blocks_per_seq, window).tolist())
        train_windows = windows.take(train)
        max_token = train_windows.start + train_windows.acts.argmax(1)
        train_blocks = train_windows.sequence * sources.blocks_per_seq + np.minimum(
            max_token // window, sources.blocks_per_seq - 1
        )
        planned.append((latent, locations, values, windows, rng, train, used, train_blocks))
    most = (
        config.n_non_activating + config.n_non_activating_train + config.n_examples_valid + 16
    )  # the longest list a latent's searches ask beyond its own blocks
    eligible = {p[0] for p in (planned[:reseed_among] if reseed_among else planned)}
    for start in range(0, len(planned), batch_latents):
        batch = planned[start : start + batch_latents]
        if (
            "embedding" in config.non_activating_sources
        ):  # one search for the batch's hard negatives (its answers are one batch's too)
            sources.prefetch_nearest([p[7] for p in batch], [len(p[6]) + most for p in batch])
        frame, profiles = _exemplar_rows(
            batch,
            tokens,
            config,
            sources,
            stats,
            n_tokens,
            split_negatives,
            window,
            reseed_latents,
            eligible,
        )
        reseed_latents -= frame.loc[frame["split"] == RESEED, "latent"].nunique()
        yield frame, profiles


def _exemplar_rows(
    planned: list,
    tokens: np.ndarray,
    config: ExemplarsConfig,
    sources: NegativeSources,
    stats: dict,
    n_tokens: int,
    split_negatives: list,
    window: int,
    reseed_latents: int = 0,
    eligible: set[int] = frozenset(),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows: list[dict] = []
    latent_rows: list[dict] = []
    for latent, locations, values, windows, rng, train, used, train_blocks in planned:
        test, quantiles = sample_test(windows, train, config, rng)
        rest = np.setdiff1d(np.arange(len(windows)), np.concatenate([train, test]))
        valid = (
            np.sort(rng.choice(rest, size=min(config.n_examples_valid, len(rest)), replace=False))
            if len(rest)
            else rest
        )
        rows += window_rows(
            latent, "train", "activating", [0] * len(train), windows.take(train), tokens
        )
        rows += window_rows(latent, "test", "activating", quantiles, windows.take(test), tokens)
        rows += window_rows(
            latent, "valid", "activating", [0] * len(valid), windows.take(valid), tokens
        )
        second = (
            sample_reseed(windows, np.concatenate([train, test, valid]), len(train), config, latent)
            if reseed_latents > 0 and latent in eligible
            else []
        )
        if len(second):
            rows += window_rows(
                latent, RESEED, "activating", [0] * len(second), windows.take(second), tokens
            )
            reseed_latents -= 1
        for split, split_counts_ in split_negatives:
            for kind, blocks in non_activating_blocks(
                latent, used, train_blocks, split_counts_, sources, window, rng
            ):
                seq, cell = np.divmod(blocks, sources.blocks_per_seq)
                negatives = Windows(seq, cell * window, np.zeros((len(blocks), window), np.float32))
                rows += window_rows(latent, split, kind, [-1] * len(blocks), negatives, tokens)
        latent_rows.append(
            latent_statistics(
                latent,
                windows,
                locations,
                values,
                tokens,
                stats,
                n_tokens,
                config.n_quantiles,
                sources.neighbours.get(latent, []),
            )
        )
    return pd.DataFrame(rows, columns=TABLES["exemplars"].columns), pd.DataFrame(latent_rows)


def context_index(
    root: DataRoot, corpus, window: int, embedder: EmbedderResource, coordination_url: str = ""
) -> ContextIndex:
    """The LanceDB table of every grid window of the corpus, embedded once per corpus and window length;
    beside it the tokens table, each distinct token of the corpus embedded alone (the embedding scorer's
    best-token spans read it: a partition shows nearly the whole vocabulary, which it would embed again)."""
    blocks_per_seq = corpus.tokens.shape[1] // window
    vocab = corpus_prompt_vocab(corpus)

    def build():
        grid = corpus.tokens[:, : blocks_per_seq * window].reshape(-1, window)
        texts = [window_text([vocab[t] for t in row]) for row in grid]
        return texts, embedder.embed(texts)

    embedding = window_embedding(embedder.model)
    ensure_token_vectors(
        root.lancedb_dir,
        corpus.meta["hash"],
        corpus.tokens,
        embedding,
        lambda ids: embedder.embed([token_text(vocab[t]) for t in ids]),
        coordination_url,
    )
    return ensure_contexts(
        root.lancedb_dir,
        contexts_table_name(corpus.meta["hash"], window, embedding),
        build,
        coordination_url,
    )


def negative_sources(
    root: DataRoot,
    coder_key: str,
    corpus,
    config: ExemplarsConfig,
    latents: list[int],
    embedder: EmbedderResource,
    meta: dict,
    coordination_url: str = "",
) -> NegativeSources:
    blocks_per_seq = corpus.tokens.shape[1] // config.example_ctx_len
    neighbours, neighbour_acts, contexts = {}, None, None
    if "neighbour" in config.non_activating_sources:
        neighbours = decoder_neighbours(
            load_registered(root.registry_dir, coder_key), latents, config.n_neighbours
        )
        wanted = (
            np.unique([n for ids in neighbours.values() for n in ids])
            if neighbours
            else np.zeros(0, int)
        )
        neighbour_acts = read_latents(
            root.activations_dir(coder_key), wanted, meta["width"], meta["latents_per_shard"]
        )
    if "embedding" in config.non_activating_sources:
        contexts = context_index(root, corpus, config.example_ctx_len, embedder, coordination_url)
    return NegativeSources(
        blocks_per_seq,
        corpus.tokens.shape[0] * blocks_per_seq,
        neighbours,
        neighbour_acts,
        contexts,
    )


def read_activations_meta(acts_dir: Path, coder: str) -> dict:
    meta = read_cache_meta(acts_dir)
    if meta is None:
        raise Failure(
            f"No finished activation cache for {coder} under {acts_dir}. "
            f"Fix: materialize `activations` for {coder} first."
        )
    return meta


def _shard_exemplars(
    context: AssetExecutionContext,
    partition_key: str,
    config: ExemplarsConfig,
    settings: AutointerpSettings,
    embedder: EmbedderResource,
    reseed_latents: int = 0,
) -> MaterializeResult:
    coder, shard = coder_and_shard(partition_key)
    store = settings.store
    root = store.layout
    corpus = load_corpus(root)
    acts_dir = root.activations_dir(coder)
    meta = read_activations_meta(acts_dir, coder)
    if meta.get("problems"):
        raise Failure(
            f"Coder {coder} is broken ({'; '.join(meta['problems'])}): nothing is built on it. "
            "Fix: replace the coder in the registry, then re-materialize `activations` for it."
        )
    if meta["corpus_hash"] != corpus.meta["hash"]:
        raise Failure(
            f"The activations of {coder} were cached on corpus {meta['corpus_hash']}, "
            f"but the corpus is now {corpus.meta['hash']} (re-materialized with other settings): "
            f"exemplars would show the wrong text. Fix: re-materialize `activations` for {coder}."
        )
    if meta.get("coder_fingerprint") and meta["coder_fingerprint"] != coder_fingerprint(
        root.registry_dir, coder
    ):
        raise Failure(
            f"The coder {coder} in the registry changed after its activations were cached: "
            f"exemplars would mix two coders. Fix: re-materialize `activations` for {coder} "
            "(or put the old coder files back)."
        )
    cached_shards = shard_keys(meta["n_shards"])
    if shard not in cached_shards:
        raise Failure(
            f"{coder} was cached in {meta['n_shards']} shards of {meta['latents_per_shard']} "
            f"latents ({cached_shards[0]} … {cached_shards[-1]}), so it has no shard {shard!r}: "
            "a partition key typed by hand, or latents_per_shard changed after the coder was "
            "registered. Fix: use the partitions the registry sensor added, "
            f"or set [settings] latents_per_shard back to {meta['latents_per_shard']}."
        )
    shard_acts = read_shard(acts_dir, shard)
    stats = load_latent_stats(root.latent_stats_path(coder))
    if (
        incomplete := check_shard_complete(
            shard_acts, stats["count"], meta["width"], meta["latents_per_shard"], int(shard)
        )
    ) is not None:
        raise Failure(
            f"The activation cache of {coder} shard {shard} is incomplete: {incomplete} "
            f"(a chunk file deleted or damaged?). Fix: delete {acts_dir} and re-materialize "
            f"`activations` for {coder}."
        )
    latents = sorted({int(x) for x in np.unique(shard_acts.locations[:, 2])})
    sources = negative_sources(
        root, coder, corpus, config, latents, embedder, meta, settings.coordination_url
    )
    profile_parts, counts, window_kinds = [], {}, []

    def batches():  # written as they are built, so the stage holds one batch of window rows
        for frame, profiles in exemplar_batches(
            shard_acts,
            corpus.tokens,
            config,
            sources,
            stats,
            meta["tokens"],
            reseed_latents=reseed_latents,
            reseed_among=settings.max_latents_per_shard,
        ):
            profile_parts.append(profiles)
            window_kinds.append(frame[["latent", "split", "kind"]])
            for kind, n in frame.groupby("kind").size().items():
                counts[kind] = counts.get(kind, 0) + int(n)
            yield frame

    def profiles() -> pd.DataFrame:
        return pd.concat(profile_parts, ignore_index=True) if profile_parts else pd.DataFrame()

    exemplars_table = store.exemplars(coder, shard)
    with store.writing(exemplars_table) as writer:
        n_windows = writer.commit_batches(
            batches(), beside=lambda: [(store.latent_profiles(coder, shard), profiles())]
        )
    store.record_exemplars_threshold(coder, shard, config.min_activating_windows)
    profiles = profiles()
    note = (
        {}
        if len(profiles)
        else {
            "note": f"empty shard: no explainable latent ({len(latents)} live latents, "
            f"none fires in {config.min_activating_windows} windows or more)"
        }
    )
    if note:
        context.log.warning(f"{coder} shard {shard}: {note['note']}")
    return MaterializeResult(
        metadata={
            **note,
            "latents_with_exemplars": len(profiles),
            "windows": n_windows,
            **{f"windows_{kind}": int(n) for kind, n in counts.items()},
            "subject_model": meta.get(
                "subject_model", "not recorded (cached before models were recorded)"
            ),
            **(
                {"embedder": embedder.identity()}
                if "embedding" in config.non_activating_sources
                else {}
            ),
            "path": MetadataValue.path(exemplars_table.location),
        },
        check_results=[
            result(
                "explainable_latents",
                explainable_latents(
                    pd.concat(window_kinds)
                    if window_kinds
                    else pd.DataFrame(columns=["latent", "split", "kind"]),
                    len(latents),
                ),
            )
        ],
    )


EXEMPLARS_VERSION = "3"  # 3: hard negatives from windows embedded as `window_text` renders them


def exemplars_asset(
    defaults: dict | None = None,
    partitions_per_run: int = 1,
    models: Models = NO_MODELS,
    reseed_latents: int = 0,
) -> AssetsDefinition:
    """The `exemplars` asset of a deployment: `defaults` are its [exemplars] table (part of the code version),
    and so is the embedder when it picks hard negatives. `reseed_latents` ([explanations] stability_latents):
    that many latents per shard get a second draw of explainer windows; part of the code version only when
    above 0, so that deployments without it re-run nothing."""
    Configured = with_defaults(ExemplarsConfig, defaults or {}, "exemplars")
    uses_embedder = "embedding" in Configured().non_activating_sources

    def exemplars(
        context: AssetExecutionContext,
        config,
        settings: AutointerpSettings,
        embedder: EmbedderResource,
    ):
        yield from each_shard(
            context,
            lambda key: _shard_exemplars(context, key, config, settings, embedder, reseed_latents),
        )

    exemplars.__annotations__.update(
        config=Configured,
        context=AssetExecutionContext,
        settings=AutointerpSettings,
        embedder=EmbedderResource,
    )
    return asset(
        name="exemplars",
        group_name="autointerp",
        partitions_def=shard_partitions,
        deps=[AssetDep("activations")],
        code_version=f"{EXEMPLARS_VERSION}-{settings_digest(Configured())}"
        f"{models.version_part('embedder') if uses_embedder else ''}"
        f"{f'-reseed{reseed_latents}' if reseed_latents else ''}",
        automation_condition=FOLLOW | CODE_CHANGED,
        backfill_policy=backfill_policy(partitions_per_run),
        output_required=False,  # a range records each shard itself (`each_shard`)
        check_specs=exemplars_specs(),
        **in_pool(None),
        description="Explainer (train) and scorer (test) windows per live latent, "
        "non-activating windows tagged by source, and per-latent statistics.",
    )(exemplars)
