"""Stage 2, `activations`: one streaming pass of the subject model serving every coder of the run.

All coders materialized in one run (a backfill of several `coder` partitions runs as a single
run) share one forward pass, cut after the deepest hooked layer. Each batch is encoded straight
to sparse (location, activation) pairs and buffered; once `checkpoint_entries` pairs are
buffered, every shard's buffer is written as a chunk, then the running statistics, then
`progress.json`, each atomically. A killed run resumes after its last checkpoint without
re-running the model on the sequences it had cached, and ends with exactly the pairs an
uninterrupted run stores.
"""

import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    BackfillPolicy,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.automation import CODE_CHANGED, FOLLOW, SUBJECT_MODEL_POOL, in_pool
from assets.partitions import DEFAULT_LATENTS_PER_SHARD, coders_of, shard_partitions
from assets.stage_config import NO_MODELS, Models
from resources.hookpoints import resolve_hookpoint
from resources.settings import AutointerpSettings
from resources.sparse_coders import SparseCode, SparseCoder, coder_fingerprint, load_registered
from resources.subject_model import SubjectModelResource
from resources.unembedding import save_unembedding
from storage.activations import (
    CHUNK_ENTRIES,
    LATENT_STATS_FILE,
    ShardedActivationWriter,
    load_latent_stats,
    read_cache_meta,
    read_progress,
    save_decoder_directions,
    save_latent_stats,
    write_cache_meta,
    write_progress,
)
from storage.coordination import Lease, exclusive
from storage.corpus import load_corpus
from storage.layout import DataRoot


class ActivationsConfig(Config):
    skip_bos: bool = Field(
        default=True,
        description="Do not cache position 0 when sequences start with BOS (its activations are outliers).",
    )
    checkpoint_entries: int = Field(
        default=CHUNK_ENTRIES,
        description="Buffered pairs (over all shards) that trigger a checkpoint; bounds memory.",
    )


class LatentStats:
    """Running per-latent firing count, max and sum, kept on the device that encodes."""

    def __init__(self, width: int, device: str | torch.device = "cpu"):
        self.count = torch.zeros(width, dtype=torch.int64, device=device)
        self.max = torch.zeros(width, dtype=torch.float32, device=device)
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, code: SparseCode, n_tokens: int) -> None:
        values = code.values.float()
        self.count += torch.bincount(code.latents, minlength=len(self.count))
        self.sum.index_add_(0, code.latents, values.double())
        self.max.scatter_reduce_(0, code.latents, values, reduce="amax")
        self.tokens += n_tokens

    def save(self, path: Path) -> None:
        save_latent_stats(
            path,
            self.count.cpu().numpy(),
            self.max.cpu().numpy(),
            self.sum.cpu().numpy(),
            self.tokens,
        )

    @classmethod
    def load(cls, path: Path, device) -> "LatentStats":
        saved = load_latent_stats(path)
        stats = cls(len(saved["count"]), device)
        stats.count, stats.max, stats.sum = (
            torch.from_numpy(saved[k]).to(device) for k in ("count", "max", "sum")
        )
        stats.tokens = int(saved["tokens"][0])
        return stats

    def summary(self) -> dict:
        live = int((self.count > 0).sum())
        return {
            "tokens": self.tokens,
            "live_latents": live,
            "dead_fraction": 1 - live / len(self.count),
            "mean_l0": float(self.count.sum()) / max(self.tokens, 1),
        }


FVU_SAMPLE_TOKENS = 4096


class FVUSample:
    """Fraction of variance unexplained over the first `FVU_SAMPLE_TOKENS` cached tokens, accumulated
    token-exactly so that it does not depend on batch size or on where a run was resumed."""

    def __init__(self, state: dict | None = None):
        state = state or {"tokens": 0, "sum": None, "sum_sq": 0.0, "residual_sq": 0.0}
        self.tokens, self.sum_sq, self.residual_sq = (
            state["tokens"],
            state["sum_sq"],
            state["residual_sq"],
        )
        self.sum = None if state["sum"] is None else torch.tensor(state["sum"], dtype=torch.float64)

    def add(self, coder: SparseCoder, x: torch.Tensor, code: SparseCode) -> None:
        take = min(FVU_SAMPLE_TOKENS - self.tokens, x.shape[0])
        if take <= 0 or not coder.reconstructs:
            return
        keep = code.rows < take
        part = SparseCode(code.rows[keep], code.latents[keep], code.values[keep])
        x = x[:take].double()
        residual = x - coder.decode(part, take).double()
        self.sum = x.sum(0).cpu() if self.sum is None else self.sum + x.sum(0).cpu()
        self.sum_sq += float(x.pow(2).sum())
        self.residual_sq += float(residual.pow(2).sum())
        self.tokens += take

    @property
    def value(self) -> float | None:
        if not self.tokens:
            return None
        centered = self.sum_sq - float(self.sum.pow(2).sum()) / self.tokens
        return self.residual_sq / centered

    def state(self) -> dict:
        return {
            "tokens": self.tokens,
            "sum": None if self.sum is None else self.sum.tolist(),
            "sum_sq": self.sum_sq,
            "residual_sq": self.residual_sq,
        }


