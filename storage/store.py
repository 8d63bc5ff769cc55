"""The one owner of the pipeline's tables: where each lives, how it is read, fingerprinted, locked,
journaled and committed. Assets and the read side (browser, exports, imports) ask it for a
partition's tables and hand it rows; none of them builds a path or writes a file itself, so the
rules below hold everywhere and moving the data (another root, another machine) is one change here.

The write protocol of every stage is `with store.writing(table, ...) as writer:` — the table's lock
(optional), a `Journal` keyed by what the rows are valid for (optional), then `writer.commit(frame)`:
refuse a result emptier than the finished table (unless the run allows it), write atomically, drop
the journal. A run that fails before `commit` keeps the old table and its journal (the next run
resumes from it). Under a lock, the commit checks the lock's lease right before each rename and
records its generation beside the table (`.<table>.lease`): a writer whose lock was lost (and perhaps
taken by another node) is refused and leaves the table as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import read_json, write_json
from storage.coordination import Lease, exclusive
from storage.journal import Journal
from storage.layout import DataRoot
from storage.tables import (
    existing_table,
    file_fingerprint,
    latent_rows,
    refuse_emptier,
    table_lease_path,
    table_lock_path,
    write_table,
    write_table_batches,
)


@dataclass(frozen=True)
class StoredTable:
    """One table of one partition (or of one coder): a handle that reads it, never a path to build on.
    It is `os.PathLike` so that parquet readers open it directly."""

    name: str
    """Its schema in `storage.tables.TABLES`."""
    path: Path
    stage: str
    """The asset that writes it: what an error tells the user to materialize."""
    what: str
    """It in words, e.g. "explanations of c/h shard 0000"."""
    coordination_url: str = ""
    """The cluster's coordination database: where its writers' lock is held (else a file beside it)."""

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @property
    def location(self) -> str:
        """Where it is, for metadata and messages."""
        return str(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def require(self) -> StoredTable:
        """Itself, or the error that names the asset to materialize when it is not there."""
        existing_table(self.path, self.stage)
        return self

    def read(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The whole table (or some columns); missing, the error names the asset to materialize."""
        return pd.read_parquet(self.require().path, columns=columns)

    def read_if_present(self, columns: list[str] | None = None) -> pd.DataFrame | None:
        return pd.read_parquet(self.path, columns=columns) if self.path.exists() else None

    def latent_rows(self, latents: list[int]) -> pa.Table | None:
        """The rows of `latents` (`storage.tables.latent_rows`: only the row groups that can hold
        them are read); None where it has not been written."""
        return latent_rows(self.path, latents) if self.path.exists() else None

    def rows(self) -> int:
        """How many rows it holds (0 when there is none), from its footer alone."""
        return pq.read_metadata(self.path).num_rows if self.path.exists() else 0

    def fingerprint(self) -> str:
        """Content hash: what a later stage records as the version it read."""
        return file_fingerprint(self.require().path)

    def lock(self, what: str, wait: bool = False):
        """The lock every writer of this table holds across reading, changing and writing it: on every
        node of a cluster with a coordination database, else on this machine (a file beside it). It
        yields the lock's `Lease`, which `TableStore.writing` takes to check before the commit."""
        return exclusive(
            self.coordination_url,
            f"table {self.name} {self.what}",
            table_lock_path(self.path),
            what,
            wait,
        )

    def lease_record(self) -> dict | None:
        """The lock and generation its last commit under a lock was made with (None: not recorded)."""
        path = table_lease_path(self.path)
        return read_json(path) if path.exists() else None


