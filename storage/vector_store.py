"""LanceDB tables: explanation embeddings for semantic search, written idempotently by merge on `id`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

EXPLANATIONS_TABLE = "explanations"


def _connect(db_dir: Path):
    import lancedb

    db_dir.mkdir(parents=True, exist_ok=True)
    return lancedb.connect(str(db_dir))


def upsert_explanations(db_dir: Path, coder: str, latents: list[int], explanations: list[str], vectors: np.ndarray) -> None:
    """Insert or replace one row per (coder, latent); re-running never duplicates rows."""
    if not latents:
        return
    data = pa.table(
        {
            "id": [f"{coder}#{latent}" for latent in latents],
            "coder": [coder] * len(latents),
            "latent": pa.array(latents, pa.int64()),
            "explanation": explanations,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), vectors.shape[1]),
        }
    )
    table = _connect(db_dir).create_table(EXPLANATIONS_TABLE, schema=data.schema, exist_ok=True)
    table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)


def search_explanations(db_dir: Path, query_vector: np.ndarray, limit: int = 10) -> list[dict]:
    try:
        table = _connect(db_dir).open_table(EXPLANATIONS_TABLE)
    except (FileNotFoundError, ValueError):
        return []
    hits = table.search(query_vector.astype(np.float32)).limit(limit).to_list()
    return [{k: hit[k] for k in ("coder", "latent", "explanation", "_distance")} for hit in hits]