@dataclass
class CoderCache:
    """One coder's writer, statistics and progress within a shared pass."""

    coder: SparseCoder
    out_dir: Path
    writer: ShardedActivationWriter
    stats: LatentStats
    next_sequence: int
    identity: dict
    fvu: FVUSample
    lease: Lease
    """The coder's lock: checked before each file of a checkpoint replaces anything."""

    def save_progress(self) -> None:
        """Chunks, then the statistics of this checkpoint under its own name, then progress.json, which
        commits both. A kill before progress.json is written leaves the last committed statistics in
        place, so a resumed run never counts the re-run sequences twice."""
        self.writer.checkpoint(self.lease.check)
        stats_file = f"stats.partial-{self.writer.checkpoints:05d}.safetensors"
        self.stats.save(self.out_dir / stats_file)
        self.lease.check()  # progress.json commits the checkpoint: refused under a lost lock
        write_progress(
            self.out_dir,
            {
                **self.identity,
                "checkpoints": self.writer.checkpoints,
                "next_sequence": self.next_sequence,
                "fvu": self.fvu.state(),
                "stats_file": stats_file,
                "lease": self.lease.record,
            },
        )
        for old in self.out_dir.glob("stats.partial*.safetensors"):
            if old.name != stats_file:
                old.unlink(missing_ok=True)


def open_cache(
    coder: SparseCoder, out_dir: Path, identity: dict, device, lease: Lease
) -> CoderCache:
    """Resume the coder's cache from its last checkpoint if it is for the same corpus and coder, else start anew."""
    progress = read_progress(out_dir)
    if progress is not None and read_cache_meta(out_dir) is None:
        if (
            all(progress.get(k) == v for k, v in identity.items())
            and (out_dir / progress.get("stats_file", "")).is_file()
        ):
            writer = ShardedActivationWriter(
                out_dir,
                coder.width,
                identity["latents_per_shard"],
                first_checkpoint=progress["checkpoints"],
            )
            writer.discard_chunks_from(progress["checkpoints"])
            stats = LatentStats.load(out_dir / progress["stats_file"], device)
            return CoderCache(
                coder,
                out_dir,
                writer,
                stats,
                progress["next_sequence"],
                identity,
                FVUSample(progress["fvu"]),
                lease,
            )
    shutil.rmtree(out_dir, ignore_errors=True)
    return CoderCache(
        coder,
        out_dir,
        ShardedActivationWriter(out_dir, coder.width, identity["latents_per_shard"]),
        LatentStats(coder.width, device),
        0,
        identity,
        FVUSample(),
        lease,
    )


def cache_activations(
    coders: list[SparseCoder],
    subject_model: SubjectModelResource,
    root: DataRoot,
    *,
    skip_bos: bool = True,
    checkpoint_entries: int = CHUNK_ENTRIES,
    latents_per_shard: int = DEFAULT_LATENTS_PER_SHARD,
    log=None,
    coordination_url: str = "",
) -> dict[str, dict]:
    """Cache every coder's sparse activations over the corpus in one pass; returns each coder's meta.
    Each coder is locked for the pass (on every node, with a `coordination_url`): a second run on
    the same coder stops at once instead of repeating the work."""
    with ExitStack() as locks:
        leases = {
            coder.key: locks.enter_context(
                exclusive(
                    coordination_url,
                    f"activations {coder.key}",
                    root.activations_lock_path(coder.key),
                    f"Caching the activations of {coder.key}",
                )
            )
            for coder in coders
        }
        return _cache_activations(
            coders,
            subject_model,
            root,
            skip_bos=skip_bos,
            checkpoint_entries=checkpoint_entries,
            latents_per_shard=latents_per_shard,
            log=log,
            leases=leases,
        )


