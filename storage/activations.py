"""The sparse activation cache: per-coder shards over the latent range, written in chunks.

Layout of `activations/<coder>/` (documented for users in the README):

- `meta.json`: coder, hookpoint, width, latents_per_shard, n_shards, the cache's identity, token counts.
- `latent_stats.safetensors`: per latent `count` (int64, tokens where it fired),
  `max` (float32, largest activation) and `sum` (float64, sum of activations); `tokens` (int64
  `[1]`, tokens cached). The same format holds the running statistics at each checkpoint.
- `shard-XX/chunk-NNNNN.safetensors`: `locations` int32 `[n, 3]` = (sequence, position, latent)
  and `activations` float32 `[n]`, for the latents of shard XX only, written at checkpoint NNNNN.
  Chunks are written atomically as the cache streams, so memory stays flat however many tokens
  are cached.
- `decoder_directions.npy`: the coder's unit-norm decoder rows, float32 `[width, d_in]`, written
  with the cache (`meta.json` says `decoder_directions: true`) so that the latent browser's first
  page finds them ready (neighbours, logit lens) instead of converting the coder's weights.
- `progress.json`: the checkpoint count, the next sequence to encode and the running statistics
  file, so that a killed run resumes where its last checkpoint ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from storage.atomic import atomic_path, read_json, write_json

CHUNK_ENTRIES = 1 << 20
"""Pairs buffered over all shards before a checkpoint writes them (16 MiB)."""


def shard_count(width: int, latents_per_shard: int) -> int:
    """Shards of a coder: each holds `latents_per_shard` latents, the last one the rest."""
    return max(1, -(-width // latents_per_shard))


def shard_key(index: int, n_shards: int) -> str:
    """Shard `index`'s key, as in its partition `<coder>|NN`: zero-padded to the last one's digits
    (two at least)."""
    return str(index).zfill(max(2, len(str(n_shards - 1))))


def shard_keys(n_shards: int) -> list[str]:
    return [shard_key(i, n_shards) for i in range(n_shards)]


def shard_latent_range(width: int, latents_per_shard: int, shard_index: int) -> tuple[int, int]:
    """Latents [start, end) of one shard."""
    return shard_index * latents_per_shard, min(width, (shard_index + 1) * latents_per_shard)


def shard_of_latents(latents: np.ndarray, latents_per_shard: int) -> np.ndarray:
    """Index of the shard holding each latent (the inverse of `shard_latent_range`)."""
    return np.asarray(latents) // latents_per_shard


def shard_of(meta: dict, latent: int) -> str:
    """The key of the shard holding `latent`, in the cache whose `meta.json` is `meta`."""
    index = int(shard_of_latents(latent, int(meta["latents_per_shard"])))
    return shard_key(index, int(meta["n_shards"]))


def shard_dir(activations_dir: Path, shard: str) -> Path:
    return activations_dir / f"shard-{shard}"


class ShardedActivationWriter:
    """Buffers (location, activation) pairs by shard; `checkpoint()` writes every shard's buffer as
    chunk `chunk-<checkpoint>.safetensors`, atomically, so a crash never leaves half a chunk."""

    def __init__(
        self, activations_dir: Path, width: int, latents_per_shard: int, first_checkpoint: int = 0
    ):
        self.activations_dir = activations_dir
        self.width = width
        self.latents_per_shard = latents_per_shard
        self.n_shards = shard_count(width, latents_per_shard)
        self.keys = shard_keys(self.n_shards)
        self.checkpoints = first_checkpoint
        self.buffered = 0
        self._buffers: list[list[tuple[np.ndarray, np.ndarray]]] = [
            [] for _ in range(self.n_shards)
        ]
        for key in self.keys:
            shard_dir(activations_dir, key).mkdir(parents=True, exist_ok=True)

    def add(self, locations: np.ndarray, activations: np.ndarray) -> None:
        """Add `[n, 3]` int32 (sequence, position, latent) locations and their `[n]` activations."""
        shard_of = shard_of_latents(locations[:, 2], self.latents_per_shard)
        order = np.argsort(shard_of, kind="stable")
        counts = np.bincount(shard_of, minlength=self.n_shards)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for i in np.nonzero(counts)[0]:
            rows = order[offsets[i] : offsets[i + 1]]
            self._buffers[i].append((locations[rows], activations[rows]))
        self.buffered += len(locations)

    def checkpoint(self, before_replace=None) -> None:
        """Write the buffered pairs as each shard's next chunk; `before_replace` (a lease check) may refuse each."""
        for i, buffer in enumerate(self._buffers):
            if not buffer:
                continue
            tensors = {
                "locations": np.concatenate([b[0] for b in buffer]).astype(np.int32),
                "activations": np.concatenate([b[1] for b in buffer]).astype(np.float32),
            }
            with atomic_path(
                shard_dir(self.activations_dir, self.keys[i])
                / f"chunk-{self.checkpoints:05d}.safetensors",
                before_replace,
            ) as tmp:
                save_file(tensors, str(tmp))
            buffer.clear()
        self.buffered = 0
        self.checkpoints += 1

    def discard_chunks_from(self, checkpoint: int) -> None:
        """Remove what a crash left behind unrecorded: chunks of checkpoints >= `checkpoint`, temporary files."""
        for key in self.keys:
            folder = shard_dir(self.activations_dir, key)
            for path in folder.glob(".*.tmp"):
                path.unlink()
            for path in folder.glob("chunk-*.safetensors"):
                if int(path.stem.split("-")[1]) >= checkpoint:
                    path.unlink()


