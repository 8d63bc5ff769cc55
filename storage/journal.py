"""Rows of a table still being built, kept as they finish: a killed or failed run loses none of them
and the next run resumes with the rest (the response cache alone is not the record: it holds answers,
not the rows made of them, and can be turned off).

`<table>.partial/` beside the table holds parquet parts `part-<key>-<writer>-NNNNN.<part>.parquet`,
each written atomically: `<key>` is a digest of what the rows are valid for (stage version, settings,
inputs' fingerprints, model) and `<writer>` one Journal's own token, so two runs of the same partition
at once (a manual materialization during an automation run) never write the same file; each reads
the whole flushes of every writer of its key. A stage whose latent makes rows of several tables (a
score and its examples) names the parts in `parts`; one flush writes them in that order, so the last
part names only latents whose other rows are on disk.

A writer holds an exclusive lock on `writer-<key>-<writer>.lock` while it is open (the kernel drops
it when the process dies), and a live writer's files are never deleted: a run may have resumed from
them. Opening a journal deletes the files of dead writers of other keys (rows made for other
settings or inputs); a finished run deletes the folder when no other writer is live, else leaves it
to the last one.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
import time
import uuid
from pathlib import Path

import pandas as pd

from storage.atomic import atomic_path

_WRITER = re.compile(r"^\.?(?:part|writer)-([0-9a-f]{16})-([0-9a-f]{12})[-.]")
"""A file's key digest and writer token (parts, their temporary files, locks)."""


class Journal:
    def __init__(
        self,
        table_path: Path,
        key: str,
        parts: tuple[str, ...] = ("rows",),
        flush_every: int = 16,
        flush_s: float = 5.0,
    ):
        self.folder = table_path.with_name(table_path.name + ".partial")
        self.part_names = parts
        self.flush_every, self.flush_s = flush_every, flush_s
        self.key = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.writer = f"{self.key}-{uuid.uuid4().hex[:12]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / f"writer-{self.writer}.lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        live: dict[str, bool] = {self.writer: True}
        for path in self.folder.iterdir():
            found = _WRITER.match(path.name)
            if found is None:  # an older layout
                _delete(path)
                continue
            writer = f"{found[1]}-{found[2]}"
            if writer not in live:
                live[writer] = self._live(found[1], found[2])
            if not live[writer]:
                if (
                    found[1] != self.key or path.suffix in (".tmp", ".lock")
                ):  # rows for other settings or inputs, or leftovers; a dead writer's rows of this key are resumed from
                    _delete(path)
        self.flushes = 0
        self._pending: dict[str, list[dict]] = {name: [] for name in parts}
        self._latents_pending = 0
        self._flushed_at = time.monotonic()

    def _live(self, key: str, token: str) -> bool:
        """Whether that writer still holds its lock: its process runs and it has not finished."""
        try:
            with open(self.folder / f"writer-{key}-{token}.lock") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except FileNotFoundError:
            return False
        return False

    def finished(self, part: str = "rows") -> pd.DataFrame:
        """Every row of `part` kept so far by a whole flush of any writer of this key (an empty frame
        when none): rows of a flush cut short before its last part are not kept, and a latent that two
        writers both kept has the rows of one flush only."""
        last = self.part_names[-1]
        frames, claimed = [], set()
        for whole in sorted(self.folder.glob(f"part-{self.key}-*.{last}.parquet")):
            flush = whole.name.split(".")[0]
            latents = set(pd.read_parquet(whole, columns=["latent"])["latent"].tolist())
            new, claimed = latents - claimed, claimed | latents
            path = self.folder / f"{flush}.{part}.parquet"
            if new and path.exists():
                frame = pd.read_parquet(path)
                frames.append(frame[frame["latent"].isin(list(new))])
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def kept(self, latents, part: str = "rows") -> dict[int, dict]:
        """Latent → its kept row of `part`, for the latents asked for."""
        wanted = set(latents)
        return {
            int(r["latent"]): r
            for r in self.finished(part).to_dict("records")
            if int(r["latent"]) in wanted
        }

    def add(self, rows: list[dict] | None = None, **parts: list[dict]) -> None:
        """One latent's rows: `rows` for the part named `rows`, and a list per other part name."""
        for name, new in (({"rows": rows} if rows is not None else {}) | parts).items():
            self._pending[name] += new
        self._latents_pending += 1
        if (
            self._latents_pending >= self.flush_every
            or time.monotonic() - self._flushed_at > self.flush_s
        ):
            self.flush()

    def flush(self) -> None:
        if self._latents_pending:
            for name in self.part_names:
                if self._pending[name]:
                    with atomic_path(
                        self.folder / f"part-{self.writer}-{self.flushes:05d}.{name}.parquet"
                    ) as tmp:
                        pd.DataFrame(self._pending[name]).to_parquet(tmp)
                    self._pending[name] = []
            self.flushes += 1
            self._latents_pending = 0
        self._flushed_at = time.monotonic()

    def discard(self) -> None:
        """The table is written: the partial rows are no longer needed, unless another writer is live
        (it may have resumed from them); then the last one to finish deletes the folder. The lock is
        dropped before looking, so of two writers finishing at once the later one always sees it."""
        self.close()
        try:
            writers = {
                (found[1], found[2])
                for path in self.folder.iterdir()
                if (found := _WRITER.match(path.name))
            }
        except FileNotFoundError:  # the other writer finished meanwhile and deleted it
            return
        if not any(
            self._live(key, token) for key, token in writers if f"{key}-{token}" != self.writer
        ):
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            (self.folder / f"writer-{self.writer}.lock").unlink(missing_ok=True)

    def close(self) -> None:
        """Stop writing (a failed run): the rows stay, and the next run resumes from them."""
        self._lock.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _delete(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
