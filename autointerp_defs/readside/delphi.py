"""delphi's files: `autointerp export delphi CODER DIR` writes a delphi run folder; `autointerp import delphi
CODER DIR` reads explanations back through the `delphi` explainer (`assets/explainers/delphi_folder.py`).

delphi's layout (checked against eai-delphi 0.1.3: `latents/cache.py` writes the cache, `latents/loader.py`
`LatentDataset` reads it, `__main__.py` writes the rest with orjson, `log/result_analysis.py` reads scores),
in the run folder <DIR> = `<dir>/<model>/<coder name>/`, as Neuronpedia's export writes `<dir>/<modelId>/<source>/`:

    <DIR>/latents/<module>/<start>_<end>.safetensors   latents start..end (inclusive), delphi's 5 splits of the
        width: `locations` int32 [n, 3] = (sequence, position, latent - start), `activations` float32 [n],
        `tokens` the corpus [n_sequences, ctx_len] (in every split, as delphi writes it)
    <DIR>/latents/<module>/config.json                 the cache's CacheConfig fields and `model_name`: the
        subject model as delphi loads its tokenizer (`AutoTokenizer.from_pretrained(model_name)`: a hub id or a
        folder, no GGUF file or revision), so the embedded GGUF is named by the hub model it quantizes
    <DIR>/log/hookpoint_firing_counts.pt               {module: int64 tensor [width]}: tokens each latent fired on
    <DIR>/run_config.json                              RunConfig: model, sparse model, hookpoints, scorers and the
        cache, constructor and sampler settings the data shows (delphi's defaults fill the rest when it loads);
        `min_examples` is the fewest activating windows of a latent with exemplars, so delphi keeps the
        latents our `min_activating_windows` kept (its default 200 would drop most)
    <DIR>/explanations/<module>_latent<N>.txt          a JSON string: the explanation
    <DIR>/scores/<scorer>/<module>_latent<N>.txt       a JSON list, one `ClassifierOutput` per judged window:
        str_tokens, activations, distance, activating, prediction, probability, correct

`distance` is delphi's: an activating window's quantile 0..n-1 (0 the strongest; ours are 1..n), a
neighbour window minus the decoder cosine similarity of the neighbour firing most in it, any other
non-activating window -1. Activations stay this latent's own (zeros on non-activating windows) at float32.

Our detection and fuzzing scorers are delphi's classifier scorers (delphi calls fuzzing `fuzz`);
only those are written as scores, since delphi's analysis reads only that shape, and only where they
scored the explanation written beside them. An export replaces every file of its module in DIR (other
modules' files stay, their hookpoints and firing counts are kept), so a re-export never leaves a score
of an earlier text beside a new one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import save_file

from assets.explainers.delphi_folder import DELPHI_FILE
from assets.score_metrics import stale_scores
from autointerp_defs.readside import reader
from autointerp_defs.readside.index import CoderIndex
from storage.content_identity import model_name
from storage.store import TableStore

DELPHI_SCORERS = {"detection": "detection", "fuzzing": "fuzz"}
DELPHI_SPLITS = 5
"""delphi's default `CacheConfig.n_splits`: few files, since each carries the corpus tokens."""


def default_module(coder: str) -> str:
    """delphi's module name for a coder: its hookpoint (e.g. `model.layers.15`)."""
    return coder.split("/", 1)[1]


