"""Parquet tables of exemplars, explanations and scores, written atomically."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_path


def write_table(frame: pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> None:
    """Write `frame`; an empty one is written with `schema`, so that a shard with nothing in it is still
    a valid table whose every column has its type (pandas would write no column, or untyped ones)."""
    with atomic_path(path) as tmp:
        if schema is not None and not len(frame):
            pq.write_table(schema.empty_table(), tmp)
        else:
            frame.to_parquet(tmp, index=False)


def file_fingerprint(path: Path) -> str:
    """A content hash of a stored table: what a later stage records as the version it read."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class EmptierResultsError(RuntimeError):
    """A run would replace a table that holds results with an empty one."""


def refuse_emptier(frame: pd.DataFrame, path: Path, stage: str, allow: bool) -> None:
    """Stop a run whose table would be empty where the finished one at `path` has rows, unless `allow`
    (a deliberate re-run): a mistake upstream must not quietly wipe finished results."""
    if allow or len(frame) or not path.exists():
        return
    held = pq.read_metadata(path).num_rows
    if held:
        raise EmptierResultsError(
            f"{stage}: this run has no results, where {path} holds {held} rows; the table is kept. Fix: check what changed upstream; "
            f"if an empty result is meant, set allow_empty_results: true on the `settings` resource for this run."
        )


def read_table(path: Path, stage: str) -> pd.DataFrame:
    """Read a stage's table, or say which asset to materialize when it is missing."""
    if not path.exists():
        raise FileNotFoundError(
            f"No {stage} at {path}. Materialize the `{stage}` asset for this partition first."
        )
    return pd.read_parquet(path)