class Writer:
    """One run's write of a table: its journal (rows kept as they finish) and the commit."""

    def __init__(
        self,
        table: StoredTable,
        journal: Journal | None,
        allow_empty: bool,
        lease: Lease | None = None,
    ):
        self.table, self.journal, self.allow_empty, self.lease = table, journal, allow_empty, lease

    def _write(self, frame: pd.DataFrame, table: StoredTable) -> None:
        """One table's atomic write, refused right before its rename if the lease was lost."""
        write_table(frame, table.path, table.name, self.lease.check if self.lease else None)
        self._record(table)

    def _record(self, table: StoredTable) -> None:
        """The commit record: which generation of which lock wrote the table (a fenced lease's only)."""
        if self.lease is not None and self.lease.generation is not None:
            write_json(table_lease_path(table.path), self.lease.record)

    def commit(self, frame: pd.DataFrame, *beside: tuple[StoredTable, pd.DataFrame]) -> None:
        """Write `frame` as the table (refused if it is empty where the finished one has rows), then each
        table `beside` it (a scorer's examples), then drop the journal: its rows are in the table now."""
        refuse_emptier(frame, self.table.path, self.table.what, self.allow_empty)
        self._write(frame, self.table)
        for other, rows in beside:
            self._write(rows, other)
        if self.journal is not None:
            self.journal.discard()

    def commit_batches(
        self,
        frames: Iterable[pd.DataFrame],
        beside: Callable[[], list[tuple[StoredTable, pd.DataFrame]]] = list,
    ) -> int:
        """Write `frames` one row group each, holding one at a time; the empty-result rule is checked
        before the file replaces the old one. `beside()` gives the tables to write after it (made while
        the batches were). Returns the rows written."""

        def keep_results(n_rows: int) -> None:
            refuse_emptier(
                pd.DataFrame(index=range(n_rows)),
                self.table.path,
                self.table.what,
                self.allow_empty,
            )
            if self.lease is not None:
                self.lease.check()

        rows = write_table_batches(
            frames, self.table.path, self.table.name, before_commit=keep_results
        )
        self._record(self.table)
        for other, more in beside():
            self._write(more, other)
        if self.journal is not None:
            self.journal.discard()
        return rows


