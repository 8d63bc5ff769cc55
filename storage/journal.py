"""Rows of a table still being built, kept as they finish: a killed or failed run loses none of them
and the next run resumes with the rest (the response cache alone is not the record: it holds answers,
not the rows made of them, and can be turned off).

`<table>.partial/` beside the table holds `key.json` (what the rows are valid for: stage version,
settings, inputs' fingerprints, model) and parquet parts `part-NNNNN.<part>.parquet`, each written
atomically. A stage whose latent makes rows of several tables (a score and its examples) names the
parts in `parts`; one flush writes them in that order, so the last part names only latents whose
other rows are on disk. A different key discards the folder; the finished table replaces it.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd

from storage.atomic import atomic_path, read_json, write_json


class Journal:
    def __init__(self, table_path: Path, key: str, parts: tuple[str, ...] = ("rows",), flush_every: int = 16, flush_s: float = 5.0):
        self.folder = table_path.with_name(table_path.name + ".partial")
        self.part_names = parts
        self.flush_every, self.flush_s = flush_every, flush_s
        if self.folder.exists() and (not (self.folder / "key.json").exists() or read_json(self.folder / "key.json").get("key") != key):
            shutil.rmtree(self.folder)  # rows made for other settings or inputs
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "key.json", {"key": key})
        self.flushes = len(list(self.folder.glob(f"part-*.{parts[-1]}.parquet")))
        self._pending: dict[str, list[dict]] = {name: [] for name in parts}
        self._latents_pending = 0
        self._flushed_at = time.monotonic()

    def finished(self, part: str = "rows") -> pd.DataFrame:
        """Every row of `part` kept so far by a whole flush (an empty frame when none): rows of a flush
        cut short before its last part are not kept."""
        whole = {p.name.split(".")[0] for p in self.folder.glob(f"part-*.{self.part_names[-1]}.parquet")}
        frames = [pd.read_parquet(p) for p in sorted(self.folder.glob(f"part-*.{part}.parquet")) if p.name.split(".")[0] in whole]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def kept(self, latents, part: str = "rows") -> dict[int, dict]:
        """Latent → its kept row of `part`, for the latents asked for."""
        wanted = set(latents)
        return {int(r["latent"]): r for r in self.finished(part).to_dict("records") if int(r["latent"]) in wanted}

    def add(self, rows: list[dict] | None = None, **parts: list[dict]) -> None:
        """One latent's rows: `rows` for a one-part journal, or a list per part name."""
        for name, new in ({"rows": rows} if rows is not None else parts).items():
            self._pending[name] += new
        self._latents_pending += 1
        if self._latents_pending >= self.flush_every or time.monotonic() - self._flushed_at > self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self._latents_pending:
            for name in self.part_names:
                if self._pending[name]:
                    with atomic_path(self.folder / f"part-{self.flushes:05d}.{name}.parquet") as tmp:
                        pd.DataFrame(self._pending[name]).to_parquet(tmp)
                    self._pending[name] = []
            self.flushes += 1
            self._latents_pending = 0
        self._flushed_at = time.monotonic()

    def discard(self) -> None:
        """The table is written: the partial rows are no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)
