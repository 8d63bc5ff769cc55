"""`autointerp export neuronpedia CODER DIR`: a coder in the folder layout Neuronpedia's importer reads.

Checked against hijohnnylin/neuronpedia (ebb8426f): the webapp's `app/api/admin/import/route.ts` creates
the one-row tables with Prisma (the release inside a try; model, source set and source outside one, so a
rejected row stops the import) and hands each batch file to `lib/db/import.ts::importJsonlString`, an
`INSERT … SELECT … FROM jsonb_to_recordset(…) ON CONFLICT DO NOTHING` over the columns named by the
file's first line (keys that are no column are dropped without a word):

    <DIR>/<modelId>/<layer>-<setName>/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl   (one row each)
        features/batch-<n>.jsonl.gz       one `Neuron` per latent of the coder, explained or not
        activations/batch-<n>.jsonl.gz    one `Activation` per activating exemplar window, with its bin
        explanations/batch-<n>.jsonl.gz   one `Explanation` per explained latent (per sense, for one of several senses)

Each table is split into batches of at most `BATCH_BYTES` of JSON lines, as Neuronpedia's own dumps are
(`utils/neuronpedia-utils/.../export-data.py`, 1024 features a batch): the route reads a batch into one
string (Node's longest is about 512 MiB) and inserts it 65,000 lines at a time (about 200 MB at most, says
`import.ts`).

An explanation's scores (each scorer's main metric with its 95 % interval, beside its control; a sense's
on the sense's own windows) go into its `notes`: the import takes no `ExplanationScore` rows (it reads
only the three folders above, and those rows name score types and users of Neuronpedia's own config), and
`scoreV1`/`scoreV2` are its own simulation scores, by which it orders a feature's explanations. A row's
id leaves the scores out, so a re-export after a re-score is skipped by the import like any unchanged
explanation.

Bins follow Neuronpedia's own dashboards (SAEDashboard): the top activations have `binMin = -1`,
`binMax` the latent's largest activation and `binContains = -1`; every other window sits in an
interval of activation values with the share of the corpus's tokens whose activation lies in it.
Ids are a hash of the row (model, source, latent and content), so a re-export of an unchanged row is
skipped by the import and a changed explanation arrives as a new one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from assets.senses import of_current
from autointerp_defs.readside import reader
from autointerp_defs.readside.index import LOGIT_BINS, CoderIndex
from storage.atomic import json_safe
from storage.content_identity import model_name
from storage.store import TableStore

DEFAULT_CREATOR_ID = (
    "clkht01d40000jv08hvalcvly"  # the bot user Neuronpedia's seed creates, its default creator
)

# Neuronpedia's explanation types and explainer models are rows of its own config, which the import
# upserts from its bucket before anything else; an export cannot add one, and a name that is not there
# fails the Explanation's foreign key, and with it the whole batch. Names from its code: the explainer
# types of `batch-autointerp.py` and `app/api/explanation/generate/route.tsx` (`eleuther_acts_top20`
# runs delphi's DefaultExplainer, `apps/autointerp/.../explain/default.py`), the explainer models of
# `batch-autointerp.py` (which it writes without their provider prefix). Others go into `notes`.
EXPLANATION_TYPES = {"highlighted": "eleuther_acts_top20", "token_table": "oai_token-act-pair"}
EXPLANATION_MODELS = frozenset(
    {
        "gpt-4o-mini",
        "gpt-4.1-nano",
        "gpt-5-nano",
        "gpt-5-nano-2025-08-07",
        "gpt-5-mini-2025-08-07",
        "gemini-2.0-flash",
        "gemini-2.0-flash-lite",
        "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
        "gpt-oss-120b",
    }
)
UNKNOWN_OWNER = (
    "custom"  # what Neuronpedia's own model form records for a model it knows no owner of
)
BATCH_BYTES = 100 * 2**20
"""The most JSON a batch file holds (uncompressed): far below what Neuronpedia's import can read as one."""
IMPORT_ROUTE = "/api/admin/import"
"""Neuronpedia's import (`app/api/admin/import/route.ts`): it reads `v1/<modelId>/<sourceId>/` of the
dataset bucket (`lib/utils/s3.ts`: DATASET_BUCKET, DATASET_BASE_PATH)."""