def _cache_activations(
    coders: list[SparseCoder],
    subject_model: SubjectModelResource,
    root: DataRoot,
    *,
    skip_bos: bool,
    checkpoint_entries: int,
    latents_per_shard: int,
    log,
    leases: dict[str, Lease],
) -> dict[str, dict]:
    corpus = load_corpus(root)
    lm = subject_model.causal_lm()
    device = subject_model.device
    for coder in coders:
        resolve_hookpoint(lm, coder.hookpoint)
    unembedding = root.unembedding_path(subject_model.tokenizer_identity())
    # the latent browser's logit lens, written while the model is loaded: the browser need never load it
    if not unembedding.exists():
        save_unembedding(lm, unembedding)
    caches, metas = [], {}
    for coder in coders:
        identity = {
            "corpus_hash": corpus.meta["hash"],
            "coder": coder_fingerprint(root.registry_dir, coder.key),
            "latents_per_shard": latents_per_shard,
            "skip_bos": skip_bos,
            "subject_model": subject_model.identity(),
        }  # another model with the same tokenizer must not reuse these pairs
        done = read_cache_meta(root.activations_dir(coder.key))
        if (
            done is not None and done.get("identity") == identity
        ):  # another shard of this coder was cached already
            if log:
                log(
                    f"activations: {coder.key} is cached already for this corpus and coder; reusing it"
                )
            metas[coder.key] = done
            continue
        caches.append(
            open_cache(
                coder.to(device, torch.float32),
                root.activations_dir(coder.key),
                identity,
                device,
                leases[coder.key],
            )
        )
    if not caches:
        return metas
    first_position = 1 if (skip_bos and corpus.meta["add_bos"]) else 0
    tokens = torch.from_numpy(corpus.tokens).long()
    if device.startswith("cuda"):
        tokens = tokens.pin_memory()
    n_sequences, ctx_len = tokens.shape
    n_pos = ctx_len - first_position
    batch_size = subject_model.sequences_per_batch(ctx_len, [c.width for c in coders])
    sites = {(c.hookpoint, c.reads) for c in coders}
    start = min(c.next_sequence for c in caches)
    forwarded, started, last_report = 0, time.perf_counter(), 0.0
    for seq_start in range(start, n_sequences, batch_size):
        batch = tokens[seq_start : seq_start + batch_size].to(device, non_blocking=True)
        captured = subject_model.capture(batch, sites)
        forwarded += len(batch)
        for cache in caches:
            skip = cache.next_sequence - seq_start
            if skip >= len(batch):
                continue
            skip = max(skip, 0)
            hidden = captured[(cache.coder.hookpoint, cache.coder.reads)][skip:, first_position:]
            cache.coder.check_input_width(hidden.shape[-1], subject_model.model)
            flat = hidden.reshape(-1, hidden.shape[-1]).float()
            code = cache.coder.encode(flat)
            cache.fvu.add(cache.coder, flat, code)
            cache.stats.update(code, flat.shape[0])
            locations = torch.stack(
                [
                    code.rows // n_pos + seq_start + skip,
                    code.rows % n_pos + first_position,
                    code.latents,
                ],
                dim=1,
            )
            cache.writer.add(
                locations.to(torch.int32).cpu().numpy(), code.values.float().cpu().numpy()
            )
            cache.next_sequence = seq_start + len(batch)
            if cache.writer.buffered >= checkpoint_entries:
                cache.save_progress()
        done = min(seq_start + batch_size, n_sequences)
        if log and (done == n_sequences or time.perf_counter() - last_report > 10):
            last_report = time.perf_counter()
            log(
                f"activations: {done}/{n_sequences} sequences, "
                f"{forwarded * n_pos / (last_report - started):,.0f} tokens/s"
            )
    for cache in caches:
        cache.save_progress()
        stats = cache.stats
        stats.save(cache.out_dir / LATENT_STATS_FILE)
        directions = cache.coder.decoder_directions()
        if directions is not None:
            save_decoder_directions(cache.out_dir, directions.cpu().numpy())
        meta = {
            "coder": cache.coder.key,
            "hookpoint": cache.coder.hookpoint,
            "format": cache.coder.source_format,
            "activation": cache.coder.activation,
            "width": cache.coder.width,
            "latents_per_shard": latents_per_shard,
            "n_shards": cache.writer.n_shards,
            "corpus_hash": corpus.meta["hash"],
            "coder_fingerprint": cache.identity["coder"],
            "subject_model": cache.identity["subject_model"],
            "identity": cache.identity,
            "decoder_directions": directions is not None,
            "fvu": cache.fvu.value,
            "sequences_forwarded_this_run": forwarded,
            "tokens_per_second": forwarded * n_pos / max(time.perf_counter() - started, 1e-9),
            **stats.summary(),
        }
        meta["problems"] = coder_problems(
            meta
        )  # kept beside the numbers: a NaN FVU is stored as null
        cache.lease.check()
        write_cache_meta(cache.out_dir, meta)
        metas[cache.coder.key] = meta
    return metas


