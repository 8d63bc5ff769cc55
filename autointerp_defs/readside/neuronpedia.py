"""`autointerp export neuronpedia CODER DIR`: a coder in Neuronpedia's batch export layout.

Neuronpedia imports a source from a folder (checked against hijohnnylin/neuronpedia: the webapp's
`app/api/admin/import/route.ts` reads these files, `utils/neuronpedia-utils/.../db_models/*.py` give
the row fields, `convert-saedashboard-to-neuronpedia-export.py` and `batch-autointerp.py` write them):

    <DIR>/<modelId>/<layer>-<setName>/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl   (one row each)
        features/batch-0.jsonl.gz       one `Neuron` row per latent with exemplars
        activations/batch-0.jsonl.gz    one `Activation` row per activating window, with its quantile bin
        explanations/batch-0.jsonl.gz   one `Explanation` row per explained latent, with the explainer model's name

Quantile bins follow the webapp's `activations-list.tsx`: `binMin = -1` marks the top activations
(our explainer's windows); a held-out window of quantile q carries that quantile's activation
interval and the share of activating windows it holds. The interval is widened to hold the max
activation of every window of the bin: the exemplars cut the held-out windows into quantiles by
rank, the boundaries by value over all windows, so a window may lie just outside its quantile's.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from autointerp_defs.readside import reader
from autointerp_defs.readside.index import CoderIndex
from storage.identity import model_name
from storage.store import TableStore

DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"  # Neuronpedia's default creator when none is configured
EXPLANATION_TYPE = "autointerp"


def _id(*parts) -> str:
    """A stable 25-character lowercase id in the shape of Neuronpedia's cuids (re-exports give the same ids)."""
    return "c" + hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:24]