def delphi_model_name(model: str | None, gguf_file: str | None) -> str:
    """The subject model as delphi loads it (`AutoTokenizer.from_pretrained(name)`): the hub model the
    embedded GGUF quantizes, a hub id, or a local folder's absolute path."""
    from resources.subject_model import EMBEDDED, EMBEDDED_ORIGIN

    if model in (None, EMBEDDED):
        return EMBEDDED_ORIGIN
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def export_delphi(
    data_dir: str,
    coder: str,
    out_dir: str,
    module: str | None = None,
    subject_model: tuple[str | None, str | None, str | None] = (None, None, None),
    say: Callable[[str], None] = lambda line: None,
) -> Path:
    """Write the coder's latent cache, explanations and classifier scores as a delphi run in
    `<out_dir>/<model>/<coder name>/` and return that folder. `subject_model` is the deployment's
    (model, gguf_file, revision); `say` is told each step, the counts written, warnings and how to read it."""
    from autointerp_defs.readside.neuronpedia import default_model_id

    store = TableStore.at(data_dir)
    module = module or default_module(coder)
    model, gguf_file, revision = subject_model
    out = Path(out_dir) / default_model_id(model) / coder.split("/", 1)[0]
    say(f"exporting {coder} to delphi as module {module} of the run {out}")
    index = CoderIndex(store, coder)
    _remove_module(out, module)
    cache_cfg = _write_latent_cache(
        store, coder, out, module, index.meta, delphi_model_name(model, gguf_file), say
    )
    written = {"latent splits": cache_cfg["n_splits"]}
    vocab = reader.display_vocab(store)
    (out / "explanations").mkdir(parents=True, exist_ok=True)
    explained = reader.explanations(store, coder, index.shards)
    ok = explained[explained["status"] == "ok"] if len(explained) else explained
    written["explanations"] = 0
    for row in ok.itertuples():
        (out / "explanations" / f"{module}_latent{int(row.latent)}.txt").write_text(
            json.dumps(row.explanation)
        )
        written["explanations"] += 1
    written.update({theirs: 0 for theirs in DELPHI_SCORERS.values()})
    for shard in index.shards:
        say(f"scores: shard {shard}")
        judged = {
            theirs: _judged_windows(store, coder, shard, ours)
            for ours, theirs in DELPHI_SCORERS.items()
        }
        latents = sorted({int(latent) for rows in judged.values() for latent in rows["latent"]})
        tests = {
            latent: [w for w in index.windows(latent) if w["split"] == "test"] for latent in latents
        }  # `example` indexes these, in table order
        distances = _neighbour_distances(store, coder, index, tests)
        for theirs, by_latent in judged.items():
            folder = out / "scores" / theirs
            for latent, rows in by_latent.groupby("latent"):
                test = tests[int(latent)]
                samples = [
                    _sample(
                        r,
                        test[int(r.example)],
                        vocab,
                        distances.get((int(latent), int(r.example)), -1.0),
                    )
                    for r in rows.sort_values("example").itertuples()
                    if int(r.example) < len(test)
                ]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{module}_latent{int(latent)}.txt").write_text(json.dumps(samples))
                written[theirs] += 1
    settings = _write_run_config(
        store,
        coder,
        out,
        module,
        index,
        cache_cfg,
        ok,
        [theirs for theirs in DELPHI_SCORERS.values() if written[theirs]],
    )
    say(f"wrote {out}: " + ", ".join(f"{n} {kind}" for kind, n in written.items()))
    _warn(say, index, settings, subject_model)
    say(
        f"to read it: delphi's LatentDataset('{out}/latents', …) with the settings of "
        f"RunConfig.load_json('{out}/run_config.json'), and log_results('{out}/scores', …); "
        f"`autointerp import delphi {coder} {out}` brings its explanations back"
    )
    return out


def _warn(say: Callable[[str], None], index: CoderIndex, settings: dict, subject_model) -> None:
    """What delphi will not read as our data holds it: latents without windows, a GGUF file, a revision."""
    from resources.subject_model import EMBEDDED

    width = int(index.meta["width"])
    profiles = reader.latent_profiles(index.store, index.coder, index.shards)
    with_windows = profiles["latent"].nunique() if len(profiles) else 0
    if with_windows < width:
        say(
            f"warning: {width - with_windows} of {width} latents have no exemplar windows (dead, firing "
            "in fewer windows than [exemplars] min_activating_windows, or in a shard without "
            "exemplars): their activations are in the latent cache, with no explanation or score"
        )
    if "min_examples" not in settings.get("constructor_cfg", {}):
        say("warning: no latent has exemplars, so run_config.json names no min_examples")
    model, gguf_file, revision = subject_model
    name = settings["model"]
    if gguf_file and model not in (None, EMBEDDED):
        say(
            f"warning: delphi loads no GGUF file ({gguf_file}): set `model` in run_config.json and "
            "`model_name` in latents/*/config.json to the hub id of the model it quantizes"
        )
    elif revision and name == model:
        say(f"warning: delphi loads {name} at its main revision; the data was made at {revision}")