def coder_problems(meta: dict) -> list[str]:
    """What makes a cached coder broken: every latent dead, or a reconstruction worse than the mean."""
    problems = []
    if meta["live_latents"] == 0:
        problems.append("all latents are dead")
    if meta["fvu"] is not None and not meta["fvu"] <= 1:
        problems.append(
            f"FVU {meta['fvu']:.3f} > 1 or not finite: the reconstruction is worse than predicting the mean"
        )
    return problems


ACTIVATIONS_VERSION = "2"


def activations_asset(models: Models = NO_MODELS) -> AssetsDefinition:
    """The `activations` asset; its code version names the deployment's subject model, so another model
    (or dtype) re-caches every coder and re-runs everything below."""
    return asset(
        name="activations",
        group_name="autointerp",
        partitions_def=shard_partitions,
        backfill_policy=BackfillPolicy.single_run(),
        deps=["corpus"],
        code_version=ACTIVATIONS_VERSION + models.version_part("subject_model"),
        automation_condition=FOLLOW | CODE_CHANGED,
        **in_pool(SUBJECT_MODEL_POOL),
        check_specs=[
            AssetCheckSpec(
                "coder_health",
                asset="activations",
                blocking=True,
                description="Fails on a broken coder: all latents dead, "
                "or FVU > 1 or not finite; blocks everything downstream.",
            )
        ],
        description="Sparse activations of each coder over the corpus, "
        "sharded over the latent range; all coders of a run share one forward pass.",
    )(_activations)


def _activations(
    context: AssetExecutionContext,
    config: ActivationsConfig,
    settings: AutointerpSettings,
    subject_model: SubjectModelResource,
) -> MaterializeResult:
    root = settings.root
    coders = [load_registered(root.registry_dir, key) for key in coders_of(context.partition_keys)]
    metas = cache_activations(
        coders,
        subject_model,
        root,
        skip_bos=config.skip_bos,
        checkpoint_entries=config.checkpoint_entries,
        latents_per_shard=settings.latents_per_shard,
        log=context.log.info,
        coordination_url=settings.coordination_url,
    )
    problems = {key: meta["problems"] for key, meta in metas.items()}
    for key, found in problems.items():
        for problem in found:
            context.log.error(f"coder {key} is broken: {problem}")
    table = pd.DataFrame(metas.values())[
        ["coder", "format", "width", "tokens", "live_latents", "dead_fraction", "mean_l0", "fvu"]
    ]
    metadata = {
        "coders": MetadataValue.md(table.round(4).to_markdown(index=False)),
        "tokens_cached": int(table["tokens"].iloc[0]),
        "live_latents": int(table["live_latents"].sum()),
        "dead_fraction": MetadataValue.float(round(float(table["dead_fraction"].mean()), 4)),
        "mean_l0": MetadataValue.float(round(float(table["mean_l0"].mean()), 2)),
        "tokens_per_second": MetadataValue.float(
            round(float(next(iter(metas.values()))["tokens_per_second"]), 1)
        ),
        "subject_model": subject_model.identity(),
    }
    if len(metas) == 1 and table["fvu"].iloc[0] is not None:
        metadata["fvu"] = MetadataValue.float(round(float(table["fvu"].iloc[0]), 4))
    check = AssetCheckResult(
        check_name="coder_health",
        passed=not any(problems.values()),
        severity=AssetCheckSeverity.ERROR,
        metadata={key: "; ".join(found) or "healthy" for key, found in problems.items()},
    )
    return MaterializeResult(metadata=metadata, check_results=[check])


activations = activations_asset()