def content_id(row: dict) -> str:
    """A 25-character id in the shape of Neuronpedia's cuids: a hash of everything in the row but its id and times."""
    content = {k: v for k, v in row.items() if k not in ("id", "createdAt", "updatedAt")}
    return "c" + hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]


def sense_texts(senses: pd.DataFrame) -> dict[tuple[str, int], list[str]]:
    """(shard, latent) → its senses' explanations in sense order: Neuronpedia gets one explanation per sense."""
    if not len(senses):
        return {}
    return {
        (shard, int(latent)): rows.sort_values("sense")["explanation"].tolist()
        for (shard, latent), rows in senses.groupby(["shard", "latent"])
    }


def score_notes(scores: dict[str, pd.DataFrame]) -> dict[tuple[str, int, str], str]:
    """(shard, latent, text) → that text's scores in words, from each scorer's `scores` or `sense_scores` rows:
    its main metric with its 95 % interval (where the table has one) beside its control, e.g. `detection
    balanced_accuracy 0.820 [0.710, 0.900] vs control 0.500`. Keyed by the text a score was made with, so that
    none is shown beside another."""
    notes: dict[tuple[str, int, str], list[str]] = {}

    def number(x: float | None) -> str:
        return f"{x:.3f}" if x is not None and np.isfinite(x) else "none"

    for name, frame in scores.items():
        main = reader.scorer_info(name)["main_metric"]
        for row in frame.to_dict("records") if main and len(frame) else []:
            lo, hi = row.get(f"{main}_lo"), row.get(f"{main}_hi")
            interval = (
                f" [{number(lo)}, {number(hi)}]"
                if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)
                else ""
            )
            notes.setdefault((row["shard"], int(row["latent"]), row["explanation"]), []).append(
                f"{name} {main} {number(row[main])}{interval} vs control {number(row[f'control_{main}'])}"
            )
    return {key: ", ".join(parts) for key, parts in notes.items()}


def explanation_type(explainer: str) -> str | None:
    """Neuronpedia's explanation type for one of our explainers, None where it defines none that is the same method."""
    return EXPLANATION_TYPES.get(explainer)


def explanation_model(identity: str) -> str | None:
    """Neuronpedia's name of the explainer model of `identity` (`openai:openai/gpt-4o-mini` →
    `gpt-4o-mini`), None where it has none."""
    name = model_name(identity).rsplit("/", 1)[-1]
    return name if name in EXPLANATION_MODELS else None


def layer_number(hookpoint: str) -> int:
    """The layer of a hookpoint such as `model.layers.15` or `model.layers.15.mlp`; Neuronpedia names sources by it."""
    found = re.search(r"(?:layers|h|blocks|layer)\.(\d+)", hookpoint)
    if not found:
        raise reader.ExportInputError(
            f"Cannot tell the layer of hookpoint {hookpoint!r}: "
            "Neuronpedia names a source '<layer>-<set>'. Fix: pass --layer N."
        )
    return int(found.group(1))


def activation_bins(
    windows: list[dict],
    boundaries: list[float],
    activations: np.ndarray,
    n_tokens: int,
    max_activation: float,
) -> list[tuple[float, float, float]]:
    """(binMin, binMax, binContains) of each of a latent's activating windows. The explainer's windows at least as
    strong as every held-out one are its top activations; any other window sits in the interval of the latent's
    window quantiles (`boundaries`) that holds its peak, with the share of the corpus's `n_tokens` tokens whose
    activation (`activations`: the latent's non-zero ones) lies in it, as Neuronpedia's dashboards count."""
    peaks = [max(w["activations"]) for w in windows]
    ceiling = max(
        (p for w, p in zip(windows, peaks, strict=False) if w["split"] != "train"), default=-np.inf
    )
    values = np.sort(activations)
    bins = []
    for w, peak in zip(windows, peaks, strict=False):
        if w["split"] == "train" and peak >= ceiling:
            bins.append((-1.0, float(max_activation), -1.0))
            continue
        i = int(np.clip(np.searchsorted(boundaries, peak, "right") - 1, 0, len(boundaries) - 2))
        low, high = float(boundaries[i]), float(boundaries[i + 1])
        inside = np.searchsorted(values, high, "right") - np.searchsorted(values, low, "left")
        bins.append((low, high, float(inside) / max(n_tokens, 1)))
    return bins


