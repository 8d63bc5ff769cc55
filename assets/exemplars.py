"""Stage 3, `exemplars`: per live latent, activating windows to explain and a disjoint test set to score.

A window is a fixed block of `example_ctx_len` tokens of a corpus sequence. The explainer sees the
top-activating windows (`train`); the scorer sees other activating windows stratified by
activation quantile plus random windows where the latent is zero (`test`), never the same window.
"""

import warnings

import numpy as np
import pandas as pd
from dagster import (
    AssetDep,
    BetaWarning,
    AutomationCondition,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    asset,
)
from pydantic import Field

from assets.corpus import load_corpus
from assets.partitions import coder_and_shard, coder_shard_partitions
from resources.settings import AutointerpSettings
from storage.activation_shards import read_shard
from storage.tables import write_table

with warnings.catch_warnings():
    warnings.simplefilter("ignore", BetaWarning)  # the mapping is exactly what we need, beta or not
    EACH_SHARD_READS_ITS_CODER = MultiToSingleDimensionPartitionMapping(partition_dimension_name="coder")

EXEMPLAR_COLUMNS = ["latent", "split", "kind", "quantile", "sequence", "start", "max_activation", "tokens", "activations"]


class ExemplarsConfig(Config):
    example_ctx_len: int = Field(default=32, description="Tokens per example window.")
    n_examples_train: int = Field(default=15, description="Top-activating windows shown to the explainer.")
    n_examples_test: int = Field(default=10, description="Activating windows held out for scoring.")
    n_non_activating: int = Field(default=10, description="Random windows where the latent is zero, for scoring.")
    n_quantiles: int = Field(default=5, description="Activation quantiles the test windows are stratified over.")
    min_activating_windows: int = Field(default=8, description="Skip latents that fire in fewer windows than this.")
    seed: int = Field(default=0, description="Seed of all sampling; the same seed gives the same windows.")


def _window_rows(latent, split, kind, quantiles, blocks, block_acts, tokens, window) -> list[dict]:
    rows = []
    for (seq, block), acts, q in zip(blocks, block_acts, quantiles):
        start = int(block) * window
        rows.append(
            {
                "latent": latent,
                "split": split,
                "kind": kind,
                "quantile": int(q),
                "sequence": int(seq),
                "start": start,
                "max_activation": float(acts.max()),
                "tokens": tokens[seq, start : start + window].astype(np.int32).tolist(),
                "activations": acts.astype(np.float32).tolist(),
            }
        )
    return rows


def _seq_blocks(block_ids: np.ndarray, blocks_per_seq: int) -> list[tuple[int, int]]:
    return [divmod(int(b), blocks_per_seq) for b in block_ids]


def build_exemplars(shard_acts, tokens: np.ndarray, config: ExemplarsConfig) -> pd.DataFrame:
    window = config.example_ctx_len
    blocks_per_seq = tokens.shape[1] // window
    n_blocks = tokens.shape[0] * blocks_per_seq
    rng = np.random.default_rng(config.seed)
    rows: list[dict] = []
    for latent, locations, values in shard_acts.by_latent():
        block_pos = locations[:, 1] // window
        in_range = block_pos < blocks_per_seq
        block_ids = locations[in_range, 0].astype(np.int64) * blocks_per_seq + block_pos[in_range]
        unique_blocks, inverse = np.unique(block_ids, return_inverse=True)
        if len(unique_blocks) < config.min_activating_windows:
            continue
        acts = np.zeros((len(unique_blocks), window), np.float32)
        acts[inverse, locations[in_range, 1] % window] = values[in_range]
        order = np.argsort(-acts.max(1), kind="stable")
        train = order[: config.n_examples_train]
        rest = order[config.n_examples_train :]
        # Quantile 1 holds the strongest held-out windows, quantile n_quantiles the weakest.
        strata = np.array_split(rest, config.n_quantiles) if len(rest) else []
        per_stratum = max(1, config.n_examples_test // max(1, config.n_quantiles))
        test, test_q = [], []
        for q, stratum in enumerate(strata, start=1):
            picked = rng.choice(stratum, size=min(per_stratum, len(stratum)), replace=False) if len(stratum) else []
            test.extend(picked)
            test_q.extend([q] * len(picked))
        rows += _window_rows(latent, "train", "activating", [0] * len(train), _seq_blocks(unique_blocks[train], blocks_per_seq), acts[train], tokens, window)
        rows += _window_rows(latent, "test", "activating", test_q, _seq_blocks(unique_blocks[np.array(test, dtype=int)], blocks_per_seq), acts[np.array(test, dtype=int)], tokens, window)
        candidates = rng.choice(n_blocks, size=min(n_blocks, 4 * config.n_non_activating + len(unique_blocks)), replace=False)
        negatives = candidates[~np.isin(candidates, unique_blocks)][: config.n_non_activating]
        neg_pairs = _seq_blocks(negatives, blocks_per_seq)
        rows += _window_rows(latent, "test", "random", [-1] * len(neg_pairs), neg_pairs, np.zeros((len(neg_pairs), window), np.float32), tokens, window)
    return pd.DataFrame(rows, columns=EXEMPLAR_COLUMNS)


@asset(
    group_name="autointerp",
    partitions_def=coder_shard_partitions,
    deps=[AssetDep("activations", partition_mapping=EACH_SHARD_READS_ITS_CODER)],
    code_version="1",
    automation_condition=AutomationCondition.eager(),
    description="Train (top-activating) and test (quantile-stratified + random non-activating) windows per live latent.",
)
def exemplars(context: AssetExecutionContext, config: ExemplarsConfig, settings: AutointerpSettings) -> MaterializeResult:
    coder, shard = coder_and_shard(context.partition_key)
    root = settings.root
    corpus = load_corpus(root)
    frame = build_exemplars(read_shard(root.activations_dir(coder), shard), corpus.tokens, config)
    write_table(frame, root.exemplars_path(coder, shard))
    n_latents = int(frame["latent"].nunique()) if len(frame) else 0
    return MaterializeResult(
        metadata={
            "latents_with_exemplars": n_latents,
            "windows": len(frame),
            "path": MetadataValue.path(str(root.exemplars_path(coder, shard))),
        }
    )
