"""Everything the latent browser and the exports read from a data root, in one module.

The browser (`app.py`), the indexes (`index.py`) and the exporters call only these
functions, so when a table moves or changes its columns, this is the one file to change.
Every function reads; none writes (the viewer's own caches live in `viewer/` under the root).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from storage.activations import LATENT_STATS_FILE, META_FILE, load_latent_stats, read_cache_meta, read_shard, shard_keys, shard_of_latents
from storage.layout import DataRoot

DOCUMENT_BOUNDARY = "‖"


class ExportInputError(Exception):
    """A bad input to the viewer, an export or an import; the message names it and the fix."""


class NotMaterialized(ExportInputError, FileNotFoundError):
    """A table the caller asked for has not been built yet; the message names the asset to materialize."""


def viewer_dir(root: DataRoot, coder: str | None = None) -> Path:
    """Where the viewer keeps its lazily built indexes (safe to delete: they are rebuilt)."""
    return root.root / "viewer" / coder if coder else root.root / "viewer"


def list_coders(root: DataRoot) -> list[str]:
    """Coders whose activation cache is complete (`meta.json` is written last); any run of one of a
    coder's shard partitions caches the whole coder."""
    base = root.root / "activations"
    return sorted(str(p.parent.relative_to(base)) for p in base.glob(f"*/*/{META_FILE}")) if base.exists() else []


def activations_meta(root: DataRoot, coder: str) -> dict:
    """The coder's cache `meta.json`. Only a coder of `list_coders` is looked up: a name from a URL such as
    `../x` or `/etc` must never lead a read, or a cache the viewer writes, outside the data root."""
    known = list_coders(root)
    meta = read_cache_meta(root.activations_dir(coder)) if coder in known else None
    if meta is None:
        known = ", ".join(known) or "none"
        raise NotMaterialized(f"No coder {coder!r} under {root.root} (coders with activations: {known}). "
                              f"Fix: pick one of those, or materialize `activations` for a partition {coder}|NN.")
    return meta


def shard_keys_of(meta: dict) -> list[str]:
    """The shard keys of a coder's cache (`meta.json`): `00` .. its `n_shards - 1`, as its partitions `<coder>|NN`."""
    return shard_keys(int(meta["n_shards"]))


def shard_index_of(meta: dict, latents: np.ndarray) -> np.ndarray:
    """Index of the shard holding each latent, by the cache's `latents_per_shard`."""
    return shard_of_latents(np.asarray(latents), int(meta["latents_per_shard"]))


def shard_of(meta: dict, latent: int) -> str:
    return shard_keys_of(meta)[int(shard_index_of(meta, np.array([latent]))[0])]


def latent_counts_path(root: DataRoot, coder: str) -> Path:
    return root.activations_dir(coder) / LATENT_STATS_FILE


def latent_counts(root: DataRoot, coder: str) -> dict[str, np.ndarray]:
    """Per latent: tokens fired on (`count`), largest (`max`) and summed (`sum`) activation; `tokens` cached."""
    return load_latent_stats(latent_counts_path(root, coder))


def shard_activations(root: DataRoot, coder: str, shard: str):
    """Every cached (location, activation) pair of one shard (`ShardActivations`)."""
    return read_shard(root.activations_dir(coder), shard)