def _remove_module(out: Path, module: str) -> None:
    """Delete this module's files of an earlier export (or delphi run) in `out`: explanations, scores, latent cache."""
    for path in [*out.glob("explanations/*.txt"), *out.glob("scores/*/*.txt")]:
        match = DELPHI_FILE.match(path.name)
        if match and match["module"] == module:
            path.unlink()
    for path in (out / "latents" / module).glob("*"):
        path.unlink()


def _judged_windows(store: TableStore, coder: str, shard: str, scorer: str) -> pd.DataFrame:
    """The scorer's per-window rows of the explanation (not the control), of latents whose scores row judged
    the current explanation: a row of an earlier text (an import since) is left out, as is a latent without one."""
    examples = reader.rows_of(store.scored_examples(coder, shard, scorer))
    scored = reader.rows_of(store.scores(coder, shard, scorer))
    if not len(examples) or not len(scored):
        return pd.DataFrame(columns=["latent", "example"])
    fresh = scored["latent"][
        ~stale_scores(scored, reader.rows_of(store.explanations(coder, shard)))
    ]
    return examples[(examples["source"] == "explanation") & examples["latent"].isin(fresh)]


def _sample(row, window: dict, vocab: list[str], negative_distance: float) -> dict:
    activating = bool(row.label)
    prediction = None if pd.isna(row.predicted) else bool(row.predicted)
    probability = None if pd.isna(row.score) else float(row.score)
    return {
        "str_tokens": [vocab[t] for t in window["tokens"]],
        "activations": [float(a) for a in window["activations"]],
        "distance": int(row.quantile) - 1 if activating else negative_distance,
        "activating": activating,
        "prediction": prediction,
        "probability": probability,
        "correct": None if prediction is None else prediction == activating,
    }


def _neighbour_distances(
    store: TableStore, coder: str, index: CoderIndex, tests: dict[int, list[dict]]
) -> dict[tuple[int, int], float]:
    """delphi's `distance` of each neighbour window, keyed (latent, test window): minus the decoder cosine
    similarity of the latent's neighbour with the largest activation in the window (the one that put it there)."""
    wanted = {
        latent: [i for i, w in enumerate(test) if w["kind"] == "neighbour"]
        for latent, test in tests.items()
    }
    wanted = {latent: found for latent, found in wanted.items() if found}
    if not wanted:
        return {}
    profiles = (
        reader.latent_profiles(store, coder, [index.shard_of(latent) for latent in wanted])
        .drop_duplicates("latent", keep="last")
        .set_index("latent")
    )
    directions = index.decoder()
    fired = reader.latent_activations(
        store,
        coder,
        sorted({int(n) for latent in wanted for n in profiles.at[latent, "neighbours"]}),
    )
    distances = {}
    for latent, found in wanted.items():
        mine = np.isin(fired.locations[:, 2], np.asarray(profiles.at[latent, "neighbours"]))
        locations, values = fired.locations[mine], fired.activations[mine]
        for i in found:
            w = tests[latent][i]
            inside = (
                (locations[:, 0] == w["sequence"])
                & (locations[:, 1] >= w["start"])
                & (locations[:, 1] < w["start"] + len(w["tokens"]))
            )
            if not inside.any():
                raise reader.ExportInputError(
                    f"Latent {latent}'s neighbour window (sequence {w['sequence']}, "
                    f"start {w['start']}) holds no activation of its neighbours in the cache of "
                    f"{coder}. "
                    f"Fix: materialize `exemplars` of {coder}|{index.shard_of(latent)} again."
                )
            strongest = int(locations[inside, 2][np.argmax(values[inside])])
            distances[(latent, i)] = -float(
                np.asarray(directions[latent]) @ np.asarray(directions[strongest])
            )
    return distances


