"""delphi's files: `autointerp export delphi CODER DIR` writes them, `autointerp import delphi CODER DIR` reads explanations back.

delphi's layout (checked against EleutherAI/delphi: `delphi/__main__.py` writes them with orjson,
`delphi/log/result_analysis.py` reads the scores, `Latent.__repr__` names the files):

    <DIR>/explanations/<module>_latent<N>.txt     a JSON string: the explanation
    <DIR>/scores/<scorer>/<module>_latent<N>.txt  a JSON list, one object per judged window:
        str_tokens, activations, distance (quantile, or -1 for non-activating), activating,
        prediction, probability, correct  (delphi's `ClassifierOutput`)

Our detection and fuzzing scorers are delphi's classifier scorers (delphi calls fuzzing `fuzz`);
only those are written as scores, since delphi's analysis reads only that shape, and only where they
scored the explanation written beside them (not an earlier text of the latent). An imported
explanation becomes an `ok` row of our explanations table (explainer `delphi`), so every scorer
here re-scores it beside a control.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from autointerp_defs.readside import reader
from autointerp_defs.readside.index import CoderIndex
from storage.store import TableStore
from storage.tables import TABLES
from storage.vector_store import sync_explanations

DELPHI_SCORERS = {"detection": "detection", "fuzzing": "fuzz"}
FILE = re.compile(r"^(?P<module>.+)_latent(?P<latent>\d+)\.txt$")


def default_module(coder: str) -> str:
    """delphi's module name for a coder: its hookpoint (e.g. `model.layers.15`)."""
    return coder.split("/", 1)[1]


def export_delphi(data_dir: str, coder: str, out_dir: str, module: str | None = None) -> dict[str, int]:
    """Write explanations and classifier scores of every shard; returns how many files of each kind."""
    store = TableStore.at(data_dir)
    module = module or default_module(coder)
    index = CoderIndex(store, coder)
    vocab = reader.display_vocab(store)
    out = Path(out_dir)
    (out / "explanations").mkdir(parents=True, exist_ok=True)
    written = {"explanations": 0}
    explained = reader.explanations(store, coder, index.shards)
    for row in (explained[explained["status"] == "ok"].itertuples() if len(explained) else []):
        (out / "explanations" / f"{module}_latent{int(row.latent)}.txt").write_text(json.dumps(row.explanation))
        written["explanations"] += 1
    for ours, theirs in DELPHI_SCORERS.items():
        folder = out / "scores" / theirs
        written[theirs] = 0
        for shard in index.shards:
            examples = reader.rows_of(store.scored_examples(coder, shard, ours))
            if not len(examples):
                continue
            scored = reader.rows_of(store.scores(coder, shard, ours))
            stale = set(scored["latent"][reader.stale(scored, reader.rows_of(store.explanations(coder, shard)))]) if len(scored) else set()
            for latent, rows in examples[(examples["source"] == "explanation") & ~examples["latent"].isin(stale)].groupby("latent"):
                test = [w for w in index.windows(int(latent)) if w["split"] == "test"]  # `example` indexes these, in table order
                samples = [_sample(r, test[int(r.example)], vocab) for r in rows.sort_values("example").itertuples() if int(r.example) < len(test)]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{module}_latent{int(latent)}.txt").write_text(json.dumps(samples))
                written[theirs] += 1
    return written


def _sample(row, window: dict, vocab: list[str]) -> dict:
    activating = bool(row.label)
    prediction = None if pd.isna(row.predicted) else bool(row.predicted)
    probability = None if pd.isna(row.score) else float(row.score)
    return {"str_tokens": [vocab[t] for t in window["tokens"]], "activations": [float(a) for a in window["activations"]],
            "distance": int(row.quantile) if activating else -1, "activating": activating, "prediction": prediction,
            "probability": probability, "correct": None if prediction is None else prediction == activating}