@dataclass
class ShardActivations:
    """All cached activations of one shard, sorted by latent then location."""

    locations: np.ndarray
    activations: np.ndarray

    def by_latent(self):
        """Yield (latent, locations, activations) for each latent that fired in this shard."""
        latents = self.locations[:, 2]
        boundaries = np.flatnonzero(np.diff(latents)) + 1
        starts = np.concatenate([[0], boundaries])
        ends = np.concatenate([boundaries, [len(latents)]])
        for start, end in zip(starts, ends, strict=False):
            if end > start:
                yield int(latents[start]), self.locations[start:end], self.activations[start:end]


def read_shard(activations_dir: Path, shard: str) -> ShardActivations:
    chunks = sorted(shard_dir(activations_dir, shard).glob("chunk-*.safetensors"))
    if not chunks:
        return ShardActivations(np.zeros((0, 3), np.int32), np.zeros(0, np.float32))
    parts = [load_file(str(p)) for p in chunks]
    locations = np.concatenate([p["locations"] for p in parts])
    activations = np.concatenate([p["activations"] for p in parts])
    order = np.lexsort((locations[:, 1], locations[:, 0], locations[:, 2]))
    return ShardActivations(locations[order], activations[order])


def read_latents(
    activations_dir: Path, latents: np.ndarray, width: int, latents_per_shard: int
) -> ShardActivations:
    """Cached activations of some latents only, reading just the shards that hold them."""
    latents = np.unique(latents)
    parts = []
    names = shard_keys(shard_count(width, latents_per_shard))
    for i in np.unique(shard_of_latents(latents, latents_per_shard)):
        shard = read_shard(activations_dir, names[i])
        keep = np.isin(shard.locations[:, 2], latents)
        parts.append(ShardActivations(shard.locations[keep], shard.activations[keep]))
    if not parts:
        return ShardActivations(np.zeros((0, 3), np.int32), np.zeros(0, np.float32))
    return ShardActivations(
        np.concatenate([p.locations for p in parts]), np.concatenate([p.activations for p in parts])
    )


def save_latent_stats(
    path: Path, count: np.ndarray, maximum: np.ndarray, total: np.ndarray, tokens: int
) -> None:
    tensors = {
        "count": count.astype(np.int64),
        "max": maximum.astype(np.float32),
        "sum": total.astype(np.float64),
        "tokens": np.array([tokens], np.int64),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_latent_stats(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def check_shard_complete(
    shard: ShardActivations,
    counts: np.ndarray,
    width: int,
    latents_per_shard: int,
    shard_index: int,
) -> str | None:
    """Why a shard's chunks do not hold every pair the latent statistics counted (a chunk deleted or
    cut short), or None when they do: the statistics count one pair per token a latent fired on."""
    start, end = shard_latent_range(width, latents_per_shard, shard_index)
    expected, found = int(np.asarray(counts)[start:end].sum()), len(shard.locations)
    if expected != found:
        return f"its chunks hold {found} activations where the latent statistics counted {expected}"
    return None


LATENT_STATS_FILE = "latent_stats.safetensors"
PROGRESS_FILE = "progress.json"
META_FILE = "meta.json"


def write_progress(activations_dir: Path, progress: dict) -> None:
    """`progress.json`: the cache's identity (corpus hash, coder fingerprint, shard layout, skip_bos),
    `checkpoints`, `next_sequence`, the FVU accumulators (`fvu`), the `stats_file` it commits and the
    `lease` it was written under."""
    write_json(activations_dir / PROGRESS_FILE, progress)


def read_progress(activations_dir: Path) -> dict | None:
    path = activations_dir / PROGRESS_FILE
    return read_json(path) if path.exists() else None


def write_cache_meta(activations_dir: Path, meta: dict) -> None:
    """`meta.json`, written last, when the cache is complete: coder, hookpoint, format, activation,
    width, shard layout, corpus hash, tokens, live latents, dead fraction, mean L0, FVU, tokens/s."""
    write_json(activations_dir / META_FILE, meta)


DECODER_DIRECTIONS_FILE = "decoder_directions.npy"


def save_decoder_directions(activations_dir: Path, directions: np.ndarray) -> None:
    """`decoder_directions.npy`, before `meta.json`: a cache whose meta says `decoder_directions: true` has them."""
    with atomic_path(activations_dir / DECODER_DIRECTIONS_FILE) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(directions, np.float32))


def load_decoder_directions(activations_dir: Path) -> np.ndarray:
    """The cache's unit-norm decoder rows, memory-mapped (read only the rows used)."""
    return np.load(activations_dir / DECODER_DIRECTIONS_FILE, mmap_mode="r")


def read_cache_meta(activations_dir: Path) -> dict | None:
    """The complete cache's `meta.json`, or None while the cache is missing or unfinished."""
    path = activations_dir / META_FILE
    return read_json(path) if path.exists() else None