@dataclass(frozen=True)
class TableStore:
    """Every table of the pipeline under one data root, and the rules of writing them."""

    layout: DataRoot
    allow_empty: bool = False
    """Let a run whose result is empty replace a table that holds rows (a deliberate re-run)."""
    coordination_url: str = ""
    """A cluster's coordination database (`[settings] coordination_url`): the tables' write locks are held there."""

    @classmethod
    def at(cls, data_dir: str | os.PathLike, allow_empty: bool = False) -> TableStore:
        return cls(DataRoot.at(data_dir), allow_empty)

    def _table(self, name: str, path: Path, stage: str, what: str) -> StoredTable:
        return StoredTable(name, path, stage, what, self.coordination_url)

    # ---- the tables ----------------------------------------------------------------------------

    def exemplars(self, coder: str, shard: str) -> StoredTable:
        return self._table(
            "exemplars",
            self.layout.exemplars_path(coder, shard),
            "exemplars",
            f"exemplars of {coder} shard {shard}",
        )

    def latent_profiles(self, coder: str, shard: str) -> StoredTable:
        return self._table(
            "latent_profiles",
            self.layout.latent_profiles_path(coder, shard),
            "exemplars",
            f"latent profiles of {coder} shard {shard}",
        )

    def record_exemplars_threshold(self, coder: str, shard: str, min_windows: int) -> None:
        """Beside the shard's exemplars: the fewest activating windows a latent needed to get any."""
        write_json(
            self.layout.exemplars_threshold_path(coder, shard),
            {"min_activating_windows": min_windows},
        )

    def exemplars_threshold(self, coder: str, shard: str) -> int | None:
        """What `record_exemplars_threshold` recorded (None: exemplars made before it was recorded)."""
        path = self.layout.exemplars_threshold_path(coder, shard)
        return int(read_json(path)["min_activating_windows"]) if path.exists() else None

    def explanations(self, coder: str, shard: str) -> StoredTable:
        return self._table(
            "explanations",
            self.layout.explanations_path(coder, shard),
            "explanations",
            f"explanations of {coder} shard {shard}",
        )

    def explanation_rounds(self, coder: str, shard: str) -> StoredTable:
        return self._table(
            "explanation_rounds",
            self.layout.explanation_rounds_path(coder, shard),
            "explanations",
            f"refine rounds of the explanations of {coder} shard {shard}",
        )

    def explanation_senses(self, coder: str, shard: str) -> StoredTable:
        return self._table(
            "explanation_senses",
            self.layout.explanation_senses_path(coder, shard),
            "explanations",
            f"senses of the explanations of {coder} shard {shard}",
        )

    def explanation_reseeds(self, coder: str, shard: str) -> StoredTable:
        return self._table(
            "explanation_reseeds",
            self.layout.explanation_reseeds_path(coder, shard),
            "explanations",
            f"second explanations (reseeds) of {coder} shard {shard}",
        )

    def scores(self, coder: str, shard: str, scorer: str) -> StoredTable:
        return self._table(
            "scores",
            self.layout.scores_path(coder, shard, scorer),
            f"scores/{scorer}",
            f"scores/{scorer} of {coder} shard {shard}",
        )

    def sense_scores(self, coder: str, shard: str, scorer: str) -> StoredTable:
        return self._table(
            "sense_scores",
            self.layout.sense_scores_path(coder, shard, scorer),
            f"scores/{scorer}",
            f"sense scores of scores/{scorer} of {coder} shard {shard}",
        )

    def reseed_scores(self, coder: str, shard: str, scorer: str) -> StoredTable:
        return self._table(
            "reseed_scores",
            self.layout.reseed_scores_path(coder, shard, scorer),
            f"scores/{scorer}",
            f"reseed scores of scores/{scorer} of {coder} shard {shard}",
        )

    def scored_examples(self, coder: str, shard: str, scorer: str) -> StoredTable:
        return self._table(
            "scored_examples",
            self.layout.scored_examples_path(coder, shard, scorer),
            f"scores/{scorer}",
            f"scored examples of scores/{scorer} of {coder} shard {shard}",
        )

    def score_summary(self, coder: str) -> StoredTable:
        return self._table(
            "score_summary",
            self.layout.score_summary_path(coder),
            "score_summary",
            f"score summary of {coder}",
        )

    def scored_shards(self, coder: str) -> list[str]:
        """The shards of `coder` that have any scores table."""
        folder = self.layout.score_summary_path(coder).parent
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def scorers_of(self, coder: str, shard: str) -> list[str]:
        """The scorers with a scores table in that shard (plugins' included); the tables beside one
        (`<scorer>.examples.parquet`, `<scorer>.senses.parquet`, `<scorer>.reseeds.parquet`) are not scorers."""
        folder = self.layout.scores_path(coder, shard, "_").parent
        return (
            sorted(
                p.name.removesuffix(".parquet")
                for p in folder.glob("*.parquet")
                if p.name.count(".") == 1
            )
            if folder.is_dir()
            else []
        )

    def summary_sources(self, coder: str) -> dict | None:
        """The fingerprints the summary of `coder` was built from (None: not recorded)."""
        path = self.layout.score_summary_sources_path(coder)
        return read_json(path) if path.exists() else None

    def commit_summary(self, coder: str, summary: pd.DataFrame, sources: dict[str, str]) -> None:
        """The summary, then the sources it was built from: a crash between the two leaves the old sources
        beside the new summary, which only makes the next run build it again."""
        write_table(summary, self.layout.score_summary_path(coder), "score_summary")
        write_json(self.layout.score_summary_sources_path(coder), sources)

    # ---- writing -------------------------------------------------------------------------------

    @contextmanager
    def writing(
        self,
        table: StoredTable,
        journal_key: str | None = None,
        parts: tuple[str, ...] = ("rows",),
        lock: str | None = None,
        wait: bool = True,
        lease: Lease | None = None,
    ) -> Iterator[Writer]:
        """One run's write of `table`: with `lock` (what the run is, for a waiting or refused writer) it
        holds the table's lock throughout, waiting for another writer (with `wait=False`, refused at once:
        a command the user runs names the holder instead of hanging); `lease`: the caller holds the
        table's lock already (`StoredTable.lock`). With `journal_key` (what the rows are valid for:
        versions, settings, inputs' fingerprints, models) it keeps rows as they finish and resumes an
        interrupted run's. Nothing replaces the table until `Writer.commit`."""
        with table.lock(lock, wait) if lock else nullcontext(lease) as held:
            journal = Journal(table.path, journal_key, parts) if journal_key is not None else None
            try:
                yield Writer(table, journal, self.allow_empty, held)
            finally:
                if journal is not None:
                    journal.close()