def read_delphi_explanations(folder: Path, module: str | None = None) -> dict[int, str]:
    """Latent → explanation from `<folder>/explanations/*.txt` (or `<folder>/*.txt`) of one module."""
    folder = Path(folder)
    base = folder / "explanations" if (folder / "explanations").is_dir() else folder
    found: dict[str, dict[int, str]] = {}
    for path in sorted(base.glob("*.txt")):
        match = FILE.match(path.name)
        if not match:
            continue
        text = json.loads(path.read_text())
        if not isinstance(text, str):
            raise reader.ExportInputError(f"{path} holds {type(text).__name__}, not a JSON string as delphi writes explanations. Fix: point at delphi's explanations folder.")
        found.setdefault(match["module"], {})[int(match["latent"])] = text
    if not found:
        raise reader.ExportInputError(f"No delphi explanation (<module>_latent<N>.txt) under {base}. Fix: pass delphi's run folder (the one holding explanations/).")
    if module is None:
        if len(found) > 1:
            raise reader.ExportInputError(f"{base} holds explanations of several modules ({', '.join(sorted(found))}). Fix: pick one with --module.")
        module = next(iter(found))
    if module not in found:
        raise reader.ExportInputError(f"No explanation of module {module!r} under {base}; it has {', '.join(sorted(found))}. Fix: --module with one of those.")
    return found[module]


def import_delphi(data_dir: str, coder: str, folder: str, module: str | None = None, model: str = "delphi", embedder=None) -> dict[str, list[int]]:
    """Put delphi's explanations into this coder's explanations tables (replacing those latents' rows),
    and into the search index (`embedder`: the deployment's embedder resource, which the scorers and search
    use too); returns per shard the latents imported. Scorers then score them with controls."""
    store = TableStore.at(data_dir)
    meta = reader.activations_meta(store, coder)
    width = int(meta["width"])
    texts = read_delphi_explanations(Path(folder), module)
    outside = [latent for latent in texts if not 0 <= latent < width]
    if outside:
        raise reader.ExportInputError(f"delphi explanations of latents {outside[:5]} do not exist in {coder} (width {width}). Fix: import into the coder they were written for.")
    by_shard: dict[str, list[int]] = {}
    for latent in sorted(texts):
        by_shard.setdefault(reader.shard_of(meta, latent), []).append(latent)
    for shard, latents in by_shard.items():
        exemplars = store.exemplars(coder, shard)
        if not exemplars.exists():
            raise reader.ExportInputError(f"No exemplars for {coder} shard {shard} at {exemplars.location}: imported explanations could not be scored. "
                                    f"Fix: materialize `exemplars` for {coder}|{shard} first.")
        fingerprint = exemplars.fingerprint()
        rows = pd.DataFrame({"latent": np.array(latents, np.int64), "explainer": "delphi", "explanation": [texts[l] for l in latents], "status": "ok",
                             "error": "", "prompt_tokens": 0, "completion_tokens": 0, "model": model, "candidates": [[texts[l]] for l in latents],
                             "candidate_scores": [[float("nan")] for _ in latents], "examples_dropped": 0, "exemplars_fingerprint": fingerprint})
        explanations = store.explanations(coder, shard)
        lock = f"Writing the explanations of {coder} shard {shard} (the explanations asset or another import)"
        with store.writing(explanations, lock=lock, wait=False) as writer:
            held = reader.rows_of(explanations)
            if len(held):  # rows of other latents stay, unless written from older exemplars (the scorers would refuse the table)
                held = held[~held["latent"].isin(latents) & (held["exemplars_fingerprint"] == fingerprint)]
            table = pd.concat([held, rows], ignore_index=True).sort_values("latent") if len(held) else rows
            writer.commit(table[TABLES["explanations"].columns])
            if embedder is None:
                from resources.embedder import EmbedderResource

                embedder = EmbedderResource()
            ok = table[table["status"] == "ok"]
            sync_explanations(store.layout.lancedb_dir, embedder.model, coder, shard, dict(zip(ok["latent"].tolist(), ok["explanation"])), embedder.embed)
    return by_shard