def dataset_name(corpus: dict) -> str | None:
    """What the corpus was read from, as Neuronpedia's `Source.dataset` names it: a Hugging Face dataset id, a file's
    name, or what the embedded corpus is."""
    from assets.corpus import EMBEDDED_CORPUS, LOCAL_SUFFIXES

    source = corpus.get("source")
    if source is None or source == "embedded":
        return EMBEDDED_CORPUS if source else None
    path = Path(source).expanduser()
    return (
        path.name
        if path.suffix in LOCAL_SUFFIXES or path.is_absolute() or path.exists()
        else source
    )


def model_row(
    model_id: str, subject_model: tuple[str | None, str | None], creator_id: str, now: str
) -> dict:
    """Neuronpedia's `Model`: its layers, MLP neurons per layer and width from the subject model's config, its
    owner from its hub id."""
    from resources.subject_model import EMBEDDED, EMBEDDED_ORIGIN, load_model_config

    model, gguf_file = subject_model
    config = load_model_config(model or EMBEDDED, gguf_file)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    origin = EMBEDDED_ORIGIN if model in (None, EMBEDDED) else model
    on_hub = origin.count("/") == 1 and not Path(origin).expanduser().exists()
    return {
        "id": model_id,
        "displayNameShort": model_id,
        "displayName": model_id,
        "creatorId": creator_id,
        "instruct": "instruct" in model_id.lower(),
        "layers": int(config.num_hidden_layers),
        "neuronsPerLayer": int(getattr(config, "intermediate_size", 0) or 0),
        "dimension": int(config.hidden_size),
        "owner": origin.split("/")[0] if on_hub else UNKNOWN_OWNER,
        "visibility": "PUBLIC",
        "createdAt": now,
        "updatedAt": now,
    }


def _write_batches(folder: Path, rows: list[dict], limit: int) -> int:
    """`rows` as `batch-<n>.jsonl.gz` files of at most `limit` bytes of JSON lines each (a longer row alone);
    returns how many. None for no rows (the importer parses a batch's first line, and an empty one stops the
    import). An earlier export's batches go first: the import reads every file in the folder."""
    for old in folder.glob("*.jsonl.gz"):
        old.unlink()
    handle, size, batches = None, 0, 0
    try:
        for row in rows:
            line = json.dumps(row, allow_nan=False) + "\n"  # ASCII: its length is its size
            if handle is None or (size and size + len(line) > limit):
                if handle is not None:
                    handle.close()
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"batch-{batches}.jsonl.gz"
                handle = gzip.open(path, "wt", encoding="utf-8", compresslevel=5)
                batches, size = batches + 1, 0
            handle.write(line)
            size += len(line)
    finally:
        if handle is not None:
            handle.close()
    return batches


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _with_id(row: dict) -> dict:
    return {"id": content_id(row), **row}


