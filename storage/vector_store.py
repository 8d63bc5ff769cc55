"""LanceDB tables: embedded corpus windows (hard negatives) and explanations (semantic search).

- `contexts_<corpus hash>_<window>_<embedder>`: one row per fixed window of the corpus (`block` =
  sequence · windows-per-sequence + window index), with its text and embedding. Built once per corpus,
  window length, embedder and window rendering (hashed into `<embedder>`) under a lock, so partitions
  materialized at once never race to build it; an ANN index is added once the table has
  `ANN_MIN_ROWS` rows. A `.npy` copy of the vectors beside it serves exact look-ups by block id.
- `tokens_<corpus hash>_<embedder>.npy`: the vector of each distinct token of the corpus embedded alone
  (one row per id of `np.unique(corpus tokens)`, ascending), for the embedding scorer's best-token
  spans. Built beside the contexts table, once per corpus, embedder and rendering, under the same kind
  of lock.
- `explanations_<embedder>`: one row per ok explanation (coder, shard, latent), one table per embedder
  (its name hashed), so vectors of two models never meet in one search. A shard's rows are synced to
  its explanations table after each write of it (`sync_explanations`).

Each table's writers hold its lock (`table_lock`): in the cluster's coordination database when the
deployment has one (every node), else a file beside the table; a writer checks its lease right before it
commits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.atomic import atomic_path
from storage.coordination import Lease, exclusive
from storage.store import TableStore

ANN_MIN_ROWS = 50_000
ANN_NPROBES = 32
ANN_REFINE_FACTOR = 10


def _connect(db_dir: Path):
    import lancedb

    db_dir.mkdir(parents=True, exist_ok=True)
    return lancedb.connect(str(db_dir))


@contextmanager
def table_lock(db_dir: Path, name: str, coordination_url: str = "") -> Iterator[Lease]:
    """An exclusive lock across processes (every node's, with a `coordination_url`) for writing table
    `name`: waits for the holder."""
    with exclusive(
        coordination_url,
        f"vector table {name}",
        db_dir / f".{name}.lock",
        f"writing the vector table {name}",
        wait=True,
    ) as lease:
        yield lease


def _vectors(vectors: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.astype(np.float32).ravel()), vectors.shape[1]
    )


# ---- contexts -----------------------------------------------------------------------------------


def contexts_table_name(corpus_hash: str, window: int, embedding: str) -> str:
    """`embedding` names what the vectors are of (the embedder and how a window is rendered to text):
    another embedder or rendering is another table, never vectors of the wrong kind."""
    return f"contexts_{corpus_hash}_{window}_{hashlib.sha256(embedding.encode()).hexdigest()[:8]}"


class CorpusWindows:
    """The vector of a corpus grid window already in a contexts table, for whoever would embed the same
    window's text again. Only a window whose tokens are the corpus's at that place is looked up."""

    def __init__(self, db_dir: Path, corpus_hash: str, tokens: np.ndarray, embedding: str):
        self.db_dir, self.corpus_hash, self.tokens, self.embedding = (
            db_dir,
            corpus_hash,
            tokens,
            embedding,
        )
        self._tables: dict[int, np.ndarray | None] = {}
        self._token_table: tuple[np.ndarray, np.ndarray | None] | None = None
        """The corpus's distinct token ids and the tokens table's rows for them (None when it was
        never built), read on first use."""

    def token_vectors(self, token_ids) -> np.ndarray | None:
        """The vector of each of `token_ids` embedded alone, from the tokens table; None when that table
        is missing or a token is not in the corpus."""
        if self._token_table is None:
            ids, path = (
                np.unique(self.tokens),
                self.db_dir / f"{tokens_table_name(self.corpus_hash, self.embedding)}.npy",
            )
            vectors = np.load(path, mmap_mode="r") if path.exists() else None
            self._token_table = (
                ids,
                vectors if vectors is not None and len(vectors) == len(ids) else None,
            )
        ids, vectors = self._token_table
        token_ids = np.asarray(token_ids)
        rows = np.minimum(np.searchsorted(ids, token_ids), len(ids) - 1)
        if vectors is None or not np.array_equal(ids[rows], token_ids):
            return None
        return np.asarray(vectors[rows], np.float32)

    def vector(self, sequence: int, start: int, token_ids) -> np.ndarray | None:
        window = len(token_ids)
        if (
            sequence < 0
            or window == 0
            or start % window
            or sequence >= len(self.tokens)
            or start + window > self.tokens.shape[1]
        ):
            return None
        if (
            window not in self._tables
        ):  # memory-mapped; None when that window length was never embedded
            path = (
                self.db_dir / f"{contexts_table_name(self.corpus_hash, window, self.embedding)}.npy"
            )
            self._tables[window] = np.load(path, mmap_mode="r") if path.exists() else None
        vectors, blocks_per_seq = self._tables[window], self.tokens.shape[1] // window
        if (
            vectors is None
            or len(vectors) != len(self.tokens) * blocks_per_seq
            or not np.array_equal(self.tokens[sequence, start : start + window], token_ids)
        ):
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
        search = (
            self.table.search(query.astype(np.float32))
            .metric("cosine")
            .limit(limit)
            .select(["block", "_distance"])
        )
        if self.indexed:
            search = search.nprobes(ANN_NPROBES).refine_factor(ANN_REFINE_FACTOR)
        return np.asarray(search.to_arrow()["block"].to_numpy())

    def nearest_many(self, queries: np.ndarray, limit: int) -> list[np.ndarray]:
        """`nearest` of each row of `queries` `[n, dim]`, in one search: a flat search scans the table once for all."""
        search = (
            self.table.search(queries.astype(np.float32))
            .metric("cosine")
            .limit(limit)
            .select(["block", "_distance"])
        )
        if self.indexed:
            search = search.nprobes(ANN_NPROBES).refine_factor(ANN_REFINE_FACTOR)
        found = search.to_arrow()
        which, blocks = found["query_index"].to_numpy(), np.asarray(found["block"].to_numpy())
        order = np.argsort(which, kind="stable")  # keeps each query's answers nearest first
        bounds = np.searchsorted(which[order], np.arange(len(queries) + 1))
        return [blocks[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:], strict=False)]


def ensure_contexts(
    db_dir: Path,
    name: str,
    build: Callable[[], tuple[list[str], np.ndarray]],
    coordination_url: str = "",
) -> ContextIndex:
    """Open the contexts table `name`, building it first (once, under a lock) if it is missing."""
    marker = db_dir / f"{name}.npy"
    if not marker.exists():
        with table_lock(db_dir, name, coordination_url) as lease:
            if not marker.exists():
                texts, vectors = build()
                data = pa.table(
                    {
                        "block": pa.array(np.arange(len(texts)), pa.int64()),
                        "text": texts,
                        "vector": _vectors(vectors),
                    }
                )
                lease.check()
                table = _connect(db_dir).create_table(name, data=data, mode="overwrite")
                if len(texts) >= ANN_MIN_ROWS:
                    build_ann_index(table, len(texts))
                _save_vectors(marker, vectors, lease.check)
    return ContextIndex(db_dir, name)


def _save_vectors(path: Path, vectors: np.ndarray, before_replace: Callable[[], None]) -> None:
    with atomic_path(path, before_replace) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, vectors.astype(np.float32))


def tokens_table_name(corpus_hash: str, embedding: str) -> str:
    """Named like `contexts_table_name`: another embedder or rendering is another file."""
    return f"tokens_{corpus_hash}_{hashlib.sha256(embedding.encode()).hexdigest()[:8]}"


def ensure_token_vectors(
    db_dir: Path,
    corpus_hash: str,
    tokens: np.ndarray,
    embedding: str,
    embed: Callable[[np.ndarray], np.ndarray],
    coordination_url: str = "",
) -> None:
    """Write the tokens table (`embed` of the corpus's distinct token ids, ascending) once, under a
    lock, if it is missing."""
    name = tokens_table_name(corpus_hash, embedding)
    path = db_dir / f"{name}.npy"
    if not path.exists():
        db_dir.mkdir(parents=True, exist_ok=True)
        with table_lock(db_dir, name, coordination_url) as lease:
            if not path.exists():
                _save_vectors(path, embed(np.unique(tokens)), lease.check)


def build_ann_index(table, n_rows: int) -> None:
    """IVF partitions of ~4k rows with HNSW and scalar quantization inside: high recall at low cost."""
    table.create_index(
        metric="cosine",
        vector_column_name="vector",
        index_type="IVF_HNSW_SQ",
        num_partitions=max(1, n_rows // 4096),
    )


# ---- explanations -------------------------------------------------------------------------------


class EmbeddingMismatchError(ValueError):
    """Vectors of another length than those a table holds: the embedder behind a name changed."""


def explanations_table_name(embedder: str) -> str:
    """The explanations table of vectors made by `embedder` (the embedder resource's `model`): another
    embedder is another table, so a search never compares vectors of two models."""
    return f"explanations_{hashlib.sha256(embedder.encode()).hexdigest()[:8]}"


def open_explanations(db_dir: Path, embedder: str):
    """`embedder`'s explanations table, or None when nothing was explained with it yet."""
    name = explanations_table_name(embedder)
    return _connect(db_dir).open_table(name) if (db_dir / f"{name}.lance").exists() else None


def explanations_table_stamp(db_dir: Path, embedder: str) -> str:
    """What changes whenever `embedder`'s explanations table gets a new version, read from its manifest
    files without importing lancedb (whose import alone takes seconds): the browser checks it per search."""
    versions = db_dir / f"{explanations_table_name(embedder)}.lance" / "_versions"
    names = sorted(p.name for p in versions.glob("*.manifest")) if versions.exists() else []
    return f"{len(names)}:{names[0]}:{names[-1]}" if names else "none"


def sql_quoted(text: str) -> str:
    """`text` as a string literal of a LanceDB filter (SQL: a quote inside is doubled)."""
    return "'" + text.replace("'", "''") + "'"


def _check_dimension(table, name: str, got: int, what: str) -> None:
    held = table.schema.field("vector").type.list_size
    if got != held:
        raise EmbeddingMismatchError(
            f"{what} has {got} dimensions, but the explanations table {name} holds vectors of "
            f"{held}: the embedder it is named after now gives vectors of another length. "
            f"Fix: delete the folder {name}.lance under the lancedb folder and materialize "
            "`explanations` again, so the table holds only this embedder's vectors."
        )


def sync_explanations(
    db_dir: Path,
    embedder: str,
    coder: str,
    shard: str,
    explanations: dict[int, str],
    embed: Callable[[list[str]], np.ndarray],
    coordination_url: str = "",
) -> None:
    """Make the rows of `coder`'s `shard` in `embedder`'s table exactly `explanations` (latent → text: the
    shard's ok explanations as its committed table holds them). Latents no longer there (failed since, or
    left out) are deleted; new or changed texts are embedded and replaced; unchanged rows are kept as they
    are. One writer at a time per table (`table_lock`), so concurrent shards never conflict.

    Callers sync after the explanations table is written: that table is the record. A crash between the
    two leaves this table out of step with it until the next sync of the shard, so `search_explanations`
    shows only what the committed table holds (see there)."""
    name, where = (
        explanations_table_name(embedder),
        f"coder = {sql_quoted(coder)} AND shard = {sql_quoted(shard)}",
    )
    db, held = _connect(db_dir), {}
    if (db_dir / f"{name}.lance").exists():
        table = db.open_table(name)
        rows = (
            table.search()
            .where(where)
            .select(["latent", "explanation"])
            .limit(max(table.count_rows(), 1))
            .to_arrow()
        )
        held = dict(zip(rows["latent"].to_pylist(), rows["explanation"].to_pylist(), strict=False))
    changed = sorted(latent for latent, text in explanations.items() if held.get(latent) != text)
    gone = [latent for latent in held if latent not in explanations]
    if not changed and not gone:
        return
    texts = [explanations[latent] for latent in changed]
    data = (
        pa.table(
            {
                "id": [f"{coder}#{latent}" for latent in changed],
                "coder": [coder] * len(changed),
                "shard": [shard] * len(changed),
                "latent": pa.array(changed, pa.int64()),
                "explanation": texts,
                "vector": _vectors(np.asarray(embed(texts))),
            }
        )
        if changed
        else None
    )
    with table_lock(
        db_dir, name, coordination_url
    ):  # taken after embedding: nothing slow is done under it
        if data is not None:
            table = (
                db.open_table(name)
                if (db_dir / f"{name}.lance").exists()
                else db.create_table(name, schema=data.schema)
            )
            _check_dimension(
                table,
                name,
                data.schema.field("vector").type.list_size,
                f"The embedding of {coder} shard {shard}'s explanations",
            )
            table.merge_insert(
                "id"
            ).when_matched_update_all().when_not_matched_insert_all().execute(data)
        if gone:
            db.open_table(name).delete(
                f"{where} AND latent IN ({', '.join(str(int(latent)) for latent in gone)})"
            )


def search_explanations(
    store: TableStore, embedder: str, query_vector: np.ndarray, limit: int = 10
) -> list[dict]:
    """The `limit` explanations nearest to `query_vector` in `embedder`'s table ([] when nothing was embedded
    with it yet). Only hits that the shard's committed explanations table holds as ok, with the same text,
    are kept: after a crash between that table's write and the sync, a text it no longer holds is never shown."""
    name, table = (
        explanations_table_name(embedder),
        open_explanations(store.layout.lancedb_dir, embedder),
    )
    if table is None:
        return []
    _check_dimension(table, name, len(query_vector), "The query's embedding")
    committed: dict[tuple[str, str], dict[int, str]] = {}

    def holds(hit: dict) -> bool:
        key = (hit["coder"], hit["shard"])
        if key not in committed:
            frame = store.explanations(*key).read_if_present(
                columns=["latent", "explanation", "status"]
            )
            committed[key] = (
                {}
                if frame is None
                else dict(
                    zip(
                        frame["latent"],
                        frame["explanation"].where(frame["status"] == "ok"),
                        strict=False,
                    )
                )
            )
        return committed[key].get(hit["latent"]) == hit["explanation"]

    asked = limit
    while True:
        hits = table.search(query_vector.astype(np.float32)).limit(asked).to_list()
        kept = [hit for hit in hits if holds(hit)]
        if len(kept) >= limit or len(hits) < asked:
            return [
                {k: hit[k] for k in ("coder", "shard", "latent", "explanation", "_distance")}
                for hit in kept[:limit]
            ]
        asked *= 4
