"""Everything the latent browser, the exports and the import read from a data root, in one module.

The browser (`app.py`), the indexes (`index.py`) and the exporters call only these functions; the
pipeline's tables they read through its `TableStore` (where each table lives is the store's to say),
the rest (activation caches, corpus, registry, LanceDB) at the places the store's layout names.
Every function reads; none writes (the browser's own caches live in `viewer/` under the root).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from storage.activations import (
    META_FILE,
    ShardActivations,
    load_decoder_directions,
    load_latent_stats,
    read_cache_meta,
    read_latents,
    read_shard,
    shard_keys,
)
from storage.activations import shard_of as shard_of  # the readside's callers ask it here
from storage.content_identity import content_digest
from storage.corpus import load_corpus
from storage.store import StoredTable, TableStore
from storage.vector_store import explanations_table_stamp as explanations_table_stamp_at
from storage.vector_store import open_explanations, sql_quoted

DOCUMENT_BOUNDARY = "‖"


class ExportInputError(Exception):
    """A bad input to the viewer, an export or an import; the message names it and the fix."""


class NotMaterialized(ExportInputError, FileNotFoundError):
    """A table the caller asked for has not been built yet; the message names the asset to materialize."""


def list_coders(store: TableStore) -> list[str]:
    """Coders whose activation cache is complete (`meta.json` is written last); any run of one of a
    coder's shard partitions caches the whole coder."""
    base = store.layout.all_activations_dir
    return (
        sorted(str(p.parent.relative_to(base)) for p in base.glob(f"*/*/{META_FILE}"))
        if base.exists()
        else []
    )


def activations_meta(store: TableStore, coder: str) -> dict:
    """The coder's cache `meta.json`. Only a coder of `list_coders` is looked up: a name from a URL such as
    `../x` or `/etc` must never lead a read, or a cache the viewer writes, outside the data root."""
    known = list_coders(store)
    meta = read_cache_meta(store.layout.activations_dir(coder)) if coder in known else None
    if meta is None:
        known = ", ".join(known) or "none"
        raise NotMaterialized(
            f"No coder {coder!r} under {store.layout.root} (coders with activations: {known}). "
            f"Fix: pick one of those, or materialize `activations` for a partition {coder}|NN."
        )
    return meta


def shard_keys_of(meta: dict) -> list[str]:
    """The shard keys of a coder's cache (`meta.json`): `00` .. its `n_shards - 1`, as its partitions `<coder>|NN`."""
    return shard_keys(int(meta["n_shards"]))


def latent_counts(store: TableStore, coder: str) -> dict[str, np.ndarray]:
    """Per latent: tokens fired on (`count`), largest (`max`) and summed (`sum`) activation; `tokens` cached."""
    return load_latent_stats(store.layout.latent_stats_path(coder))


def shard_activations(store: TableStore, coder: str, shard: str):
    """Every cached (location, activation) pair of one shard (`ShardActivations`)."""
    return read_shard(store.layout.activations_dir(coder), shard)


def latent_activations(store: TableStore, coder: str, latents) -> ShardActivations:
    """Every cached (location, activation) pair of some latents, reading only the shards that hold them."""
    meta = activations_meta(store, coder)
    return read_latents(
        store.layout.activations_dir(coder),
        np.asarray(latents, np.int64),
        int(meta["width"]),
        int(meta["latents_per_shard"]),
    )


def corpus_tokens(store: TableStore) -> np.ndarray:
    """The corpus's token ids `[n_sequences, ctx_len]`: what the cache's locations (sequence, position) index."""
    layout = store.layout
    if not layout.corpus_meta_path.exists():
        raise NotMaterialized(
            f"No corpus under {layout.corpus_dir}. Fix: materialize the `corpus` asset first."
        )
    return load_corpus(layout).tokens


def rows_of(
    table: StoredTable, columns: list[str] | None = None, optional: tuple[str, ...] = ()
) -> pd.DataFrame:
    """The table's rows (or some columns, and those `optional` ones it has: a table written by older code
    lacks newer columns); none (an empty frame) where it has not been written."""
    if columns is not None and optional and table.path.exists():
        have = set(pq.read_schema(table.path).names)
        columns = [*columns, *(c for c in optional if c in have)]
    frame = table.read_if_present(columns)
    return pd.DataFrame() if frame is None else frame