def export_neuronpedia(
    data_dir: str,
    coder: str,
    out_dir: str,
    model_id: str | None = None,
    set_name: str | None = None,
    layer: int | None = None,
    creator_id: str = DEFAULT_CREATOR_ID,
    creator_name: str = "autointerp",
    with_lens: bool = True,
    subject_model: tuple[str | None, str | None] = (None, None),
    batch_bytes: int = BATCH_BYTES,
    say: Callable[[str], None] = lambda line: None,
) -> Path:
    """Write the coder's features, activations and explanations; returns the source folder. `subject_model`
    is the deployment's `[subject_model]` (model, gguf_file): the logit lens and the `Model` row read it, and
    the default model id is its name (None: the embedded model). `say` is told each step, the counts
    written, a warning for latents without windows, and how to import the folder."""
    store = TableStore.at(data_dir)
    meta = reader.activations_meta(store, coder)
    name, hookpoint = coder.split("/", 1)
    model_id = model_id or default_model_id(subject_model[0])
    set_name = set_name or re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    source_id = f"{layer if layer is not None else layer_number(hookpoint)}-{set_name}"
    folder = Path(out_dir) / model_id / source_id
    say(f"exporting {coder} ({meta['width']} latents) to Neuronpedia as {model_id}/{source_id}")
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    corpus = reader.corpus_meta(store)
    dataset = dataset_name(corpus)
    vocab = reader.tokenizer_vocab(store)
    index = CoderIndex(store, coder, subject_model)
    table = index.latents()
    latents = table["latent"].astype(int).tolist()
    neuron = {
        "modelId": model_id,
        "layer": source_id,
        "sourceSetName": set_name,
        "creatorId": creator_id,
        "createdAt": now,
    }

    say("features: " + ("the logit lens, " if with_lens else "") + "neighbours and histograms")
    lens = index.vocab_projection(latents, bins=LOGIT_BINS) if with_lens else None
    neighbours = index.neighbours_of(latents) or [[] for _ in latents]

    def token(i) -> str:
        return vocab[int(i)] if int(i) < len(vocab) else f"<{int(i)}>"

    features = []
    for at, (latent, near) in enumerate(zip(latents, neighbours, strict=False)):
        density = index.density(latent)
        # Neuronpedia's number columns take no null: a NaN or infinite value is written as 0
        features.append(
            {
                **neuron,
                "index": str(latent),
                "maxActApprox": json_safe(table["max_activation"].iat[at]) or 0.0,
                "hasVector": False,
                "vector": [],
                "topkCosSimIndices": [n["latent"] for n in near],
                "topkCosSimValues": [n["cosine"] for n in near],
                "pos_str": [token(i) for i in lens.top_ids[at]] if lens else [],
                "pos_values": [round(float(v), 3) for v in lens.top_values[at]] if lens else [],
                "neg_str": [token(i) for i in lens.bottom_ids[at]] if lens else [],
                "neg_values": [round(float(v), 3) for v in lens.bottom_values[at]] if lens else [],
                "frac_nonzero": json_safe(table["frequency"].iat[at]) or 0.0,
                "freq_hist_data_bar_heights": [int(c) for c in density["counts"]],
                "freq_hist_data_bar_values": [
                    round((a + b) / 2, 4)
                    for a, b in zip(density["edges"][:-1], density["edges"][1:], strict=False)
                ],
                "logits_hist_data_bar_heights": lens.histograms[at][0] if lens else [],
                "logits_hist_data_bar_values": [
                    round((a + b) / 2, 4)
                    for a, b in zip(
                        lens.histograms[at][1][:-1], lens.histograms[at][1][1:], strict=False
                    )
                ]
                if lens
                else [],
            }
        )

    activations, window_length = [], None
    n_tokens = int(reader.latent_counts(store, coder)["tokens"][0])
    for at, shard in enumerate(index.shards):
        say(
            f"activations: shard {shard} ({at + 1} of {len(index.shards)}), {len(activations)} so far"
        )
        profiles = reader.rows_of(store.latent_profiles(coder, shard))
        if not len(profiles):
            continue
        boundaries = dict(
            zip(profiles["latent"].astype(int), profiles["quantile_boundaries"], strict=False)
        )
        for latent, _, values in reader.shard_activations(store, coder, shard).by_latent():
            if latent not in boundaries:
                continue
            windows = [w for w in index.windows(latent) if w["kind"] == "activating"]
            bins = activation_bins(
                windows,
                list(boundaries[latent]),
                values,
                n_tokens,
                table["max_activation"].iat[latent],
            )
            for w, (bin_min, bin_max, contains) in zip(windows, bins, strict=False):
                window_length = len(w["tokens"])
                values_shown = [float(a) for a in w["activations"]]
                top = int(np.argmax(values_shown))
                activations.append(
                    _with_id(
                        {
                            "tokens": [token(t) for t in w["tokens"]],
                            "modelId": model_id,
                            "layer": source_id,
                            "index": str(latent),
                            "maxValue": values_shown[top],
                            "maxValueTokenIndex": top,
                            "minValue": min(values_shown),
                            "values": values_shown,
                            "creatorId": creator_id,
                            "createdAt": now,
                            "dataSource": dataset,
                            "dataIndex": str(w["sequence"]),
                            "binMin": bin_min,
                            "binMax": bin_max,
                            "binContains": contains,
                            "qualifyingTokenIndex": top,
                        }
                    )
                )

    say("explanations, with their scores in their notes")
    explanations = []
    explained = reader.explanations(store, coder, index.shards)
    senses = sense_texts(
        of_current(reader.explanation_senses(store, coder, index.shards), explained)
    )  # not those of an explanation since replaced
    scored = score_notes(
        {name: reader.scores(store, coder, name, index.shards) for name in index.scorers}
    )
    sense_scored = score_notes(
        {name: reader.sense_scores(store, coder, name, index.shards) for name in index.scorers}
    )
    if len(explained):
        for row in explained[explained["status"] == "ok"].itertuples():
            texts = senses.get((row.shard, int(row.latent)), [])
            several = len(texts) > 1
            for text in texts if several else [row.explanation]:
                exported = _with_id(
                    {
                        "modelId": model_id,
                        "layer": source_id,
                        "index": str(int(row.latent)),
                        "description": text,
                        "authorId": creator_id,
                        "typeName": explanation_type(row.explainer),
                        "explanationModelName": explanation_model(row.model),
                        "notes": f"autointerp explainer '{row.explainer}', explainer model {model_name(row.model)}"
                        + (f"; one of {len(texts)} senses" if several else ""),
                        "createdAt": now,
                        "updatedAt": now,
                    }
                )
                key = (row.shard, int(row.latent), text)
                scores = sense_scored.get(key) if several else scored.get(key)
                said = "scored on its own windows" if several else "scored"
                explanations.append(
                    {**exported, "notes": f"{exported['notes']}; {said}: {scores}"}
                    if scores
                    else exported
                )

    folder.mkdir(parents=True, exist_ok=True)
    _write_jsonl(
        folder / "release.jsonl",
        [
            {
                "name": set_name,
                "description": f"{coder}, exported by autointerp",
                "descriptionShort": coder,
                "creatorName": creator_name,
                "creatorNameShort": creator_name,
                "creatorId": creator_id,
                "visibility": "PUBLIC",
                "urls": [],
                "createdAt": now,
            }
        ],
    )
    _write_jsonl(folder / "model.jsonl", [model_row(model_id, subject_model, creator_id, now)])
    _write_jsonl(
        folder / "sourceset.jsonl",
        [
            {
                "modelId": model_id,
                "name": set_name,
                "creatorId": creator_id,
                "creatorName": creator_name,
                "releaseName": set_name,
                "description": f"{hookpoint}, {meta['width']} latents",
                "visibility": "PUBLIC",
                "urls": [],
                "createdAt": now,
            }
        ],
    )
    # Neuronpedia shows "<num_prompts> prompts, <num_tokens_in_prompt> tokens each": the windows
    # shown, and the corpus in windows
    _write_jsonl(
        folder / "source.jsonl",
        [
            {
                "id": source_id,
                "modelId": model_id,
                "setName": set_name,
                "creatorId": creator_id,
                "visibility": "PUBLIC",
                "dataset": dataset,
                "num_prompts": corpus["n_tokens"] // window_length
                if window_length and "n_tokens" in corpus
                else None,
                "num_tokens_in_prompt": window_length,
                "createdAt": now,
            }
        ],
    )
    for kind, rows in (
        ("features", features),
        ("activations", activations),
        ("explanations", explanations),
    ):
        batches = _write_batches(folder / kind, rows, batch_bytes)
        say(f"{kind}: {len(rows)} rows in {batches} batch file{'s' * (batches != 1)}")
    shown = len({row["index"] for row in activations})
    if shown < len(latents):
        say(
            f"warning: {len(latents) - shown} of {len(latents)} features have no activation windows "
            "(dead, firing in fewer windows than [exemplars] min_activating_windows, or in a shard "
            "without exemplars): they are exported without activations"
        )
    say(f"wrote {folder}")
    say(
        f"to import it: upload this folder as v1/{model_id}/{source_id}/ of the dataset bucket that "
        f"Neuronpedia's webapp reads (lib/utils/s3.ts), then open "
        f"{IMPORT_ROUTE}?modelId={model_id}&sourceId={source_id} on the webapp "
        "(on localhost, or signed in as an admin)"
    )
    return folder


def default_model_id(name: str | None) -> str:
    """Neuronpedia's model id for the subject model: the model's folder name, lowercased (e.g.
    smollm2-135m-instruct)."""
    from resources.subject_model import EMBEDDED, EMBEDDED_ORIGIN

    return (
        (EMBEDDED_ORIGIN if name in (None, EMBEDDED) else name).rstrip("/").split("/")[-1].lower()
    )
