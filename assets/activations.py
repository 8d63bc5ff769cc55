"""Stage 2, `activations`: one streaming pass of the subject model, encoded by a sparse coder to top-k pairs.

Each batch is encoded straight to (location, activation) pairs and handed to the shard writer,
which flushes fixed-size chunks to disk, so memory is flat in the number of cached tokens.
"""

import time

import numpy as np
import torch
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.corpus import load_corpus
from assets.partitions import N_SHARDS, coder_partitions
from resources.settings import AutointerpSettings
from resources.sparse_coders import SparseCoder, load_registered
from resources.subject_model import SubjectModelResource, capture_hookpoints, resolve_hookpoint
from storage.activation_shards import ShardedActivationWriter, save_latent_stats
from storage.atomic import write_json


class ActivationsConfig(Config):
    skip_bos: bool = Field(default=True, description="Do not cache position 0 when sequences start with BOS (its activations are outliers).")


class LatentStats:
    """Running per-latent firing count, max and sum, plus reconstruction error on the first batch."""

    def __init__(self, width: int):
        self.count = torch.zeros(width, dtype=torch.int64)
        self.max = torch.zeros(width, dtype=torch.float32)
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.tokens = 0
        self.fvu: float | None = None

    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        flat_v, flat_i = values.flatten().float(), indices.flatten()
        fired = flat_v > 0
        flat_v, flat_i = flat_v[fired], flat_i[fired]
        self.count += torch.bincount(flat_i, minlength=len(self.count))
        self.sum.index_add_(0, flat_i, flat_v.double())
        self.max.scatter_reduce_(0, flat_i, flat_v, reduce="amax")
        self.tokens += values.shape[0]

    def summary(self) -> dict:
        live = int((self.count > 0).sum())
        return {
            "tokens": self.tokens,
            "live_latents": live,
            "dead_fraction": 1 - live / len(self.count),
            "mean_l0": float(self.count.sum()) / max(self.tokens, 1),
            "fvu": self.fvu,
        }


def fraction_of_variance_unexplained(coder: SparseCoder, x: torch.Tensor) -> float:
    values, indices = coder.encode(x)
    residual = x - coder.decode(values, indices)
    return float(residual.pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def cache_activations(context, coder: SparseCoder, subject_model: SubjectModelResource, settings: AutointerpSettings, skip_bos: bool) -> dict:
    root = settings.root
    corpus = load_corpus(root)
    lm = subject_model.causal_lm()
    resolve_hookpoint(lm, coder.hookpoint)
    out_dir = root.activations_dir(coder.key)
    writer = ShardedActivationWriter(out_dir, coder.width, N_SHARDS)
    stats = LatentStats(coder.width)
    tokens = torch.from_numpy(corpus.tokens).long()
    first_position = 1 if (skip_bos and corpus.meta["add_bos"]) else 0
    batch_size = subject_model.batch_size
    n_batches = (len(tokens) + batch_size - 1) // batch_size
    started = time.perf_counter()
    for b, seq_start in enumerate(range(0, len(tokens), batch_size)):
        batch = tokens[seq_start : seq_start + batch_size].to(subject_model.device)
        hidden = capture_hookpoints(lm, batch, {coder.hookpoint: coder.reads})[coder.hookpoint]
        if b == 0:
            coder.check_input_width(hidden.shape[-1], subject_model.model)
        hidden = hidden[:, first_position:].float().cpu()
        n_seq, n_pos, d = hidden.shape
        flat = hidden.reshape(-1, d)
        if b == 0:
            stats.fvu = fraction_of_variance_unexplained(coder, flat)
        values, indices = coder.encode(flat)
        stats.update(values, indices)
        keep = values > 0
        rows = torch.arange(flat.shape[0]).unsqueeze(1).expand_as(indices)[keep]
        locations = torch.stack(
            [rows // n_pos + seq_start, rows % n_pos + first_position, indices[keep]], dim=1
        ).to(torch.int32)
        writer.add(locations.numpy(), values[keep].numpy())
        if context is not None and (b + 1) % max(1, n_batches // 10) == 0:
            rate = stats.tokens / (time.perf_counter() - started)
            context.log.info(f"activations {coder.key}: batch {b + 1}/{n_batches}, {rate:,.0f} tokens/s")
    writer.close()
    save_latent_stats(out_dir / "latent_stats.safetensors", stats.count.numpy(), stats.max.numpy(), stats.sum.numpy())
    meta = {
        "coder": coder.key,
        "hookpoint": coder.hookpoint,
        "width": coder.width,
        "k": coder.k,
        "n_shards": N_SHARDS,
        "corpus_hash": corpus.meta["hash"],
        "tokens_per_second": stats.tokens / (time.perf_counter() - started),
        **stats.summary(),
    }
    write_json(out_dir / "meta.json", meta)
    return meta


@asset(
    group_name="autointerp",
    partitions_def=coder_partitions,
    deps=["corpus"],
    code_version="1",
    description="Sparse top-k activations of one coder over the corpus, sharded over the latent range.",
)
def activations(
    context: AssetExecutionContext,
    config: ActivationsConfig,
    settings: AutointerpSettings,
    subject_model: SubjectModelResource,
) -> MaterializeResult:
    coder = load_registered(settings.root.registry_dir, context.partition_key)
    meta = cache_activations(context, coder, subject_model, settings, config.skip_bos)
    return MaterializeResult(
        metadata={
            "tokens_cached": meta["tokens"],
            "live_latents": meta["live_latents"],
            "dead_fraction": MetadataValue.float(meta["dead_fraction"]),
            "mean_l0": MetadataValue.float(meta["mean_l0"]),
            "fvu_first_batch": MetadataValue.float(meta["fvu"]),
            "tokens_per_second": MetadataValue.float(meta["tokens_per_second"]),
            "width": meta["width"],
            "path": MetadataValue.path(str(settings.root.activations_dir(coder.key))),
        }
    )
