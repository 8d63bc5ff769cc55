"""Benchmark exemplar construction and LanceDB's ANN search for hard negatives.

1. `latents_per_s`: `build_exemplars` (windows, samplers, random + neighbour negatives, per-latent
   statistics) over a synthetic cache shaped like a TopK SAE (k active latents per token).
2. `ann_recall_at_10`, `ann_qps`, `exact_qps`: the contexts table's ANN index (IVF + HNSW + SQ,
   `ANN_NPROBES`, refine) against exact cosine search (numpy, all vectors) on the same vectors:
   `--vectors` clustered unit vectors of MiniLM's width (384), as corpus windows are.
Prints a JSON object as its last line.

    .venv/bin/python bench/exemplars.py
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assets.exemplars import ExemplarsConfig, NegativeSources  # noqa: E402
from storage.activations import ShardActivations  # noqa: E402
from storage.vector_store import ContextIndex, ensure_contexts  # noqa: E402
from tests.conftest import build_exemplars  # noqa: E402


def synthetic_cache(
    n_seq: int, ctx_len: int, width: int, k: int, rng
) -> tuple[np.ndarray, ShardActivations]:
    tokens = rng.integers(0, 49_152, size=(n_seq, ctx_len)).astype(np.int32)
    n = n_seq * ctx_len
    popularity = rng.zipf(1.3, size=width).astype(np.float64)
    latents = rng.choice(width, size=(n, k), p=popularity / popularity.sum())
    rows = np.repeat(np.arange(n), k)
    locations = np.stack([rows // ctx_len, rows % ctx_len, latents.ravel()], 1).astype(np.int32)
    _, unique = np.unique(locations, axis=0, return_index=True)
    locations = locations[unique]
    order = np.lexsort((locations[:, 1], locations[:, 0], locations[:, 2]))
    return tokens, ShardActivations(
        locations[order], rng.random(len(order)).astype(np.float32) + 0.01
    )


def bench_exemplars(args, rng) -> float:
    tokens, shard = synthetic_cache(args.sequences, 128, args.width, 32, rng)
    config = ExemplarsConfig(non_activating_sources=["random", "neighbour"])
    latents = np.unique(shard.locations[:, 2])
    neighbours = {
        int(latent): rng.choice(args.width, size=10, replace=False).tolist() for latent in latents
    }
    sources = NegativeSources(128 // 32, args.sequences * 4, neighbours, shard, None)
    count = np.bincount(shard.locations[:, 2], minlength=args.width)
    stats = {"count": count, "max": np.ones(args.width), "sum": count * 0.5}
    started = time.perf_counter()
    _, per_latent = build_exemplars(shard, tokens, config, sources, stats, tokens.size)
    return len(per_latent) / (time.perf_counter() - started)


def bench_ann(args, rng) -> dict:
    centers = rng.normal(size=(256, 384))
    vectors = centers[rng.integers(0, 256, size=args.vectors)] + 0.6 * rng.normal(
        size=(args.vectors, 384)
    )
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    queries = vectors[
        rng.choice(args.vectors, size=args.queries, replace=False)
    ] + 0.05 * rng.normal(size=(args.queries, 384)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        built = time.perf_counter()
        index = ensure_contexts(
            Path(tmp), "contexts_bench_32", lambda: ([""] * len(vectors), vectors)
        )
        build_s = time.perf_counter() - built
        assert isinstance(index, ContextIndex) and index.indexed, (
            "raise --vectors above ANN_MIN_ROWS to bench the index"
        )
        started = time.perf_counter()
        ann = [index.nearest(q, 10) for q in queries]
        ann_s = time.perf_counter() - started
    started = time.perf_counter()
    exact = [np.argpartition(-(vectors @ q), 10)[:10] for q in queries]
    exact_s = time.perf_counter() - started
    recall = np.mean(
        [len(set(a.tolist()) & set(e.tolist())) / 10 for a, e in zip(ann, exact, strict=False)]
    )
    return {
        "vectors": args.vectors,
        "index_build_s": round(build_s, 1),
        "ann_recall_at_10": round(float(recall), 4),
        "ann_qps": round(args.queries / ann_s, 1),
        "exact_qps": round(args.queries / exact_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sequences", type=int, default=512, help="synthetic cache: sequences of 128 tokens"
    )
    parser.add_argument("--width", type=int, default=576, help="latents in the benchmarked shard")
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    result = {"latents_per_s": round(bench_exemplars(args, rng), 1), **bench_ann(args, rng)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