def _read_shards(paths: dict[str, Path]) -> pd.DataFrame:
    frames = [pd.read_parquet(p).assign(shard=s) for s, p in paths.items() if p.exists()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def explanations(root: DataRoot, coder: str, shards: list[str]) -> pd.DataFrame:
    """Explanation rows of every shard that has them, with a `shard` column."""
    return _read_shards({s: root.explanations_path(coder, s) for s in shards})


def explanations_shard(root: DataRoot, coder: str, shard: str) -> pd.DataFrame:
    path = root.explanations_path(coder, shard)
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def explanations_path(root: DataRoot, coder: str, shard: str) -> Path:
    return root.explanations_path(coder, shard)


def latent_profiles(root: DataRoot, coder: str, shards: list[str]) -> pd.DataFrame:
    """The `latent_profiles` tables written beside the exemplars (quantile boundaries, top tokens, decoder neighbours...)."""
    return _read_shards({s: root.latent_profiles_path(coder, s) for s in shards})


def latent_profiles_path(root: DataRoot, coder: str, shard: str) -> Path:
    return root.latent_profiles_path(coder, shard)


def scorer_names(root: DataRoot, coder: str) -> list[str]:
    """Every scorer with a table for this coder (`scores/<coder>/<shard>/<scorer>.parquet`), whatever the
    scorer: a plugin's tables show as the built-ins' do. Sorted by name, as the pipeline lists scorers."""
    base = root.root / "scores" / coder
    found = {p.stem for p in base.glob("*/*.parquet") if not p.name.endswith(".examples.parquet")} if base.exists() else set()
    return sorted(found)


def scorer_info(name: str) -> dict:
    """A scorer's main metric and what its control is. A scorer whose class is not loaded in this process
    (a plugin of another deployment) has no known main metric: its gap is still shown."""
    from assets.scorers import loaded_scorers

    scorer = loaded_scorers().get(name)
    if scorer is None:
        return {"main_metric": None, "control": f"its control (scorer {name!r} is not loaded: run with the deployment that lists its plugin)"}
    return {"main_metric": scorer.main_metric, "control": scorer.control_description()}


def stale(scored: pd.DataFrame, explained: pd.DataFrame) -> pd.Series:
    """Per row of a scores table: whether it scored a text other than its latent's current explanation
    (the latent's last row of the explanations table, status ok), so that no score is shown or exported
    beside an explanation it did not judge. A row with an empty `explanation` scored the latent itself
    (the intruder scorer) and is never stale."""
    if not len(scored):
        return pd.Series(False, index=scored.index)
    current = pd.Series(dtype=object)
    if len(explained):
        last = explained.drop_duplicates("latent", keep="last").set_index("latent")
        current = last["explanation"].where(last["status"] == "ok")
    text = scored["explanation"].fillna("")
    return (text != "") & (text != scored["latent"].map(current))


def verdict(gaps: pd.Series, scorer: str) -> str:
    from assets.score_metrics import verdict as _verdict

    return _verdict(gaps, scorer_info(scorer)["control"])


def scores(root: DataRoot, coder: str, scorer: str, shards: list[str]) -> pd.DataFrame:
    return _read_shards({s: root.scores_path(coder, s, scorer) for s in shards})


def scores_shard(root: DataRoot, coder: str, shard: str, scorer: str) -> pd.DataFrame:
    path = root.scores_path(coder, shard, scorer)
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def scored_examples(root: DataRoot, coder: str, shard: str, scorer: str, latent: int | None = None) -> pd.DataFrame:
    path = root.scored_examples_path(coder, shard, scorer)
    if not path.exists():
        return pd.DataFrame()
    return pd.read_parquet(path, filters=[("latent", "=", int(latent))] if latent is not None else None)


def exemplars_path(root: DataRoot, coder: str, shard: str) -> Path:
    return root.exemplars_path(coder, shard)


def display_vocab(root: DataRoot) -> list[str]:
    """Token id → its text, the subject model's special tokens shown as one document boundary `‖`."""
    if not (root.corpus_dir / "vocab.json").exists():
        raise NotMaterialized(f"No corpus under {root.corpus_dir}. Fix: materialize the `corpus` asset first.")
    vocab = json.loads((root.corpus_dir / "vocab.json").read_text())
    meta = json.loads((root.corpus_dir / "meta.json").read_text())
    for i in meta.get("special_ids", []):
        vocab[int(i)] = DOCUMENT_BOUNDARY
    return vocab


_VOCAB: dict[Path, tuple[str, list[str]]] = {}


def display_vocab_cached(root: DataRoot) -> list[str]:
    """`display_vocab`, read again only when the corpus changes."""
    current = stamp([root.corpus_dir / "vocab.json", root.corpus_dir / "meta.json"])
    held = _VOCAB.get(root.root)
    if held is None or held[0] != current:
        _VOCAB[root.root] = held = (current, display_vocab(root))
    return held[1]


def corpus_meta(root: DataRoot) -> dict:
    path = root.corpus_dir / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def decoder_rows(root: DataRoot, coder: str):
    """The coder's decoder directions `[width, d_in]` (torch), or None for coders without a decoder (neurons)."""
    from resources.sparse_coders import load_registered

    return load_registered(root.registry_dir, coder).decoder_weight


def registry_files(root: DataRoot, coder: str) -> list[Path]:
    folder = root.registry_dir / coder
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.exists() else []


def input_files(root: DataRoot, coder: str, shards: list[str]) -> list[Path]:
    """The files a coder's viewer index is built from: when one changes, the index is rebuilt."""
    files = [root.activations_dir(coder) / META_FILE, latent_counts_path(root, coder)]
    for s in shards:
        files += [root.explanations_path(coder, s), root.latent_profiles_path(coder, s)]
        folder = root.scores_path(coder, s, "x").parent
        if folder.exists():
            files += sorted(p for p in folder.glob("*.parquet") if not p.name.endswith(".examples.parquet"))
    return files


def stamp(paths: list[Path]) -> str:
    """Size and modification time of each file (absent files count too): cheap to check on every request."""
    parts = []
    for p in paths:
        try:
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
        except FileNotFoundError:
            parts.append(f"{p.name}:-")
    return "|".join(parts)


def explanation_vectors(root: DataRoot, coder: str, embedder: str) -> tuple[int, np.ndarray, np.ndarray]:
    """(table version, latents, unit vectors) of `coder`'s rows in `embedder`'s LanceDB explanations table."""
    table = open_explanations_table(root, embedder)
    if table is None:
        return -1, np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    version = table.version
    safe = coder.replace("'", "''")
    rows = table.search().where(f"coder = '{safe}'").select(["latent", "vector"]).limit(max(table.count_rows(), 1)).to_arrow()
    latents = rows["latent"].to_numpy()
    vectors = np.asarray(rows["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(latents), -1) if len(latents) else np.zeros((0, 0), np.float32)
    return version, latents.astype(np.int64), vectors


def explanations_table_version(root: DataRoot, embedder: str) -> int:
    table = open_explanations_table(root, embedder)
    return -1 if table is None else table.version


_TABLES: dict[Path, object] = {}


def open_explanations_table(root: DataRoot, embedder: str):
    """`embedder`'s LanceDB explanations table (opened once per process), or None when nothing was explained with it yet."""
    from storage.vector_store import explanations_table_name

    name = explanations_table_name(embedder)
    path = root.lancedb_dir / f"{name}.lance"
    if path not in _TABLES:
        if not path.exists():
            return None
        import lancedb

        _TABLES[path] = lancedb.connect(str(root.lancedb_dir)).open_table(name)
    table = _TABLES[path]
    table.checkout_latest()
    return table
