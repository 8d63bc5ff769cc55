"""Benchmark the latent browser on a 100,000-latent coder: p50/p95 response times and server memory.

Builds a data root with every table the viewer reads, in the pipeline's own on-disk formats, for a
synthetic TopK SAE (random weights, `--width` latents at d_model 576, the embedded model's width, so
the logit lens runs on the real unembedding): corpus, activation cache (`--acts` pairs per latent,
with the decoder directions and the unembedding the activations stage writes beside it), exemplars
(16 windows per latent, a row group per 256 latents as the stage writes), latent profiles,
explanations of every latent (a pool of 2,000 distinct texts, embedded into LanceDB with MiniLM),
three scorers' tables. Then starts `autointerp view` in its own process and times, over HTTP:

- `list`: a page of 50 latents, random sort column / order / page, half of them also filtered;
- `search`: a semantic search over the explanations (query embedded by the server);
- `latent`: a random latent's page (windows, density, logit lens, neighbours, scores).

First answers are reported apart, for a cold start (the first start after a materialization: what the
stages write is there, the browser's own caches are not, `viewer/` deleted; the first server runs until its
background has built every cache, `caches_built_after_start_s`) and after a restart (caches on disk), each
asked right after the server answers `/healthz`: the list, a latent page,
a search (word matches while the embedder loads in the background: `search_first_kind`), and how long
after the start search turns semantic and the logit lens is ready. Then the server's resident memory
(RSS, and USS without shared and file-backed pages) after the run. Last line: JSON.

    .venv/bin/python bench/viewer.py [--width 100000] [--shards 8] [--requests 200] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CODER = "bench-topk/model.layers.15"
D_MODEL = 576
WINDOW = 32
SCORERS = {"detection": "balanced_accuracy", "fuzzing": "balanced_accuracy", "embedding": "roc_auc"}
WORDS = (
    "file",
    "close",
    "open",
    "list",
    "number",
    "string",
    "error",
    "return",
    "module",
    "class",
    "python",
    "loop",
    "value",
    "path",
    "print",
    "import",
    "the",
    "of",
    "and",
    "function",
    "argument",
    "default",
    "time",
    "date",
    "thread",
    "socket",
    "byte",
    "unicode",
)


def build(
    root: Path, width: int, acts_per_latent: int, latents_per_shard: int, seed: int = 0
) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.numpy import save_file

    from assets.exemplars import EXEMPLAR_BATCH_LATENTS
    from resources.embedder import EmbedderResource
    from resources.sparse_coders import SparseCoder, coder_fingerprint, save_sparsify
    from resources.subject_model import EMBEDDED, load_causal_lm, load_tokenizer, model_identity
    from resources.unembedding import save_unembedding
    from storage.activations import (
        LATENT_STATS_FILE,
        save_decoder_directions,
        save_latent_stats,
        shard_count,
        shard_keys,
        shard_latent_range,
        write_cache_meta,
    )
    from storage.layout import DataRoot
    from storage.vector_store import sync_explanations

    rng = np.random.default_rng(seed)
    data = DataRoot.at(root)
    n_shards = shard_count(width, latents_per_shard)
    # corpus: the embedded tokenizer's vocabulary, random tokens
    tokenizer = load_tokenizer()
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    n_seq, ctx = 4096, 128
    tokens = rng.integers(0, len(vocab), size=(n_seq, ctx)).astype(np.int32)
    data.corpus_dir.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens}, str(data.corpus_dir / "tokens.safetensors"))
    (data.corpus_dir / "vocab.json").write_text(json.dumps(vocab))
    (data.corpus_dir / "meta.json").write_text(
        json.dumps(
            {
                "hash": "bench",
                "source": "synthetic",
                "ctx_len": ctx,
                "n_sequences": n_seq,
                "n_tokens": int(tokens.size),
                "special_ids": [int(i) for i in tokenizer.all_special_ids],
            }
        )
    )
    # the coder: random unit decoder rows
    decoder = torch.nn.functional.normalize(torch.randn(width, D_MODEL), dim=1)
    coder = SparseCoder(
        "bench-topk",
        "model.layers.15",
        "topk",
        d_in=D_MODEL,
        width=width,
        encoder_weight=decoder.clone(),
        encoder_bias=torch.zeros(width),
        decoder_weight=decoder,
        decoder_bias=torch.zeros(D_MODEL),
        k=32,
    )
    save_sparsify(coder, data.registry_dir / CODER)
    data.activations_dir(CODER).mkdir(parents=True, exist_ok=True)
    save_decoder_directions(
        data.activations_dir(CODER), coder.decoder_directions().numpy()
    )  # as the activations stage does
    del decoder, coder
    save_unembedding(
        load_causal_lm(), data.unembedding_path(model_identity(EMBEDDED))
    )  # as the activations stage does, while it has the model loaded
    # activation cache: `acts_per_latent` pairs per latent
    acts_dir = data.activations_dir(CODER)
    n_tokens = int(tokens.size)
    count = np.full(width, acts_per_latent, np.int64)
    total, maximum = np.zeros(width), np.zeros(width, np.float32)
    for i, shard in enumerate(shard_keys(n_shards)):
        lo, hi = shard_latent_range(width, latents_per_shard, i)
        latents = np.repeat(np.arange(lo, hi), acts_per_latent)
        values = rng.gamma(2.0, 2.0, len(latents)).astype(np.float32) + 0.01
        cells = rng.integers(0, n_tokens, len(latents))
        locations = np.stack([cells // ctx, cells % ctx, latents], 1).astype(np.int32)
        (acts_dir / f"shard-{shard}").mkdir(parents=True, exist_ok=True)
        save_file(
            {"locations": locations, "activations": values},
            str(acts_dir / f"shard-{shard}" / "chunk-00000.safetensors"),
        )
        np.add.at(total, latents, values)
        np.maximum.at(maximum, latents, values)
    save_latent_stats(acts_dir / LATENT_STATS_FILE, count, maximum, total, n_tokens)
    write_cache_meta(
        acts_dir,
        {
            "coder": CODER,
            "hookpoint": "model.layers.15",
            "format": "sparsify",
            "activation": "topk",
            "width": width,
            "latents_per_shard": latents_per_shard,
            "n_shards": n_shards,
            "corpus_hash": "bench",
            "tokens": n_tokens,
            "live_latents": width,
            "coder_fingerprint": coder_fingerprint(data.registry_dir, CODER),
            "decoder_directions": True,
            "dead_fraction": 0.0,
            "mean_l0": float(count.sum()) / n_tokens,
            "fvu": 0.2,
        },
    )
    # explanations: a pool of distinct texts, embedded once
    pool = [
        f"the word '{rng.choice(WORDS)}' after '{rng.choice(WORDS)}' "
        f"in {rng.choice(WORDS)} {rng.choice(WORDS)} contexts"
        for _ in range(2000)
    ]
    embedder = EmbedderResource()
    pool_vectors, row_of = embedder.embed(pool), {text: j for j, text in enumerate(pool)}
    pick = rng.integers(0, len(pool), width)
    windows_per_latent, layout = (
        16,
        [("train", "activating", 0)] * 6
        + [("test", "activating", q) for q in (1, 2, 3, 4, 5)]
        + [("valid", "activating", 0)] * 2
        + [("test", "random", -1), ("test", "neighbour", -1), ("test", "embedding", -1)],
    )
    for i, shard in enumerate(shard_keys(n_shards)):
        lo, hi = shard_latent_range(width, latents_per_shard, i)
        n_lat = hi - lo
        n_rows = n_lat * windows_per_latent
        kinds = layout * n_lat
        acts = np.where(
            rng.random((n_rows, WINDOW)) < 0.1, rng.gamma(2.0, 2.0, (n_rows, WINDOW)), 0
        ).astype(np.float32)
        silent = np.array([k != "activating" for _, k, _ in kinds])
        acts[silent] = 0
        offsets = pa.array(np.arange(0, (n_rows + 1) * WINDOW, WINDOW, dtype=np.int32))
        table = pa.table(
            {
                "latent": np.repeat(np.arange(lo, hi), windows_per_latent).astype(np.int64),
                "split": [s for s, _, _ in kinds],
                "kind": [k for _, k, _ in kinds],
                "quantile": np.array([q for _, _, q in kinds], np.int64),
                "sequence": rng.integers(0, n_seq, n_rows),
                "start": rng.integers(0, ctx // WINDOW, n_rows) * WINDOW,
                "max_activation": acts.max(1).astype(np.float64),
                "tokens": pa.ListArray.from_arrays(
                    offsets, pa.array(rng.integers(0, len(vocab), n_rows * WINDOW).astype(np.int32))
                ),
                "activations": pa.ListArray.from_arrays(offsets, pa.array(acts.ravel())),
            }
        )
        data.exemplars_path(CODER, shard).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            table,
            data.exemplars_path(CODER, shard),
            row_group_size=EXEMPLAR_BATCH_LATENTS * windows_per_latent,
        )  # a row group per batch, as the stage writes
        ids = np.arange(lo, hi)
        pd.DataFrame(
            {
                "latent": ids,
                "frequency": count[ids] / n_tokens,
                "max_activation": maximum[ids],
                "mean_activation": total[ids] / count[ids],
                "activating_windows": 40,
                "quantile_boundaries": [np.sort(rng.random(6) * m).tolist() for m in maximum[ids]],
                "top_tokens": [rng.integers(0, len(vocab), 10).tolist() for _ in ids],
                "top_token_mean_activation": [np.sort(rng.random(10))[::-1].tolist() for _ in ids],
                "neighbours": [rng.integers(0, width, 10).tolist() for _ in ids],
            }
        ).to_parquet(data.latent_profiles_path(CODER, shard), index=False)
        texts = [pool[j] for j in pick[ids]]
        data.explanations_path(CODER, shard).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(
            {
                "latent": ids,
                "explainer": "highlighted",
                "explanation": texts,
                "status": "ok",
                "error": "",
                "prompt_tokens": 900,
                "completion_tokens": 20,
                "model": "bench",
                "candidates": [[t] for t in texts],
                "candidate_scores": [[float("nan")] for _ in ids],
                "examples_dropped": 0,
                "exemplars_fingerprint": "bench",
            }
        ).to_parquet(data.explanations_path(CODER, shard), index=False)
        for name, main in SCORERS.items():
            score, control = rng.random(n_lat), rng.random(n_lat)
            frame = pd.DataFrame(
                {
                    "latent": ids,
                    "explanation": texts,
                    "control_explanation": [pool[j] for j in pick[(ids + 1) % width]],
                    "control_note": "",
                    main: score,
                    f"control_{main}": control,
                    "gap": score - control,
                    "n_failed": 0,
                    "n_dropped": 0,
                    "failures": "[]",
                    "prompt_tokens": 0,
                }
            )
            data.scores_path(CODER, shard, name).parent.mkdir(parents=True, exist_ok=True)
            frame.to_parquet(data.scores_path(CODER, shard, name), index=False)
        sync_explanations(
            data.lancedb_dir,
            embedder.model,
            CODER,
            shard,
            dict(zip(ids.tolist(), texts, strict=False)),
            lambda some: pool_vectors[[row_of[t] for t in some]],
        )
        print(f"built shard {shard}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(base: str, path: str) -> float:
    return get(base, path)[0]


def get(base: str, path: str) -> tuple[float, dict]:
    """(milliseconds, JSON answer) of one request."""
    started = time.perf_counter()
    with urllib.request.urlopen(base + path, timeout=600) as response:
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {body[:200]}")
    return (time.perf_counter() - started) * 1000, json.loads(body) if body.startswith(b"{") else {}


def first_answers(server, coder: str, latent: int) -> dict:
    """The first list, latent page and search of a fresh server, then the seconds from its start until
    search is semantic and the logit lens is ready (polled)."""
    list_ms, _ = get(server.base, f"/api/latents?coder={coder}")
    latent_ms, page = get(server.base, f"/api/latent?coder={coder}&latent={latent}")
    search_ms, found = get(server.base, f"/api/search?coder={coder}&q=closing%20a%20file")
    out = {
        "list_ms": round(list_ms),
        "latent_ms": round(latent_ms),
        "search_ms": round(search_ms),
        "search_first_kind": "words" if found.get("note") else "semantic",
        "logit_lens_first": "pending" if "pending" in page["logit_lens"] else "shown",
    }
    while get(server.base, f"/api/search?coder={coder}&q=file")[1].get("note"):
        time.sleep(0.5)
    out["search_semantic_after_start_s"] = round(time.perf_counter() - server.started, 1)
    while "pending" in (
        lens := get(server.base, f"/api/logit_lens?coder={coder}&latent={latent}")[1]
    ):
        if "could not" in lens["pending"]:
            raise RuntimeError(lens["pending"])
        time.sleep(0.5)
    out["logit_lens_after_start_s"] = round(time.perf_counter() - server.started, 1)
    return out


class Server:
    """`autointerp view` on the data root, in its own process."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.started = time.perf_counter()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "autointerp_defs.cli",
                "--data",
                str(root),
                "view",
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def __enter__(self):
        for _ in range(600):
            try:
                fetch(self.base, "/healthz")
                self.listening_s = round(time.perf_counter() - self.started, 1)
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the viewer did not start")

    def memory(self):
        import psutil

        return psutil.Process(self.process.pid).memory_full_info()

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=30)