def layer_number(hookpoint: str) -> int:
    """The layer of a hookpoint such as `model.layers.15` or `model.layers.15.mlp`; Neuronpedia names sources by it."""
    found = re.search(r"(?:layers|h|blocks|layer)\.(\d+)", hookpoint)
    if not found:
        raise reader.ExportInputError(f"Cannot tell the layer of hookpoint {hookpoint!r}: Neuronpedia names a source '<layer>-<set>'. Fix: pass --layer N.")
    return int(found.group(1))


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=5) as handle:
        for row in rows:
            handle.write(json.dumps(row, allow_nan=False) + "\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _finite(x) -> float:
    return float(x) if x is not None and np.isfinite(x) else 0.0


def export_neuronpedia(data_dir: str, coder: str, out_dir: str, model_id: str | None = None, set_name: str | None = None, layer: int | None = None,
                       creator_id: str = DEFAULT_CREATOR_ID, creator_name: str = "autointerp", with_lens: bool = True,
                       subject_model: tuple[str | None, str | None] = (None, None)) -> Path:
    """Write the coder's features, activations and explanations; returns the source folder. `subject_model`
    is the deployment's `[subject_model]` (model, gguf_file): the logit lens reads it, and the default
    model id is its name (None: the embedded model)."""
    store = TableStore.at(data_dir)
    meta = reader.activations_meta(store, coder)
    name, hookpoint = coder.split("/", 1)
    model_id = model_id or _model_id(subject_model[0])
    set_name = set_name or re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    source_id = f"{layer if layer is not None else layer_number(hookpoint)}-{set_name}"
    folder = Path(out_dir) / model_id / source_id
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat()
    corpus = reader.corpus_meta(store)
    _write_jsonl(folder / "release.jsonl", [{"name": set_name, "description": f"{coder}, exported by autointerp", "descriptionShort": coder, "creatorName": creator_name,
                                              "creatorNameShort": creator_name, "creatorId": creator_id, "visibility": "PUBLIC", "urls": [], "createdAt": now}])
    _write_jsonl(folder / "model.jsonl", [{"id": model_id, "instruct": "instruct" in model_id.lower(), "displayNameShort": model_id, "displayName": model_id,
                                            "creatorId": creator_id, "createdAt": now, "updatedAt": now}])
    _write_jsonl(folder / "sourceset.jsonl", [{"modelId": model_id, "name": set_name, "creatorId": creator_id, "creatorName": creator_name, "releaseName": set_name,
                                                "description": f"{hookpoint}, {meta['width']} latents", "visibility": "PUBLIC", "createdAt": now}])
    _write_jsonl(folder / "source.jsonl", [{"id": source_id, "modelId": model_id, "setName": set_name, "creatorId": creator_id, "visibility": "PUBLIC",
                                             "dataset": corpus.get("source"), "num_prompts": corpus.get("n_sequences"), "num_tokens_in_prompt": corpus.get("ctx_len"), "createdAt": now}])

    index = CoderIndex(store, coder, subject_model)
    table = index.latents()
    vocab = reader.display_vocab(store)
    stats = reader.latent_profiles(store, coder, index.shards)
    features, activations, explanations = [], [], []
    explained = reader.explanations(store, coder, index.shards)
    for row in stats.itertuples():
        latent = int(row.latent)
        windows = index.windows(latent)
        density = index.density(latent)
        lens = index.logit_lens(latent) if with_lens else None
        neighbours = index.neighbours(latent) or []
        feature = {
            "modelId": model_id, "layer": source_id, "index": str(latent), "creatorId": creator_id, "createdAt": now,
            "maxActApprox": _finite(table["max_activation"].iat[latent]), "hasVector": False, "vector": [],
            "topkCosSimIndices": [n["latent"] for n in neighbours], "topkCosSimValues": [n["cosine"] for n in neighbours],
            "pos_str": [t["token"] for t in lens["promoted"]] if lens else [], "pos_values": [t["logit"] for t in lens["promoted"]] if lens else [],
            "neg_str": [t["token"] for t in lens["suppressed"]] if lens else [], "neg_values": [t["logit"] for t in lens["suppressed"]] if lens else [],
            "frac_nonzero": _finite(table["frequency"].iat[latent]),
            "freq_hist_data_bar_heights": [int(c) for c in density["counts"]],
            "freq_hist_data_bar_values": [round((a + b) / 2, 4) for a, b in zip(density["edges"][:-1], density["edges"][1:])],
            "logits_hist_data_bar_heights": lens["histogram"]["counts"] if lens else [],
            "logits_hist_data_bar_values": [round((a + b) / 2, 4) for a, b in zip(lens["histogram"]["edges"][:-1], lens["histogram"]["edges"][1:])] if lens else [],
        }
        features.append(feature)
        activating = [w for w in windows if w["kind"] == "activating"]
        boundaries = list(row.quantile_boundaries)
        n_q = len(boundaries) - 1
        held_out = [w for w in activating if w["quantile"] > 0]
        peaks = {}  # quantile → the max activation of each of its windows
        for w in held_out:
            peaks.setdefault(int(w["quantile"]), []).append(max(float(a) for a in w["activations"]))
        for i, w in enumerate(activating):
            values = [float(a) for a in w["activations"]]
            top = int(np.argmax(values))
            if w["quantile"] > 0 and n_q > 0:
                q = int(w["quantile"])
                bin_min = min(float(boundaries[n_q - q]), *peaks[q])
                bin_max = max(float(boundaries[n_q - q + 1]), *peaks[q])
                contains = len(peaks[q]) / max(len(held_out), 1)
            else:
                bin_min, bin_max, contains = -1.0, -1.0, None
            activations.append({
                "id": _id(source_id, latent, w["split"], w["sequence"], w["start"]), "tokens": [vocab[t] for t in w["tokens"]],
                "modelId": model_id, "layer": source_id, "index": str(latent), "maxValue": values[top], "maxValueTokenIndex": top,
                "minValue": min(values), "values": values, "creatorId": creator_id, "createdAt": now, "dataSource": corpus.get("source"),
                "dataIndex": str(w["sequence"]), "binMin": bin_min, "binMax": bin_max, "binContains": contains, "qualifyingTokenIndex": top,
            })
    if len(explained):
        for row in explained[explained["status"] == "ok"].itertuples():
            explanations.append({"id": _id(source_id, row.latent, "explanation"), "modelId": model_id, "layer": source_id, "index": str(int(row.latent)),
                                 "description": row.explanation, "authorId": creator_id, "typeName": f"{EXPLANATION_TYPE}-{row.explainer}",
                                 "explanationModelName": model_name(row.model), "createdAt": now})
    _write_jsonl_gz(folder / "features" / "batch-0.jsonl.gz", features)
    _write_jsonl_gz(folder / "activations" / "batch-0.jsonl.gz", activations)
    _write_jsonl_gz(folder / "explanations" / "batch-0.jsonl.gz", explanations)
    return folder


def _model_id(name: str | None) -> str:
    """Neuronpedia's model id for the subject model: the model's folder name, lowercased (e.g. smollm2-135m-instruct)."""
    from resources.subject_model import EMBEDDED

    if name is None or name == EMBEDDED:
        return "smollm2-135m-instruct"
    return name.rstrip("/").split("/")[-1].lower()


def read_neuronpedia(folder: Path) -> dict[str, list[dict]]:
    """Every row of an export folder, by table (features, activations, explanations, and the one-row tables)."""
    out = {}
    for table in ("features", "activations", "explanations"):
        out[table] = [json.loads(line) for path in sorted((folder / table).glob("*.jsonl.gz")) for line in gzip.open(path, "rt", encoding="utf-8")]
    for table in ("release", "model", "sourceset", "source"):
        out[table] = [json.loads(line) for line in (folder / f"{table}.jsonl").read_text().splitlines() if line]
    return out
