"""LanceDB tables: embedded corpus windows (hard negatives) and explanations (semantic search).

- `contexts_<corpus hash>_<window>_<embedder>`: one row per fixed window of the corpus (`block` =
  sequence · windows-per-sequence + window index), with its text and embedding. Built once per corpus,
  window length, embedder and window rendering (hashed into `<embedder>`) under a file lock, so partitions materialized at once never race to build
  it; an ANN index is added once the table has `ANN_MIN_ROWS` rows. A `.npy` copy of the vectors
  beside it serves exact look-ups by block id.
- `explanations`: one row per (coder, latent), written by merge on `id`, so re-materializing never
  duplicates rows and concurrent writers are retried instead of corrupting the table.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from storage.atomic import atomic_path, exclusive_lock

EXPLANATIONS_TABLE = "explanations"
ANN_MIN_ROWS = 50_000
ANN_NPROBES = 32
ANN_REFINE_FACTOR = 10


def _connect(db_dir: Path):
    import lancedb

    db_dir.mkdir(parents=True, exist_ok=True)
    return lancedb.connect(str(db_dir))


@contextmanager
def table_lock(db_dir: Path, name: str):
    """An exclusive lock across processes for writing table `name` (waits for the holder)."""
    with exclusive_lock(db_dir / f".{name}.lock", f"writing the vector table {name}", wait=True):
        yield


def _vectors(vectors: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), vectors.shape[1])


# ---- contexts -----------------------------------------------------------------------------------

def contexts_table_name(corpus_hash: str, window: int, embedding: str) -> str:
    """`embedding` names what the vectors are of (the embedder and how a window is rendered to text):
    another embedder or rendering is another table, never vectors of the wrong kind."""
    return f"contexts_{corpus_hash}_{window}_{hashlib.sha256(embedding.encode()).hexdigest()[:8]}"


class CorpusWindows:
    """The vector of a corpus grid window already in a contexts table, for whoever would embed the same
    window's text again. Only a window whose tokens are the corpus's at that place is looked up."""

    def __init__(self, db_dir: Path, corpus_hash: str, tokens: np.ndarray, embedding: str):
        self.db_dir, self.corpus_hash, self.tokens, self.embedding = db_dir, corpus_hash, tokens, embedding
        self._tables: dict[int, np.ndarray | None] = {}

    def vector(self, sequence: int, start: int, token_ids) -> np.ndarray | None:
        window = len(token_ids)
        if sequence < 0 or window == 0 or start % window or sequence >= len(self.tokens) or start + window > self.tokens.shape[1]:
            return None
        if window not in self._tables:  # memory-mapped; None when that window length was never embedded
            path = self.db_dir / f"{contexts_table_name(self.corpus_hash, window, self.embedding)}.npy"
            self._tables[window] = np.load(path, mmap_mode="r") if path.exists() else None
        vectors, blocks_per_seq = self._tables[window], self.tokens.shape[1] // window
        if vectors is None or len(vectors) != len(self.tokens) * blocks_per_seq or not np.array_equal(self.tokens[sequence, start : start + window], token_ids):
            return None
        return np.asarray(vectors[sequence * blocks_per_seq + start // window], np.float32)


class ContextIndex:
    """Embedded corpus windows: exact vectors by block id, and nearest-neighbour search."""

    def __init__(self, db_dir: Path, name: str):
        self.table = _connect(db_dir).open_table(name)
        self.vectors = np.load(db_dir / f"{name}.npy", mmap_mode="r")
        self.indexed = len(self.vectors) >= ANN_MIN_ROWS

    def nearest(self, query: np.ndarray, limit: int) -> np.ndarray:
        """Block ids of the `limit` windows closest to `query` (cosine), nearest first."""
        search = self.table.search(query.astype(np.float32)).metric("cosine").limit(limit).select(["block", "_distance"])
        if self.indexed:
            search = search.nprobes(ANN_NPROBES).refine_factor(ANN_REFINE_FACTOR)
        return np.asarray(search.to_arrow()["block"].to_numpy())

    def nearest_many(self, queries: np.ndarray, limit: int) -> list[np.ndarray]:
        """`nearest` of each row of `queries` `[n, dim]`, in one search: a flat search scans the table once for all."""
        search = self.table.search(queries.astype(np.float32)).metric("cosine").limit(limit).select(["block", "_distance"])
        if self.indexed:
            search = search.nprobes(ANN_NPROBES).refine_factor(ANN_REFINE_FACTOR)
        found = search.to_arrow()
        which, blocks = found["query_index"].to_numpy(), np.asarray(found["block"].to_numpy())
        order = np.argsort(which, kind="stable")  # keeps each query's answers nearest first
        bounds = np.searchsorted(which[order], np.arange(len(queries) + 1))
        return [blocks[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def ensure_contexts(db_dir: Path, name: str, build: Callable[[], tuple[list[str], np.ndarray]]) -> ContextIndex:
    """Open the contexts table `name`, building it first (once, under a lock) if it is missing."""
    marker = db_dir / f"{name}.npy"
    if not marker.exists():
        with table_lock(db_dir, name):
            if not marker.exists():
                texts, vectors = build()
                data = pa.table({"block": pa.array(np.arange(len(texts)), pa.int64()), "text": texts, "vector": _vectors(vectors)})
                table = _connect(db_dir).create_table(name, data=data, mode="overwrite")
                if len(texts) >= ANN_MIN_ROWS:
                    build_ann_index(table, len(texts))
                with atomic_path(marker) as tmp:
                    with open(tmp, "wb") as handle:
                        np.save(handle, vectors.astype(np.float32))
    return ContextIndex(db_dir, name)


def build_ann_index(table, n_rows: int) -> None:
    """IVF partitions of ~4k rows with HNSW and scalar quantization inside: high recall at low cost."""
    table.create_index(metric="cosine", vector_column_name="vector", index_type="IVF_HNSW_SQ", num_partitions=max(1, n_rows // 4096))


# ---- explanations -------------------------------------------------------------------------------

def upsert_explanations(db_dir: Path, coder: str, latents: list[int], explanations: list[str], vectors: np.ndarray, attempts: int = 8) -> None:
    """Insert or replace one row per (coder, latent); re-running never duplicates rows."""
    if not latents:
        return
    data = pa.table(
        {
            "id": [f"{coder}#{latent}" for latent in latents],
            "coder": [coder] * len(latents),
            "latent": pa.array(latents, pa.int64()),
            "explanation": explanations,
            "vector": _vectors(vectors),
        }
    )
    with table_lock(db_dir, EXPLANATIONS_TABLE):
        table = _connect(db_dir).create_table(EXPLANATIONS_TABLE, schema=data.schema, exist_ok=True)
    for attempt in range(attempts):
        try:
            table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)
            return
        except Exception as error:  # a concurrent commit won the race: retry on the new version
            if "conflict" not in str(error).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)


def search_explanations(db_dir: Path, query_vector: np.ndarray, limit: int = 10) -> list[dict]:
    """The stored explanations nearest to `query_vector`; none when nothing was explained yet (no table).
    Any other failure (a damaged table, a query of another embedder's size) is raised, never read as no hits."""
    if not (db_dir / f"{EXPLANATIONS_TABLE}.lance").exists():
        return []
    table = _connect(db_dir).open_table(EXPLANATIONS_TABLE)
    size = table.schema.field("vector").type.list_size
    if len(query_vector) != size:
        raise ValueError(f"The query vector has {len(query_vector)} dimensions but the explanations table under {db_dir} holds vectors of {size}. "
                         f"Fix: embed the query with the embedder of the deployment that wrote the table.")
    hits = table.search(query_vector.astype(np.float32)).limit(limit).to_list()
    return [{k: hit[k] for k in ("coder", "latent", "explanation", "_distance")} for hit in hits]