def main() -> None:
    from storage.layout import DataRoot

    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=100_000)
    parser.add_argument("--acts", type=int, default=20, help="cached activations per latent")
    parser.add_argument("--requests", type=int, default=200, help="timed requests of each kind")
    parser.add_argument(
        "--shards",
        type=int,
        default=8,
        help="shards of the coder (latents_per_shard = ceil(width / shards))",
    )
    parser.add_argument(
        "--data", help="data root to build into (default: a temporary folder); reused if built"
    )
    args = parser.parse_args()
    root = Path(args.data or tempfile.mkdtemp(prefix="viewer-bench-"))
    started = time.perf_counter()
    if not (root / "activations" / CODER / "meta.json").exists():
        build(root, args.width, args.acts, -(-args.width // args.shards))
    build_s = time.perf_counter() - started
    # cold means cold: the viewer's indexes are built again
    shutil.rmtree(DataRoot.at(root).viewer_dir(), ignore_errors=True)

    coder = quote(CODER, safe="")
    width = args.width
    n_shards = json.loads((root / "activations" / CODER / "meta.json").read_text())["n_shards"]
    per_shard = -(-width // n_shards)
    rng = np.random.default_rng(1)
    with (
        Server(root) as server
    ):  # first start: every cached index is built, in the background or by the first request that needs it
        cold = first_answers(server, coder, 0)
        cold["listening_s"] = server.listening_s
        cold["latent_other_shards_ms"] = [
            round(
                fetch(
                    server.base,
                    f"/api/latent?coder={coder}&latent={min(s * per_shard + 1, width - 1)}",
                )
            )
            for s in range(1, min(n_shards, 8))
        ]
        # the warm-up's last step, the search vectors' stamp: every cache is built
        vectors = DataRoot.at(root).viewer_vectors_path(CODER)
        while not DataRoot.viewer_stamp_path(vectors).exists():
            time.sleep(0.5)
        cold["caches_built_after_start_s"] = round(time.perf_counter() - server.started, 1)
        cold_memory = server.memory()
    with (
        Server(root) as server
    ):  # a restart, as a user would run it: indexes on disk, opened (memory-mapped) in the background
        first = first_answers(server, coder, 1)
        first["listening_s"] = server.listening_s
        columns = [
            "latent",
            "frequency",
            "max_activation",
            "mean_activation",
            "detection",
            "fuzzing_gap",
            "embedding_control",
            "mean_gap",
        ]
        queries = [
            f"{a} {b}"
            for a, b in zip(
                rng.choice(WORDS, args.requests), rng.choice(WORDS, args.requests), strict=False
            )
        ]
        timed = {"list": [], "search": [], "latent": []}
        for i in range(args.requests):
            filt = "&min_detection=0.5&status=ok" if i % 2 else ""
            timed["list"].append(
                fetch(
                    server.base,
                    f"/api/latents?coder={coder}&sort={rng.choice(columns)}"
                    f"&order={rng.choice(['asc', 'desc'])}&page={rng.integers(1, 100)}{filt}",
                )
            )
            timed["search"].append(
                fetch(server.base, f"/api/search?coder={coder}&q={quote(queries[i])}")
            )
            timed["latent"].append(
                fetch(server.base, f"/api/latent?coder={coder}&latent={rng.integers(0, width)}")
            )
        memory = server.memory()
    result = {
        "latents": args.width,
        "requests_each": args.requests,
        "build_tables_s": round(build_s, 1),
        "cold_start": cold,
        "restart": first,
    }
    for kind, times in timed.items():
        result[f"{kind}_p50_ms"] = round(float(np.percentile(times, 50)), 1)
        result[f"{kind}_p95_ms"] = round(float(np.percentile(times, 95)), 1)
    result["server_rss_mb"] = round(memory.rss / 2**20)
    result["server_uss_mb"] = round(memory.uss / 2**20)
    result["server_rss_mb_first_start"] = round(
        cold_memory.rss / 2**20
    )  # includes building the indexes (the subject model loaded once)
    result["target_p95_ms"] = 300
    result["all_p95_under_target"] = all(result[f"{k}_p95_ms"] < 300 for k in timed)
    result["first_answers_under_2s"] = {
        when: all(answers[f"{k}_ms"] < 2000 for k in ("list", "latent", "search"))
        for when, answers in (("cold_start", cold), ("restart", first))
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