def _write_latent_cache(
    store: TableStore,
    coder: str,
    out: Path,
    module: str,
    meta: dict,
    model: str,
    say: Callable[[str], None],
) -> dict:
    """delphi's latent cache of the coder (`LatentDataset` reads it) and its firing counts (`log_results` reads
    them); returns the cache's config, whose `model_name` is `model`."""
    width = int(meta["width"])
    tokens = reader.corpus_tokens(store)
    folder = out / "latents" / module
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, width, min(DELPHI_SPLITS, width) + 1).astype(np.int64)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=False):
        say(f"latent cache: latents {start}..{stop - 1} of {width}")
        fired = reader.latent_activations(store, coder, np.arange(start, stop))
        locations = fired.locations.astype(np.int32)
        locations[:, 2] -= start
        save_file(
            {
                "locations": locations,
                "activations": fired.activations.astype(np.float32),
                "tokens": tokens,
            },
            str(folder / f"{start}_{stop - 1}.safetensors"),
        )
    corpus = reader.corpus_meta(store)
    cache_cfg = {
        "dataset_repo": corpus.get("source", ""),
        "cache_ctx_len": int(tokens.shape[1]),
        "n_tokens": int(tokens.size),
        "n_splits": len(bounds) - 1,
        "model_name": model,
    }
    (folder / "config.json").write_text(json.dumps(cache_cfg, indent=4))
    counts_path = out / "log" / "hookpoint_firing_counts.pt"
    counts_path.parent.mkdir(parents=True, exist_ok=True)
    counts = torch.load(counts_path, weights_only=True) if counts_path.exists() else {}
    counts[module] = torch.from_numpy(reader.latent_counts(store, coder)["count"].astype(np.int64))
    torch.save(counts, counts_path)
    return cache_cfg


def _write_run_config(
    store: TableStore,
    coder: str,
    out: Path,
    module: str,
    index: CoderIndex,
    cache_cfg: dict,
    explained: pd.DataFrame,
    scorers: list[str],
) -> dict:
    """delphi's `run_config.json`, with the settings our data shows, returned; an earlier export's hookpoints
    are kept."""
    path = out / "run_config.json"
    earlier = json.loads(path.read_text()).get("hookpoints", []) if path.exists() else []
    cache_cfg = dict(cache_cfg)
    config = {
        "model": cache_cfg.pop("model_name"),
        "sparse_model": coder.split("/", 1)[0],
        "hookpoints": sorted({*earlier, module}),
        "scorers": scorers,
        "cache_cfg": cache_cfg,
        **_exemplar_settings(store, coder, index),
    }
    if len(explained):
        config["explainer_model"] = model_name(Counter(explained["model"]).most_common(1)[0][0])
    path.write_text(json.dumps(config, indent=4))
    return config


def _exemplar_settings(store: TableStore, coder: str, index: CoderIndex) -> dict:
    """delphi's constructor and sampler settings as the exemplars tables show them (the largest count of any
    latent; `min_examples` the fewest activating windows of a latent with exemplars: delphi then keeps the
    latents that our `min_activating_windows`, which no table records, kept)."""
    frames = [
        store.exemplars(coder, s).read_if_present(columns=["latent", "split", "kind", "quantile"])
        for s in index.shards
    ]
    rows = pd.concat(
        [f for f in frames if f is not None and len(f)]
        or [pd.DataFrame(columns=["latent", "split", "kind", "quantile"])]
    )
    if not len(rows):
        return {}
    activating = rows["kind"] == "activating"

    def most(mask) -> int:
        return int(rows[mask].groupby("latent").size().max()) if mask.any() else 0

    example_ctx_len = len(index.windows(int(rows["latent"].iloc[0]))[0]["tokens"])
    profiles = reader.latent_profiles(store, coder, index.shards)
    return {
        "constructor_cfg": {
            "example_ctx_len": example_ctx_len,
            "min_examples": int(profiles["activating_windows"].min()),
            "n_non_activating": most((rows["split"] == "test") & ~activating),
        },
        "sampler_cfg": {
            "n_examples_train": most((rows["split"] == "train") & activating),
            "n_examples_test": most((rows["split"] == "test") & activating),
            "n_quantiles": int(rows.loc[(rows["split"] == "test") & activating, "quantile"].max()),
        },
    }
