"""Rows of a table still being built, kept as they finish: a killed or failed run loses none of them
and the next run resumes with the rest (the response cache alone is not the record: it holds answers,
not the rows made of them, and can be turned off).

`<table>.partial/` beside the table holds `key.json` (what the rows are valid for: stage version,
settings, inputs' fingerprints, model) and parquet parts `part-NNNNN.parquet`, each written
atomically. A different key discards the folder; the finished table replaces it.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd

from storage.atomic import atomic_path, read_json, write_json


class Journal:
    def __init__(self, table_path: Path, key: str, flush_every: int = 16, flush_s: float = 5.0):
        self.folder = table_path.with_name(table_path.name + ".partial")
        self.flush_every, self.flush_s = flush_every, flush_s
        if self.folder.exists() and (not (self.folder / "key.json").exists() or read_json(self.folder / "key.json").get("key") != key):
            shutil.rmtree(self.folder)  # rows made for other settings or inputs
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "key.json", {"key": key})
        self.parts = len(list(self.folder.glob("part-*.parquet")))
        self._pending: list[dict] = []
        self._flushed_at = time.monotonic()

    def finished(self) -> pd.DataFrame:
        """Every row kept so far (an empty frame when none)."""
        parts = [pd.read_parquet(p) for p in sorted(self.folder.glob("part-*.parquet"))]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def add(self, rows: list[dict]) -> None:
        self._pending += rows
        if len(self._pending) >= self.flush_every or time.monotonic() - self._flushed_at > self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            with atomic_path(self.folder / f"part-{self.parts:05d}.parquet") as tmp:
                pd.DataFrame(self._pending).to_parquet(tmp)
            self.parts += 1
            self._pending = []
        self._flushed_at = time.monotonic()

    def discard(self) -> None:
        """The table is written: the partial rows are no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)
