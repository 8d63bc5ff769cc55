"""Per-coder indexes of the latent browser, built lazily and cached on disk under `<root>/viewer/<coder>/`.

A coder of 100,000 latents must answer a list, a search or a latent page in well under a second, so
nothing is read whole per request:

- `latents.arrow`: one row per latent (frequency, activation, explanation status, its number of senses,
  each scorer's metric, control, gap and lowest sense score), rebuilt when any table it comes from
  changes (sizes and mtimes), then held in memory; sorting and filtering 100k rows in pandas takes
  milliseconds.
- `<shard>.exemplars.arrow`: the shard's exemplars in Arrow's file format, sorted by latent, memory-
  mapped; with per-latent row offsets a latent's windows are a zero-copy slice, not a parquet scan.
- `<shard>.density.npz`: per latent a histogram of its cached activations (one pass over the shard).
- `decoder-<identity>.npy`: unit-norm decoder rows, memory-mapped, for cosine neighbours and the logit lens, where
  the activation cache has none of its own (`decoder_directions.npy`, written by the activations stage); named by
  the content of the coder's registry files (`reader.coder_identity`).

The subject model's unembedding and final norm scale, for the logit lens, are read from the file the
activations stage writes beside the caches (`DataRoot.unembedding_path`), so the server need not keep,
or even load, the whole model. On a first start (`background`) no page waits for a cache: a latent's
rows come from the tables' row groups until its shard's copies are built.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from assets.accounting import coder_accounting
from assets.score_metrics import stale_scores
from assets.senses import lowest_sense_scores, of_current
from autointerp_defs.readside import reader
from resources.embedder import EMBEDDED
from storage.activations import shard_of_latents
from storage.atomic import atomic_path, read_json_or_empty, write_json
from storage.store import StoredTable, TableStore

DENSITY_BINS = 24
NEIGHBOUR_BLOCK = 256  # latents per similarity product: 256 x width floats at a time
LOGIT_BINS = 40
STAMP_CHECK_S = 1.0
STATUSES = ("ok", "failed", "none")
"""Explanation statuses in the order the latent list shows them by default: explained latents first."""


LATENTS_VERSION = "latents-3"
"""Of `latents.arrow`'s columns (2: `senses`, `<scorer>_min_sense`; 3: `<scorer>_lo`/`_hi`): part of its
stamp, so a cache built by code with other columns is built again even when no source table changed."""


class CoderIndex:
    """The cached views of one coder; thread-safe (the server answers requests on threads)."""

    def __init__(
        self,
        store: TableStore,
        coder: str,
        subject_model: tuple[str | None, str | None, str | None] = (None, None, None),
        embedder: str = EMBEDDED,
        background: bool = False,
        pause: Callable[[], None] = lambda: None,
    ):
        self.store, self.coder, self.embedder = store, coder, embedder
        """`embedder`: the model whose explanations table search reads (the deployment's `[embedder] model`)."""
        self.background = background
        """Whether caches are built in background threads (`autointerp view`) rather than by the
        request that needs one (exports, tests)."""
        self.pause = pause
        """Called before each step of background work (the browser's `pause_for_requests`)."""
        self.subject_model = subject_model
        """(model, gguf_file, revision) whose unembedding the logit lens reads: the deployment's
        `[subject_model]` (None: the embedded model)."""
        self.meta = reader.activations_meta(store, coder)
        self.shards = reader.shard_keys_of(self.meta)
        self.layout = store.layout
        self.scorers: list[str] = []
        self._lock = threading.Lock()
        self._guards: dict[str, threading.Lock] = {}
        self._preparing: set[str] = set()
        self._latents: pd.DataFrame | None = None
        self._stamp, self._checked = None, 0.0
        self._tables: dict[str, tuple] = {}
        self._density: dict[str, tuple] = {}
        self._decoder = None
        self._accounting: tuple[str, dict | None] | None = None

    def _guard(self, cache: str) -> threading.Lock:
        """The lock of one cache: building one (a shard's exemplars, the decoder rows) never holds up
        answers that another, already built, can give."""
        with self._lock:
            return self._guards.setdefault(cache, threading.Lock())

    def warm_up(self) -> None:
        """Build or open every cache a page of this coder reads, the list's first: what `autointerp view`
        does in the background at start, so that a person's first clicks find them ready."""
        self.latents()
        if self.decoder() is not None:
            self.logit_lens(
                0, wait=False
            )  # starts caching the unembedding, in a thread of its own, where the activations stage did not
        for shard in self.shards:
            self.pause()
            self.prepare_shard(shard)
        self.pause()
        self._vectors()

    # ---- the latent table ---------------------------------------------------------------------

    def latents(self) -> pd.DataFrame:
        """The per-latent table, rebuilt if a source table changed since it was cached, or which scorers' main
        metrics this process knows (a plugin's is known only where its deployment is loaded)."""
        now = time.monotonic()
        if self._latents is not None and now - self._checked < STAMP_CHECK_S:
            return self._latents
        with self._guard("latents"):
            scorers = reader.scorer_names(self.store, self.coder)
            current = (
                f"{LATENTS_VERSION}|"
                + reader.stamp(reader.input_files(self.store, self.coder, self.shards))
                + "|"
                + ",".join(f"{n}:{reader.scorer_info(n)['main_metric']}" for n in scorers)
            )
            self._checked = time.monotonic()
            if self._latents is not None and current == self._stamp:
                return self._latents
            path = self.layout.viewer_latents_path(self.coder)
            stamp_path = self.layout.viewer_stamp_path(path)
            if path.exists() and read_json_or_empty(stamp_path).get("stamp") == current:
                table = pd.read_feather(path)
            else:
                table = self._build_latents()
                with atomic_path(path) as tmp:
                    table.to_feather(
                        tmp
                    )  # Arrow, uncompressed: a tenth of parquet's time to write and read at 100k latents
                write_json(stamp_path, {"stamp": current})
            table["status"] = pd.Categorical(
                table["status"], STATUSES, ordered=True
            )  # sorts explained latents first
            self.scorers = [c for c in scorers if c in table.columns]
            self._latents, self._stamp = table, current
            return table

    def _build_latents(self) -> pd.DataFrame:
        counts = reader.latent_counts(self.store, self.coder)
        width, tokens = int(self.meta["width"]), max(int(counts["tokens"][0]), 1)
        count = counts["count"].astype(np.int64)
        status, explanation = (
            np.full(width, "none", object),
            np.full(width, "", object),
        )  # filled as arrays: pandas' setitem on string columns took 0.4 s
        explained = reader.explanations(
            self.store, self.coder, self.shards, columns=["latent", "status", "explanation"]
        )
        if len(explained):
            last = explained.drop_duplicates("latent", keep="last")
            at = last["latent"].to_numpy(np.int64)
            status[at] = last["status"].to_numpy(object)
            explanation[at] = last["explanation"].fillna("").to_numpy(object)
        table = pd.DataFrame(
            {
                "latent": np.arange(width, dtype=np.int64),
                "shard": np.asarray(self.shards)[
                    shard_of_latents(np.arange(width), int(self.meta["latents_per_shard"]))
                ],
                "frequency": count / tokens,
                "max_activation": counts["max"].astype(np.float64),
                "mean_activation": np.where(count > 0, counts["sum"] / np.maximum(count, 1), 0.0),
                "status": status,
                "explanation": explanation,
            }
        )
        senses = of_current(
            reader.explanation_senses(
                self.store, self.coder, self.shards, columns=["latent", "sense", "explanation"]
            ),
            explained,
        )
        several = senses.groupby("latent").size() if len(senses) else pd.Series(dtype=np.int64)
        table["senses"] = (status == "ok").astype(np.int64)
        table.loc[several.index.to_numpy(np.int64), "senses"] = several.to_numpy(np.int64)
        gaps = []
        for name in reader.scorer_names(self.store, self.coder):
            info = reader.scorer_info(name)
            main = info["main_metric"]
            metrics = [main, f"control_{main}"] if main is not None else []
            scored = reader.scores(
                self.store,
                self.coder,
                name,
                self.shards,
                columns=["latent", "explanation", "gap", *metrics],
                optional=(f"{main}_lo", f"{main}_hi") if main else (),  # its 95 % interval
            )
            for column in (name, f"{name}_lo", f"{name}_hi", f"{name}_control", f"{name}_gap"):
                table[column] = np.nan
            if len(scored):
                scored = scored[
                    ~stale_scores(scored, explained)
                ]  # scores of an earlier explanation are not this latent's (its page marks them)
                at = scored["latent"].to_numpy(np.int64)
                if main is not None:
                    table.loc[at, name] = scored[main].to_numpy(np.float64)
                    table.loc[at, f"{name}_control"] = scored[f"control_{main}"].to_numpy(
                        np.float64
                    )
                    for end in ("lo", "hi"):
                        if f"{main}_{end}" in scored:
                            table.loc[at, f"{name}_{end}"] = scored[f"{main}_{end}"].to_numpy(
                                np.float64
                            )
                table.loc[at, f"{name}_gap"] = scored["gap"].to_numpy(np.float64)
            if info["scores_senses"]:
                table[f"{name}_min_sense"] = np.nan
                if len(senses):  # no latent has several senses: no sense table need be read
                    lowest = lowest_sense_scores(
                        senses,
                        reader.sense_scores(
                            self.store,
                            self.coder,
                            name,
                            self.shards,
                            columns=["latent", "sense", "explanation", main],
                        ),
                        main,
                    )
                    table.loc[lowest.index.to_numpy(np.int64), f"{name}_min_sense"] = (
                        lowest.to_numpy(np.float64)
                    )
            gaps.append(f"{name}_gap")
        table["mean_gap"] = table[gaps].mean(axis=1) if gaps else np.nan
        return table

    def accounting(self) -> dict | None:
        """Where every latent of the coder went (`assets.accounting`), made again when a file it reads changes."""
        files = [self.layout.cache_meta_path(self.coder), self.layout.latent_stats_path(self.coder)]
        for s in self.shards:
            files += [
                self.store.exemplars(self.coder, s),
                self.layout.exemplars_threshold_path(self.coder, s),
                self.store.explanations(self.coder, s),
            ]
        current = reader.stamp(files)
        if self._accounting is None or self._accounting[0] != current:
            self._accounting = (current, coder_accounting(self.store, self.coder))
        return self._accounting[1]

    def shard_of(self, latent: int) -> str:
        return reader.shard_of(self.meta, latent)

    # ---- per-latent rows of the shard tables -------------------------------------------------

    def windows(self, latent: int) -> list[dict]:
        """The latent's exemplar windows, in the order the exemplars table holds them."""
        return self.rows(latent, "exemplars")

    def shard_tables(self, shard: str) -> dict[str, StoredTable]:
        """The shard's tables a latent page reads, by the name its cache has."""
        tables = {
            "exemplars": self.store.exemplars(self.coder, shard),
            "explanations": self.store.explanations(self.coder, shard),
            "profiles": self.store.latent_profiles(self.coder, shard),
            "senses": self.store.explanation_senses(self.coder, shard),
        }
        tables |= {
            f"scores.{name}": self.store.scores(self.coder, shard, name) for name in self.scorers
        }
        tables |= {
            f"senses.{name}": self.store.sense_scores(self.coder, shard, name)
            for name in self.scorers
        }
        reseeds = self.store.explanation_reseeds(self.coder, shard)
        if (
            reseeds.exists()
        ):  # `[explanations] stability_latents`: a latent's second text and its scores
            tables["reseeds"] = reseeds
            tables |= {
                f"reseeds.{name}": self.store.reseed_scores(self.coder, shard, name)
                for name in self.scorers
            }
        if "simulation" in self.scorers:
            tables["examples.simulation"] = self.store.scored_examples(
                self.coder, shard, "simulation"
            )
        return tables

    def rows(self, latent: int, name: str) -> list[dict]:
        """The rows of `latent` in its shard's table `name` (a key of `shard_tables`), read from a
        memory-mapped, latent-sorted Arrow copy cached as `<shard>.<name>.arrow`. In the `background` the
        browser's first start needs, a copy not built yet is built in a thread and, meanwhile, the latent's
        rows are read from the table itself (the row groups that can hold it): a first page never waits
        for the copy of a whole shard."""
        shard = self.shard_of(latent)
        cached = self._arrow_cache(shard, name, build=not self.background)
        if cached is None:
            self._prepare_in_background(shard)
            found = self.shard_tables(shard)[name].latent_rows([latent])
            return [] if found is None else found.to_pylist()
        table, latents, starts, ends = cached
        i = int(np.searchsorted(latents, latent))
        if i >= len(latents) or latents[i] != latent:
            return []
        return table.slice(int(starts[i]), int(ends[i] - starts[i])).to_pylist()

    def prepare_shard(self, shard: str) -> None:
        """Build or open every cache a latent page of `shard` reads."""
        for name in self.shard_tables(shard):
            self._arrow_cache(shard, name)
        self._density_cache(shard)

    def _prepare_in_background(self, shard: str) -> None:
        with self._lock:
            if shard in self._preparing:
                return
            self._preparing.add(shard)

        def prepare():
            try:
                self.pause()
                self.prepare_shard(shard)
            except Exception as error:
                # the next page of this shard reads the tables directly, and says what is wrong if they are
                print(
                    f"viewer: could not prepare {self.coder} shard {shard} ({type(error).__name__}: {error})",
                    file=sys.stderr,
                )
            finally:
                with self._lock:
                    self._preparing.discard(shard)

        threading.Thread(target=prepare, daemon=True).start()

    def _arrow_cache(self, shard: str, table_name: str, build: bool = True) -> tuple | None:
        """(table, latents, starts, ends) of the shard's table `table_name`, built if needed; None where it
        is not built and `build` is False."""
        source, name = self.shard_tables(shard)[table_name], f"{shard}.{table_name}"
        current = reader.stamp([source])
        held = self._tables.get(name)
        if held is not None and held[0] == current:
            return held[1]
        arrow = self.layout.viewer_rows_path(self.coder, shard, table_name)
        stamp_path = self.layout.viewer_stamp_path(arrow)
        offsets_path = self.layout.viewer_row_offsets_path(self.coder, shard, table_name)

        def built() -> bool:
            return arrow.exists() and read_json_or_empty(stamp_path).get("stamp") == current

        if not build and not built():
            return None
        with self._guard(name):
            if not built():
                table = (
                    pq.read_table(source)
                    if source.exists()
                    else pa.table({"latent": pa.array([], pa.int64())})
                )
                order = np.argsort(
                    table["latent"].to_numpy(), kind="stable"
                )  # stable: a latent's rows keep their order
                table = table.take(pa.array(order))
                with atomic_path(arrow) as tmp:
                    with (
                        pa.OSFile(str(tmp), "wb") as sink,
                        pa.ipc.new_file(sink, table.schema) as writer,
                    ):
                        writer.write_table(table, max_chunksize=1 << 16)
                column = table["latent"].to_numpy()
                latents, starts = np.unique(column, return_index=True)
                ends = np.append(starts[1:], len(column))[: len(starts)].astype(
                    np.int64
                )  # an empty table has no ends
                with atomic_path(offsets_path) as tmp:
                    with open(tmp, "wb") as handle:
                        np.save(handle, np.stack([latents, starts, ends]).astype(np.int64))
                write_json(stamp_path, {"stamp": current})
            table = pa.ipc.open_file(pa.memory_map(str(arrow), "r")).read_all()
            latents, starts, ends = np.load(offsets_path)
            self._tables[name] = (current, (table, latents, starts, ends))
            return self._tables[name][1]

    # ---- semantic search ----------------------------------------------------------------------

    def search(self, query_vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
        """(latent, distance) of the explanations nearest to `query_vector`: exact search over this coder's
        vectors of the LanceDB explanations table, copied once per table version into a memory-mapped
        matrix (LanceDB's own flat search with a coder filter takes ~200 ms at 100k rows on 2 cores).
        Distance is squared L2 of unit vectors, as LanceDB reports it. Only vectors of the text the latent's
        explanation holds now (status ok) are ranked, as `search_explanations` keeps them: one of an earlier
        text (a crash between a shard's write and its sync) would rank the latent by words it no longer has."""
        latents, vectors, current = self._vectors()
        if not current.any():
            return []
        sims = np.where(current, vectors @ query_vector.astype(np.float32), -np.inf)
        limit = min(limit, int(current.sum()))
        top = np.argpartition(-sims, limit - 1)[:limit]
        top = top[np.argsort(-sims[top])]
        return [(int(latents[i]), float(2 - 2 * sims[i])) for i in top]

    def _vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(latents, their vectors, whether each vector is of the latent's current explanation)."""
        version = f"{self.embedder}@{reader.explanations_table_stamp(self.store, self.embedder)}"
        table = self.latents()
        held = self._tables.get("vectors")
        if held is not None and held[0] == (version, self._stamp):
            return held[1]
        with self._guard("vectors"):
            path = self.layout.viewer_vectors_path(self.coder)
            stamp_path = self.layout.viewer_stamp_path(path)
            ids_path = self.layout.viewer_vector_latents_path(self.coder)
            texts_path = self.layout.viewer_vector_texts_path(self.coder)
            if not (
                path.exists()
                and texts_path.exists()
                and read_json_or_empty(stamp_path).get("version") == version
            ):
                _, latents, vectors, texts = reader.explanation_vectors(
                    self.store, self.coder, self.embedder
                )
                for target, array in ((path, vectors), (ids_path, latents)):
                    with atomic_path(target) as tmp:
                        with open(tmp, "wb") as handle:
                            np.save(handle, array)
                write_json(texts_path, {"texts": texts})
                write_json(stamp_path, {"version": version})
            latents, texts = (
                np.load(ids_path),
                np.asarray(read_json_or_empty(texts_path)["texts"], object),
            )
            known = latents < len(table)
            at = np.where(known, latents, 0)
            current = (
                known
                & (table["status"].to_numpy()[at] == "ok")
                & (table["explanation"].to_numpy()[at] == texts)
            )
            self._tables["vectors"] = (
                (version, self._stamp),
                (latents, np.load(path, mmap_mode="r"), current),
            )
            return self._tables["vectors"][1]

    # ---- activation density -------------------------------------------------------------------

    def density(self, latent: int) -> dict:
        """Histogram of the latent's non-zero activations over the cached corpus (in the `background`, while
        the shard's histograms are not cached yet, this latent's alone from the activation cache)."""
        shard = self.shard_of(latent)
        cached = self._density_cache(shard, build=not self.background)
        if cached is None:
            self._prepare_in_background(shard)
            acts = reader.latent_activations(self.store, self.coder, [latent])
            cached = density_histograms(acts.locations[:, 2], acts.activations)
        latents, counts, tops = cached
        i = int(np.searchsorted(latents, latent))
        if i >= len(latents) or latents[i] != latent:
            return {"edges": [], "counts": []}
        return {
            "edges": np.linspace(0, float(tops[i]), DENSITY_BINS + 1).round(4).tolist(),
            "counts": counts[i].tolist(),
        }

    def _density_cache(self, shard: str, build: bool = True) -> tuple | None:
        source = self.store.layout.latent_stats_path(self.coder)
        current = reader.stamp([source])
        held = self._density.get(shard)
        if held is not None and held[0] == current:
            return held[1]
        path = self.layout.viewer_density_path(self.coder, shard)
        stamp_path = self.layout.viewer_stamp_path(path)

        def built() -> bool:
            return path.exists() and read_json_or_empty(stamp_path).get("stamp") == current

        if not build and not built():
            return None
        with self._guard(f"{shard}.density"):
            if not built():
                acts = reader.shard_activations(self.store, self.coder, shard)
                ids, counts, tops = density_histograms(acts.locations[:, 2], acts.activations)
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as handle:
                        np.savez(handle, latents=ids, counts=counts, tops=tops)
                write_json(stamp_path, {"stamp": current})
            data = np.load(path)
            self._density[shard] = (current, (data["latents"], data["counts"], data["tops"]))
            return self._density[shard][1]

    # ---- decoder: neighbours and logit lens ---------------------------------------------------

    def decoder(self) -> np.ndarray | None:
        """Unit-norm decoder rows `[width, d]` (memory-mapped), or None when the coder has no decoder; read
        again when the content of the coder's registry files changes (a coder registered anew under the same
        name, even with the old sizes and times). The activations stage writes them with the cache; only a cache
        without them is converted here, once per version of the coder."""
        current = reader.coder_identity(self.store, self.coder)
        held = self._decoder
        if held is None or held[0] != current:
            with self._guard("decoder"):
                found, rows = reader.stored_decoder_directions(self.store, self.coder)
                self._decoder = held = (
                    current,
                    rows if found else self._converted_decoder(current),
                )
        return held[1]

    def _converted_decoder(self, identity: str) -> np.ndarray | None:
        """The rows converted from the registered coder, in `decoder-<its identity>.npy` (with a `.json` saying
        whether it has any): a file of another version of the coder is never read for this one."""
        path = self.layout.viewer_decoder_path(self.coder, identity)
        marker = self.layout.viewer_decoder_marker_path(self.coder, identity)
        cached = read_json_or_empty(marker)
        if not cached:
            directions = reader.registered_coder(self.store, self.coder).decoder_directions()
            if directions is not None:
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as handle:
                        np.save(handle, directions.numpy())
            cached = {"has_decoder": directions is not None}
            write_json(marker, cached)
            # earlier versions' rows go: each is as large as the coder
            for old in self.layout.viewer_decoder_paths(self.coder):
                if old not in (path, marker):
                    old.unlink(missing_ok=True)
        return np.load(path, mmap_mode="r") if cached["has_decoder"] else None

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

    def vocab_projection(self, latents: list[int], k: int = 10, bins: int = 0, wait: bool = True):
        """The logit lens of `latents` (`resources.unembedding.VocabProjection`: top and bottom k token ids and
        logits of each decoder direction, with `bins` the histogram of its logits), or None when the coder has
        no decoder. With `wait` False and the unembedding not yet cached (a first start), why, at once."""
        import torch

        from resources.unembedding import vocab_projection

        rows = self.decoder()
        if rows is None:
            return None
        lens = lens_model(self.store, *self.subject_model, wait=wait)
        if isinstance(lens, str):
            return lens
        return vocab_projection(
            torch.from_numpy(np.array(rows[np.asarray(latents, np.int64)])), lens, k, bins=bins
        )

    def logit_lens(self, latent: int, k: int = 10, wait: bool = True) -> dict | None:
        """The tokens this latent's decoder direction promotes and suppresses, with their logits, and the
        histogram of its logits over the whole vocabulary (logit lens); None without a decoder. With
        `wait` False and the unembedding not yet cached (a first start), `{"pending": why}` at once."""
        projection = self.vocab_projection([latent], k, bins=LOGIT_BINS, wait=wait)
        if projection is None:
            return None
        if isinstance(projection, str):
            return {"pending": projection}
        vocab = reader.display_vocab_cached(self.store)

        def as_list(ids, values) -> list[dict]:
            return [
                {
                    "token": vocab[int(i)] if int(i) < len(vocab) else f"<{int(i)}>",
                    "logit": round(float(v), 3),
                }
                for i, v in zip(ids, values, strict=False)
            ]

        counts, edges = projection.histograms[0]
        return {
            "promoted": as_list(projection.top_ids[0], projection.top_values[0]),
            "suppressed": as_list(projection.bottom_ids[0], projection.bottom_values[0]),
            "histogram": {"edges": edges, "counts": counts},
        }


def density_histograms(
    latents: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per latent that fired (`latents` sorted, one entry per cached activation `values`): its id, the
    counts of its activations in `DENSITY_BINS` equal bins over [0, its max] (as `np.histogram` bins them),
    and its max. One vectorized pass: a loop per latent took seconds per shard at 100k latents."""
    if not len(latents):
        return np.zeros(0, np.int64), np.zeros((0, DENSITY_BINS), np.int64), np.zeros(0)
    ids, starts = np.unique(latents, return_index=True)
    sizes = np.diff(np.append(starts, len(latents)))
    tops = np.maximum.reduceat(values, starts).astype(np.float64)
    upper = np.repeat(np.where(tops > 0, tops, 1.0), sizes)
    values = values.astype(np.float64)
    bins = np.minimum((values * (DENSITY_BINS / upper)).astype(np.int64), DENSITY_BINS - 1)
    inside = (values >= 0) & (values <= upper)
    row = np.repeat(np.arange(len(ids)), sizes)
    counts = np.bincount(
        row[inside] * DENSITY_BINS + bins[inside], minlength=len(ids) * DENSITY_BINS
    ).reshape(-1, DENSITY_BINS)
    return ids.astype(np.int64), counts.astype(np.int64), tops


MODEL_LOADS = threading.Lock()
"""Held by each background thread that loads a model (the embedder, the subject model for the logit lens or the
steering box): two threads importing transformers at once fail (`cannot import name 'AutoModelForCausalLM'`,
seen when a first latent page started the lens while the embedder loaded)."""
_LENS: dict[Path, object] = {}
_LENS_LOCK = threading.Lock()
_LENS_BUILDS: dict[Path, threading.Thread] = {}
_LENS_BUILDS_LOCK = threading.Lock()
_LENS_FAILED: dict[Path, str] = {}


def lens_model(
    store: TableStore,
    model: str | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    wait: bool = True,
):
    """The subject model's unembedding and final norm scale (`resources.unembedding.Unembedding`), what
    `vocab_logits` reads, from the file the activations stage wrote (`unembedding_path`), else from a copy
    written once under `viewer/`, so that the server loads the full model once, ever. `model`, `gguf_file` and
    `revision` are the deployment's `[subject_model]` ones (None: the embedded model); both files are named by the
    model's identity, so weights changed under the same name are read anew. With `wait` False and nothing written
    yet, it is built in a background thread and a sentence saying so (or why the build failed) is
    returned at once: loading a model takes a minute on a busy machine."""
    from resources.subject_model import EMBEDDED, model_identity

    model = model or EMBEDDED
    identity = model_identity(model, gguf_file, revision)
    path = store.layout.unembedding_path(identity)
    if not path.exists():
        path = store.layout.viewer_unembedding_path(identity)
    if wait or path in _LENS or path.exists():
        return _lens_at(path, model, gguf_file)
    name = f"{model}--{gguf_file}" if gguf_file else model
    with _LENS_BUILDS_LOCK:  # not _LENS_LOCK, which a build holds for its whole length
        if path in _LENS_FAILED:
            return f"the logit lens could not load the subject model {name}: {_LENS_FAILED[path]}"
        if path not in _LENS_BUILDS:
            _LENS_BUILDS[path] = threading.Thread(
                target=_build_lens, args=(path, model, gguf_file), daemon=True
            )
            _LENS_BUILDS[path].start()
    return f"loading the subject model {name} for its unembedding (once: it is then kept in {path.parent})"


def _build_lens(path: Path, model: str, gguf_file: str | None) -> None:
    try:
        with MODEL_LOADS:
            _lens_at(path, model, gguf_file)
    except Exception as error:  # shown on the latent page instead of the lens
        _LENS_FAILED[path] = f"{type(error).__name__}: {error}"


def _lens_at(path: Path, model: str, gguf_file: str | None):
    from resources.unembedding import Unembedding, save_unembedding

    with _LENS_LOCK:
        if path in _LENS:
            return _LENS[path]
        if not path.exists():
            from resources.engines import close_engines
            from resources.subject_model import load_causal_lm

            save_unembedding(load_causal_lm(model, gguf_file), path)
            close_engines("subject_model")  # the server keeps the unembedding only
        _LENS[path] = Unembedding(path)
        return _LENS[path]