def _read_shards(
    tables: dict[str, StoredTable],
    columns: list[str] | None = None,
    optional: tuple[str, ...] = (),
) -> pd.DataFrame:
    frames = [rows_of(t, columns, optional).assign(shard=s) for s, t in tables.items()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def explanations(
    store: TableStore, coder: str, shards: list[str], columns: list[str] | None = None
) -> pd.DataFrame:
    """Explanation rows (or some columns) of every shard that has them, with a `shard` column."""
    return _read_shards({s: store.explanations(coder, s) for s in shards}, columns)


def explanation_senses(
    store: TableStore, coder: str, shards: list[str], columns: list[str] | None = None
) -> pd.DataFrame:
    """The senses (or some columns) of latents explained as several (`[explanations] senses`), with a `shard` column."""
    return _read_shards({s: store.explanation_senses(coder, s) for s in shards}, columns)


def latent_profiles(store: TableStore, coder: str, shards: list[str]) -> pd.DataFrame:
    """The `latent_profiles` tables written beside the exemplars (quantile boundaries, top tokens,
    decoder neighbours...)."""
    return _read_shards({s: store.latent_profiles(coder, s) for s in shards})


def scorer_names(store: TableStore, coder: str) -> list[str]:
    """Every scorer with a table for this coder in any shard, whatever the scorer: a plugin's tables show
    as the built-ins' do. Sorted by name, as the pipeline lists scorers."""
    return sorted(
        {name for shard in store.scored_shards(coder) for name in store.scorers_of(coder, shard)}
    )


def scorer_info(name: str) -> dict:
    """A scorer's main metric and what its control is. A scorer whose class is not loaded in this process
    (a plugin of another deployment) has no known main metric: its gap is still shown."""
    from assets.scorers import loaded_scorers

    scorer = loaded_scorers().get(name)
    if scorer is None:
        return {
            "main_metric": None,
            "control": f"its control (scorer {name!r} is not loaded: run with the deployment that lists its plugin)",
            "scores_senses": False,
        }
    return {
        "main_metric": scorer.main_metric,
        "control": scorer.control_description(),
        "scores_senses": scorer.scores_senses,
    }


def verdict(gaps: pd.Series, scorer: str) -> str:
    from assets.score_metrics import verdict as _verdict

    return _verdict(gaps, scorer_info(scorer)["control"])


def scores(
    store: TableStore,
    coder: str,
    scorer: str,
    shards: list[str],
    columns: list[str] | None = None,
    optional: tuple[str, ...] = (),
) -> pd.DataFrame:
    """The scorer's rows (or some columns, and the `optional` ones a shard's table has), with a `shard` column."""
    return _read_shards({s: store.scores(coder, s, scorer) for s in shards}, columns, optional)


def calibration(store: TableStore, coder: str, scorer: str, shards: list[str]) -> str | None:
    """The calibration card's line (`assets/cards.py`) of the judge that made most of the scorer's scores of
    this coder; None where no judge made them (a scorer that asks none, or tables from before `models`)."""
    from assets.cards import card_line, judge_of
    from storage.calibration_cards import read_card

    made = scores(store, coder, scorer, shards, columns=["latent"], optional=("models",))
    judges = made["models"].map(judge_of) if "models" in made else pd.Series(dtype=str)
    judges = judges[judges != ""]
    if not len(judges):
        return None
    judge = judges.value_counts().index[0]
    card = read_card(store.layout, judge)
    if card is None:
        return f"judged by {judge}: no calibration card yet (autointerp calibrate)"
    return card_line(card, scorer)


def sense_scores(
    store: TableStore, coder: str, scorer: str, shards: list[str], columns: list[str] | None = None
) -> pd.DataFrame:
    """The scorer's scores (or some columns) of each sense of latents explained as several
    (`sense_scores`), with a `shard` column."""
    return _read_shards({s: store.sense_scores(coder, s, scorer) for s in shards}, columns)


def tokenizer_vocab(store: TableStore) -> list[str]:
    """Token id → the subject tokenizer's own text for it, special tokens included (`<|endoftext|>`)."""
    layout = store.layout
    if not layout.corpus_vocab_path.exists():
        raise NotMaterialized(
            f"No corpus under {layout.corpus_dir}. Fix: materialize the `corpus` asset first."
        )
    return json.loads(layout.corpus_vocab_path.read_text())


def display_vocab(store: TableStore) -> list[str]:
    """Token id → its text, the subject model's special tokens shown as one document boundary `‖`."""
    vocab = tokenizer_vocab(store)
    for i in corpus_meta(store).get("special_ids", []):
        vocab[int(i)] = DOCUMENT_BOUNDARY
    return vocab


_VOCAB: dict[Path, tuple[str, list[str]]] = {}


def display_vocab_cached(store: TableStore) -> list[str]:
    """`display_vocab`, read again only when the corpus changes."""
    layout = store.layout
    current = stamp([layout.corpus_vocab_path, layout.corpus_meta_path])
    held = _VOCAB.get(layout.root)
    if held is None or held[0] != current:
        _VOCAB[layout.root] = held = (current, display_vocab(store))
    return held[1]


def corpus_meta(store: TableStore) -> dict:
    path = store.layout.corpus_meta_path
    return json.loads(path.read_text()) if path.exists() else {}


def registered_coder(store: TableStore, key: str):
    """The registered coder `key` (`resources.sparse_coders.SparseCoder`), loaded and checked."""
    from resources.sparse_coders import load_registered

    return load_registered(store.layout.registry_dir, key)


def stored_decoder_directions(store: TableStore, coder: str) -> tuple[bool, np.ndarray | None]:
    """(found, unit-norm decoder rows memory-mapped or None for a coder without a decoder) as the activations
    stage wrote them with the cache; (False, None) where it did not (a cache made before it did, or the
    registry's coder changed since), and the caller converts the coder's weights itself."""
    from resources.sparse_coders import coder_fingerprint

    folder = store.layout.activations_dir(coder)
    meta = read_cache_meta(folder) or {}
    if (
        "decoder_directions" not in meta
        or not store.layout.coder_registry_dir(coder).is_dir()
        or meta.get("coder_fingerprint") != coder_fingerprint(store.layout.registry_dir, coder)
    ):
        return False, None
    return True, load_decoder_directions(folder) if meta["decoder_directions"] else None


def coder_identity(store: TableStore, coder: str) -> str:
    """The content of the coder's registry files (`storage/content_identity.py`: hashed once per version of
    each file), or '' without them."""
    folder = store.layout.coder_registry_dir(coder)
    return content_digest(folder) if folder.is_dir() else ""


def input_files(store: TableStore, coder: str, shards: list[str]) -> list[os.PathLike]:
    """The files a coder's viewer index is built from: when one changes, the index is rebuilt."""
    files: list[os.PathLike] = [
        store.layout.cache_meta_path(coder),
        store.layout.latent_stats_path(coder),
    ]
    for s in shards:
        files += [
            store.explanations(coder, s),
            store.latent_profiles(coder, s),
            store.explanation_senses(coder, s),
        ]
        files += [
            table
            for name in store.scorers_of(coder, s)
            for table in (store.scores(coder, s, name), store.sense_scores(coder, s, name))
        ]
    return files


def stamp(paths: list[os.PathLike]) -> str:
    """Size and modification time of each file (absent files count too): cheap to check on every request."""
    parts = []
    for p in map(Path, paths):
        try:
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
        except FileNotFoundError:
            parts.append(f"{p.name}:-")
    return "|".join(parts)


def explanation_vectors(
    store: TableStore, coder: str, embedder: str
) -> tuple[int, np.ndarray, np.ndarray, list[str]]:
    """(table version, latents, unit vectors, the texts embedded) of `coder`'s rows in `embedder`'s
    LanceDB explanations table."""
    table = open_explanations_table(store, embedder)
    if table is None:
        return -1, np.zeros(0, np.int64), np.zeros((0, 0), np.float32), []
    version = table.version
    rows = (
        table.search()
        .where(f"coder = {sql_quoted(coder)}")
        .select(["latent", "vector", "explanation"])
        .limit(max(table.count_rows(), 1))
        .to_arrow()
    )
    latents = rows["latent"].to_numpy()
    vectors = (
        np.asarray(
            rows["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32
        ).reshape(len(latents), -1)
        if len(latents)
        else np.zeros((0, 0), np.float32)
    )
    return version, latents.astype(np.int64), vectors, rows["explanation"].to_pylist()


def explanations_table_stamp(store: TableStore, embedder: str) -> str:
    """Changes with every new version of `embedder`'s explanations table; cheap (no lancedb import)."""
    return explanations_table_stamp_at(store.layout.lancedb_dir, embedder)


_TABLES: dict[tuple[Path, str], object] = {}


def open_explanations_table(store: TableStore, embedder: str):
    """`embedder`'s LanceDB explanations table (opened once per process), or None when nothing was
    explained with it yet."""
    key = (store.layout.lancedb_dir, embedder)
    if key not in _TABLES:
        table = open_explanations(store.layout.lancedb_dir, embedder)
        if table is None:
            return None
        _TABLES[key] = table
    table = _TABLES[key]
    table.checkout_latest()
    return table
