"""Per-coder indexes of the latent browser, built lazily and cached on disk under `<root>/viewer/<coder>/`.

A coder of 100,000 latents must answer a list, a search or a latent page in well under a second, so
nothing is read whole per request:

- `latents.parquet`: one row per latent (frequency, activation, explanation status, each scorer's
  metric, control and gap), rebuilt when any table it comes from changes (sizes and mtimes), then
  held in memory; sorting and filtering 100k rows in pandas takes milliseconds.
- `<shard>.exemplars.arrow`: the shard's exemplars in Arrow's file format, sorted by latent, memory-
  mapped; with per-latent row offsets a latent's windows are a zero-copy slice, not a parquet scan.
- `<shard>.density.npz`: per latent a histogram of its cached activations (one pass over the shard).
- `decoder.npy`: unit-norm decoder rows, memory-mapped, for cosine neighbours and the logit lens;
  `viewer/lens-<model>.safetensors`: the subject model's unembedding and final norm scale, so the
  server need not keep the whole model in memory.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from autointerp_defs.readside import reader
from resources.embedder import EMBEDDED
from storage.atomic import atomic_path
from storage.store import StoredTable, TableStore

DENSITY_BINS = 24
NEIGHBOUR_BLOCK = 256  # latents per similarity product: 256 x width floats at a time
STAMP_CHECK_S = 1.0


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


class CoderIndex:
    """The cached views of one coder; thread-safe (the server answers requests on threads)."""

    def __init__(self, store: TableStore, coder: str, subject_model: tuple[str | None, str | None] = (None, None), embedder: str = EMBEDDED):
        self.store, self.coder, self.embedder = store, coder, embedder
        """`embedder`: the model whose explanations table search reads (the deployment's `[embedder] model`)."""
        self.subject_model = subject_model
        """(model, gguf_file) whose unembedding the logit lens reads: the deployment's `[subject_model]` (None: the embedded model)."""
        self.meta = reader.activations_meta(store, coder)
        self.shards = reader.shard_keys_of(self.meta)
        self.dir = store.layout.viewer_dir(coder)
        self.scorers: list[str] = []
        self._lock = threading.RLock()
        self._latents: pd.DataFrame | None = None
        self._stamp, self._checked = None, 0.0
        self._tables: dict[str, tuple] = {}
        self._density: dict[str, tuple] = {}
        self._decoder = None

    # ---- the latent table ---------------------------------------------------------------------

    def latents(self) -> pd.DataFrame:
        """The per-latent table, rebuilt if a source table changed since it was cached, or which scorers' main
        metrics this process knows (a plugin's is known only where its deployment is loaded)."""
        now = time.monotonic()
        if self._latents is not None and now - self._checked < STAMP_CHECK_S:
            return self._latents
        with self._lock:
            scorers = reader.scorer_names(self.store, self.coder)
            current = reader.stamp(reader.input_files(self.store, self.coder, self.shards)) + "|" + ",".join(f"{n}:{reader.scorer_info(n)['main_metric']}" for n in scorers)
            self._checked = time.monotonic()
            if self._latents is not None and current == self._stamp:
                return self._latents
            path, stamp_path = self.dir / "latents.parquet", self.dir / "latents.stamp.json"
            if path.exists() and _read_json(stamp_path).get("stamp") == current:
                table = pd.read_parquet(path)
            else:
                table = self._build_latents()
                with atomic_path(path) as tmp:
                    table.to_parquet(tmp, index=False)
                _write_json(stamp_path, {"stamp": current})
            self.scorers = [c for c in scorers if c in table.columns]
            self._latents, self._stamp = table, current
            return table

    def _build_latents(self) -> pd.DataFrame:
        counts = reader.latent_counts(self.store, self.coder)
        width, tokens = int(self.meta["width"]), max(int(counts["tokens"][0]), 1)
        count = counts["count"].astype(np.int64)
        table = pd.DataFrame({
            "latent": np.arange(width, dtype=np.int64),
            "shard": np.asarray(self.shards)[self._shard_index(np.arange(width))],
            "frequency": count / tokens,
            "max_activation": counts["max"].astype(np.float64),
            "mean_activation": np.where(count > 0, counts["sum"] / np.maximum(count, 1), 0.0),
            "status": "none",
            "explanation": "",
        })
        explained = reader.explanations(self.store, self.coder, self.shards)
        if len(explained):
            last = explained.drop_duplicates("latent", keep="last")
            at = last["latent"].to_numpy(np.int64)
            table.loc[at, "status"] = last["status"].to_numpy()
            table.loc[at, "explanation"] = last["explanation"].fillna("").to_numpy()
        gaps = []
        for name in reader.scorer_names(self.store, self.coder):
            main = reader.scorer_info(name)["main_metric"]
            scored = reader.scores(self.store, self.coder, name, self.shards)
            for column in (name, f"{name}_control", f"{name}_gap"):
                table[column] = np.nan
            if len(scored):
                scored = scored[~reader.stale(scored, explained)]  # scores of an earlier explanation are not this latent's (its page marks them)
                at = scored["latent"].to_numpy(np.int64)
                if main is not None:
                    table.loc[at, name] = scored[main].to_numpy(np.float64)
                    table.loc[at, f"{name}_control"] = scored[f"control_{main}"].to_numpy(np.float64)
                table.loc[at, f"{name}_gap"] = scored["gap"].to_numpy(np.float64)
            gaps.append(f"{name}_gap")
        table["mean_gap"] = table[gaps].mean(axis=1) if gaps else np.nan
        return table

    def _shard_index(self, latents: np.ndarray) -> np.ndarray:
        return reader.shard_index_of(self.meta, latents)

    def shard_of(self, latent: int) -> str:
        return self.shards[int(self._shard_index(np.array([latent]))[0])]

    # ---- per-latent rows of the shard tables -------------------------------------------------

    def windows(self, latent: int) -> list[dict]:
        """The latent's exemplar windows, in the order the exemplars table holds them."""
        shard = self.shard_of(latent)
        return self.rows(f"{shard}.exemplars", self.store.exemplars(self.coder, shard), latent)

    def rows(self, name: str, source: StoredTable, latent: int) -> list[dict]:
        """The rows of `latent` in the table `source` (any table with a `latent` column), read from
        a memory-mapped, latent-sorted Arrow copy cached as `<name>.arrow`."""
        table, latents, starts, ends = self._arrow_cache(name, source)
        i = int(np.searchsorted(latents, latent))
        if i >= len(latents) or latents[i] != latent:
            return []
        return table.slice(int(starts[i]), int(ends[i] - starts[i])).to_pylist()

    def _arrow_cache(self, name: str, source: StoredTable) -> tuple:
        current = reader.stamp([source])
        held = self._tables.get(name)
        if held is not None and held[0] == current:
            return held[1]
        with self._lock:
            arrow, stamp_path, offsets_path = self.dir / f"{name}.arrow", self.dir / f"{name}.stamp.json", self.dir / f"{name}.offsets.npy"
            if not (arrow.exists() and _read_json(stamp_path).get("stamp") == current):
                table = pq.read_table(source) if source.exists() else pa.table({"latent": pa.array([], pa.int64())})
                order = np.argsort(table["latent"].to_numpy(), kind="stable")  # stable: a latent's rows keep their order
                table = table.take(pa.array(order))
                with atomic_path(arrow) as tmp:
                    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                        writer.write_table(table, max_chunksize=1 << 16)
                column = table["latent"].to_numpy()
                latents, starts = np.unique(column, return_index=True)
                ends = np.append(starts[1:], len(column))[: len(starts)].astype(np.int64)  # an empty table has no ends
                with atomic_path(offsets_path) as tmp:
                    with open(tmp, "wb") as handle:
                        np.save(handle, np.stack([latents, starts, ends]).astype(np.int64))
                _write_json(stamp_path, {"stamp": current})
            table = pa.ipc.open_file(pa.memory_map(str(arrow), "r")).read_all()
            latents, starts, ends = np.load(offsets_path)
            self._tables[name] = (current, (table, latents, starts, ends))
            return self._tables[name][1]

    # ---- semantic search ----------------------------------------------------------------------

    def search(self, query_vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
        """(latent, distance) of the explanations nearest to `query_vector`: exact search over this coder's
        vectors of the LanceDB explanations table, copied once per table version into a memory-mapped
        matrix (LanceDB's own flat search with a coder filter takes ~200 ms at 100k rows on 2 cores).
        Distance is squared L2 of unit vectors, as LanceDB reports it."""
        latents, vectors = self._vectors()
        if not len(latents):
            return []
        sims = vectors @ query_vector.astype(np.float32)
        limit = min(limit, len(sims))
        top = np.argpartition(-sims, limit - 1)[:limit]
        top = top[np.argsort(-sims[top])]
        return [(int(latents[i]), float(2 - 2 * sims[i])) for i in top]

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        version = f"{self.embedder}@{reader.explanations_table_version(self.store, self.embedder)}"
        held = self._tables.get("vectors")
        if held is not None and held[0] == version:
            return held[1]
        with self._lock:
            path, stamp_path = self.dir / "explanation_vectors.npy", self.dir / "explanation_vectors.stamp.json"
            ids_path = self.dir / "explanation_vectors.latents.npy"
            if not (path.exists() and _read_json(stamp_path).get("version") == version):
                _, latents, vectors = reader.explanation_vectors(self.store, self.coder, self.embedder)
                for target, array in ((path, vectors), (ids_path, latents)):
                    with atomic_path(target) as tmp:
                        with open(tmp, "wb") as handle:
                            np.save(handle, array)
                _write_json(stamp_path, {"version": version})
            self._tables["vectors"] = (version, (np.load(ids_path), np.load(path, mmap_mode="r")))
            return self._tables["vectors"][1]

    # ---- activation density -------------------------------------------------------------------

    def density(self, latent: int) -> dict:
        """Histogram of the latent's non-zero activations over the cached corpus."""
        shard = self.shard_of(latent)
        latents, counts, tops = self._density_cache(shard)
        i = int(np.searchsorted(latents, latent))
        if i >= len(latents) or latents[i] != latent:
            return {"edges": [], "counts": []}
        return {"edges": np.linspace(0, float(tops[i]), DENSITY_BINS + 1).round(4).tolist(), "counts": counts[i].tolist()}

    def _density_cache(self, shard: str) -> tuple:
        source = self.store.layout.latent_stats_path(self.coder)
        current = reader.stamp([source])
        held = self._density.get(shard)
        if held is not None and held[0] == current:
            return held[1]
        with self._lock:
            path, stamp_path = self.dir / f"{shard}.density.npz", self.dir / f"{shard}.density.stamp.json"
            if not (path.exists() and _read_json(stamp_path).get("stamp") == current):
                acts = reader.shard_activations(self.store, self.coder, shard)
                ids, counts, tops = [], [], []
                for latent, _, values in acts.by_latent():
                    top = float(values.max())
                    hist, _ = np.histogram(values, bins=DENSITY_BINS, range=(0.0, top if top > 0 else 1.0))
                    ids.append(latent), counts.append(hist), tops.append(top)
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as handle:
                        np.savez(handle, latents=np.array(ids, np.int64), counts=np.array(counts, np.int64).reshape(-1, DENSITY_BINS), tops=np.array(tops))
                _write_json(stamp_path, {"stamp": current})
            data = np.load(path)
            self._density[shard] = (current, (data["latents"], data["counts"], data["tops"]))
            return self._density[shard][1]

    # ---- decoder: neighbours and logit lens ---------------------------------------------------

    def decoder(self) -> np.ndarray | None:
        """Unit-norm decoder rows `[width, d]` (memory-mapped), or None when the coder has no decoder; read
        again when the coder's registry files change (a coder registered anew under the same name)."""
        current = reader.stamp(reader.registry_files(self.store, self.coder))
        held = self._decoder
        if held is None or held[0] != current:
            with self._lock:
                path, stamp_path = self.dir / "decoder.npy", self.dir / "decoder.stamp.json"
                cached = _read_json(stamp_path)
                if cached.get("stamp") != current:
                    rows = reader.decoder_rows(self.store, self.coder)
                    if rows is not None:
                        rows = rows.detach().float().numpy()
                        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
                        with atomic_path(path) as tmp:
                            with open(tmp, "wb") as handle:
                                np.save(handle, rows.astype(np.float32))
                    cached = {"stamp": current, "has_decoder": rows is not None}
                    _write_json(stamp_path, cached)
                self._decoder = held = (current, np.load(path, mmap_mode="r") if cached["has_decoder"] else None)
        return held[1]

    def neighbours(self, latent: int, n: int = 10) -> list[dict] | None:
        """The `n` latents whose decoder directions are most cosine-similar to this one's."""
        found = self.neighbours_of([latent], n)
        return None if found is None else found[0]

    def neighbours_of(self, latents: list[int], n: int = 10) -> list[list[dict]] | None:
        """`neighbours` of many latents, a block of latents per matrix product (an export asks for every latent)."""
        rows = self.decoder()
        if rows is None:
            return None
        n = min(n, len(rows) - 1)  # a coder of width <= n has fewer other latents
        if n < 1:
            return [[] for _ in latents]
        out = []
        for start in range(0, len(latents), NEIGHBOUR_BLOCK):
            block = np.asarray(latents[start : start + NEIGHBOUR_BLOCK], np.int64)
            sims = np.asarray(rows[block]) @ np.asarray(rows).T
            sims[np.arange(len(block)), block] = -np.inf
            top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
            for i, row in enumerate(top):
                row = row[np.argsort(-sims[i, row])]
                out.append([{"latent": int(j), "cosine": round(float(sims[i, j]), 4)} for j in row])
        return out

    def vocab_projection(self, latents: list[int], k: int = 10):
        """The logit lens of `latents` (`resources.logit_lens.VocabProjection`: top and bottom k token ids and
        logits of each decoder direction), or None when the coder has no decoder."""
        import torch

        from resources.logit_lens import vocab_projection

        rows = self.decoder()
        if rows is None:
            return None
        return vocab_projection(torch.from_numpy(np.array(rows[np.asarray(latents, np.int64)])), lens_model(self.store, *self.subject_model), k)

    def logit_lens(self, latent: int, k: int = 10) -> dict | None:
        """The tokens this latent's decoder direction promotes and suppresses (logit lens)."""
        projection = self.vocab_projection([latent], k)
        if projection is None:
            return None
        vocab = reader.display_vocab_cached(self.store)
        as_list = lambda ids, values: [{"token": vocab[int(i)] if int(i) < len(vocab) else f"<{int(i)}>", "logit": round(float(v), 3)} for i, v in zip(ids, values)]
        return {"promoted": as_list(projection.top_ids[0], projection.top_values[0]), "suppressed": as_list(projection.bottom_ids[0], projection.bottom_values[0])}


_LENS: dict[Path, object] = {}
_LENS_LOCK = threading.Lock()


def lens_model(store: TableStore, model: str | None = None, gguf_file: str | None = None):
    """A module with just the subject model's unembedding and final norm scale, what `vocab_projection`
    reads; cached once under `viewer/` so that the server loads the full model once, ever. `model` and
    `gguf_file` are the deployment's `[subject_model]` ones (None: the embedded model)."""
    from safetensors.torch import load_file, save_file

    from resources.subject_model import EMBEDDED

    model = model or EMBEDDED
    name = f"{model}--{gguf_file}" if gguf_file else model
    path = store.layout.viewer_dir() / f"lens-{name.replace('/', '--')}.safetensors"
    with _LENS_LOCK:
        if path in _LENS:
            return _LENS[path]
        if not path.exists():
            from resources.logit_lens import final_norm_scale
            from resources.engines import close_engines
            from resources.subject_model import load_causal_lm

            lm = load_causal_lm(model, gguf_file)
            tensors = {"unembedding": lm.get_output_embeddings().weight.detach().float().contiguous()}
            scale = final_norm_scale(lm)
            if scale is not None:
                tensors["norm_scale"] = scale.contiguous()
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp))
            del lm
            close_engines("subject_model")  # the server keeps the unembedding only
        tensors = load_file(str(path))
        _LENS[path] = _Unembedding(tensors["unembedding"], tensors.get("norm_scale"))
        return _LENS[path]


class _Unembedding:
    """Quacks like a causal LM as far as `vocab_projection` looks: `get_output_embeddings()` and `model.norm`."""

    def __init__(self, unembedding, norm_scale):
        import torch

        self._head = torch.nn.Linear(unembedding.shape[1], unembedding.shape[0], bias=False)
        self._head.weight = torch.nn.Parameter(unembedding, requires_grad=False)
        self.model = torch.nn.Module()
        if norm_scale is not None:
            self.model.norm = torch.nn.Module()
            self.model.norm.weight = torch.nn.Parameter(norm_scale, requires_grad=False)

    def get_output_embeddings(self):
        return self._head
