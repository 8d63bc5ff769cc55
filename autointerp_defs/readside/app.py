"""What the latent browser answers, as plain dicts (the HTTP server only turns them into JSON).

Kept apart from the server so that tests and benches can call it directly, and so that every
answer is built from the coder's cached index (`index.py`), never from a whole-table read.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import pandas as pd

from assets.links import DEFAULT_DAGSTER_URL, coder_url, dagster_asset_url, latent_url
from assets.score_metrics import paired_means
from assets.senses import JOIN
from autointerp_defs.readside import reader
from autointerp_defs.readside.index import CoderIndex
from storage.store import TableStore

MAX_PER_PAGE = 500
STATUSES = ("ok", "failed", "none")
STALE = "stale: scored an earlier explanation"


class ViewerError(Exception):
    """A request the viewer cannot answer: `status` is the HTTP status, the message names the bad input and the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def integer(params: dict[str, str], name: str, default: int) -> int:
    """The whole number `params[name]` (`default` when absent or blank), or a 400 naming the parameter."""
    raw = params.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ViewerError(400, f"{name}={raw!r} is not a whole number. Fix: give one, e.g. {name}={default}.") from None


def clean(value):
    """JSON-safe: NaN and infinities become null, numpy scalars and arrays plain Python."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


class Viewer:
    """The browser's answers for the tables of one `store`; `embedder` (the deployment's embedder resource; None: the
    default one) turns a query into a vector (loaded lazily), and search reads the explanations table of its vectors.
    `dagster_url` is where latent pages link to their partitions (the deployment's `[settings] dagster_url`),
    `subject_model` the (model, gguf_file) whose unembedding the logit lens reads (its `[subject_model]`;
    None: the embedded model)."""

    def __init__(self, store: TableStore, embedder=None, dagster_url: str = DEFAULT_DAGSTER_URL,
                 subject_model: tuple[str | None, str | None] = (None, None)):
        self.store = store
        self.dagster_url = dagster_url
        self.subject_model = subject_model
        if embedder is None:
            from resources.embedder import EmbedderResource

            embedder = EmbedderResource()
        self.embedder = embedder
        self._indexes: dict[str, CoderIndex] = {}
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(texts)

    def index(self, coder: str) -> CoderIndex:
        if not coder:
            raise ViewerError(400, "No coder given. Fix: add ?coder=<name>/<hookpoint> (see the coders page).")
        with self._lock:
            if coder not in self._indexes:
                try:
                    self._indexes[coder] = CoderIndex(self.store, coder, self.subject_model, self.embedder.model)
                except reader.NotMaterialized as error:
                    raise ViewerError(404, str(error)) from None
            return self._indexes[coder]

    # ---- coders -------------------------------------------------------------------------------

    def coders(self) -> dict:
        rows, scorers = [], []
        for coder in reader.list_coders(self.store):
            index = self.index(coder)
            table = index.latents()
            meta = index.meta
            row = {"coder": coder, "url": coder_url(coder, base=""), "width": int(meta["width"]), "dead_fraction": meta.get("dead_fraction"),
                   "mean_l0": meta.get("mean_l0"), "fvu": meta.get("fvu"), "explained": int((table["status"] == "ok").sum()),
                   "failed": int((table["status"] == "failed").sum()), "scorers": {}}
            for name in index.scorers:
                scored = table[table[name].notna()]
                mean, control, paired = paired_means(scored[name], scored[f"{name}_control"])
                row["scorers"][name] = {"mean": mean if len(scored) else None, "control": control if paired else None,
                                        "verdict": reader.verdict(table[f"{name}_gap"], name), "n": len(scored), "with_control": paired}
                if name not in scorers:
                    scorers.append(name)
            rows.append(row)
        return clean({"coders": rows, "scorers": [{"name": s, **reader.scorer_info(s)} for s in scorers]})

    # ---- the latent list ----------------------------------------------------------------------

    def latent_list(self, coder: str, params: dict[str, str]) -> dict:
        """One page of latents, filtered (`status`, `min_<column>`, `max_<column>`, `q` semantic search)
        and sorted (`sort`, `order`)."""
        index = self.index(coder)
        table = index.latents()
        numeric = [c for c in table.columns if c not in ("latent", "shard", "status", "explanation")] + ["latent"]
        mask = np.ones(len(table), bool)
        status = params.get("status", "")
        if status:
            if status not in STATUSES:
                raise ViewerError(400, f"Unknown status {status!r}. Fix: use one of {', '.join(STATUSES)}, or leave it out.")
            mask &= (table["status"] == status).to_numpy()
        for key, raw in params.items():
            if not raw or not key.startswith(("min_", "max_")):
                continue
            column = key[4:]
            if column not in numeric:
                raise ViewerError(400, f"Cannot filter on {column!r}. Fix: use one of {', '.join(numeric)}.")
            try:
                bound = float(raw)
            except ValueError:
                raise ViewerError(400, f"{key}={raw!r} is not a number. Fix: give a number, e.g. {key}=0.5.") from None
            values = table[column].to_numpy()
            mask &= (values >= bound) if key.startswith("min_") else (values <= bound)
        query, hits = params.get("q", "").strip(), None
        if query:
            hits = {h["latent"]: h["distance"] for h in self.search(coder, query, limit=integer(params, "limit", 100))["hits"]}
            mask &= table["latent"].isin(list(hits)).to_numpy()
        chosen = table[mask]
        sort = params.get("sort") or ("distance" if hits is not None else "latent")
        descending = params.get("order", "desc" if sort not in ("latent", "distance") else "asc") == "desc"
        if sort == "distance" and hits is not None:
            chosen = chosen.assign(distance=chosen["latent"].map(hits)).sort_values("distance", ascending=not descending)
        elif sort in table.columns:
            chosen = chosen.sort_values(sort, ascending=not descending, na_position="last", kind="stable")
        else:
            raise ViewerError(400, f"Cannot sort by {sort!r}. Fix: use one of {', '.join(table.columns)}.")
        per_page = min(max(integer(params, "per_page", 50), 1), MAX_PER_PAGE)
        pages = max(1, math.ceil(len(chosen) / per_page))
        page = min(max(integer(params, "page", 1), 1), pages)
        shown = chosen.iloc[(page - 1) * per_page : page * per_page]
        return clean({"coder": coder, "total": int(len(chosen)), "page": page, "pages": pages, "per_page": per_page, "sort": sort,
                      "order": "desc" if descending else "asc", "scorers": [{"name": s, **reader.scorer_info(s)} for s in index.scorers],
                      "columns": list(shown.columns), "rows": shown.to_dict("records"), "width": int(index.meta["width"])})

    def search(self, coder: str, query: str, limit: int = 20) -> dict:
        """Explanations of this coder nearest in meaning to `query` (the LanceDB explanations table)."""
        index = self.index(coder)
        if not query.strip():
            raise ViewerError(400, "Empty search. Fix: give ?q=<words>, e.g. q=closing a file.")
        table = index.latents()
        hits = []
        for latent, distance in index.search(self.embed([query])[0], max(1, min(limit, 200))):
            known = latent < len(table)
            hits.append({"latent": latent, "distance": distance, "explanation": table["explanation"].iat[latent] if known else "",
                         "url": latent_url(coder, latent, base=""), "mean_gap": table["mean_gap"].iat[latent] if known else None})
        return clean({"coder": coder, "query": query, "hits": hits})

    # ---- one latent ---------------------------------------------------------------------------

    def latent(self, coder: str, latent_raw: str | int) -> dict:
        index = self.index(coder)
        width = int(index.meta["width"])
        try:
            latent = int(latent_raw)
        except (TypeError, ValueError):
            raise ViewerError(400, f"Latent {latent_raw!r} is not a number. Fix: ?latent=<0..{width - 1}>.") from None
        if not 0 <= latent < width:
            raise ViewerError(404, f"Latent {latent} is outside {coder}, which has latents 0..{width - 1}. Fix: pick one in that range.")
        table = index.latents()
        shard = index.shard_of(latent)
        vocab = reader.display_vocab_cached(self.store)
        base = table.iloc[latent].to_dict()
        explained = index.rows(f"{shard}.explanations", self.store.explanations(coder, shard), latent)
        stats = index.rows(f"{shard}.profiles", self.store.latent_profiles(coder, shard), latent)
        windows = index.windows(latent)
        page = {
            "coder": coder, "latent": latent, "shard": shard, "width": width, "summary": base,
            "explanation": self._explanation(explained[-1], self._senses(index, shard, latent)) if explained else None,
            "scorers": [self._scorer(index, table, name, shard, latent, explained) for name in index.scorers],
            "windows": self._windows(windows, vocab, stats[0] if stats else None),
            "density": index.density(latent),
            "frequency": base["frequency"],
            "top_tokens": [{"token": vocab[t], "mean_activation": a} for t, a in zip(stats[0]["top_tokens"], stats[0]["top_token_mean_activation"])] if stats else [],
            "simulation": self._simulation(index, shard, latent, windows, vocab),
            "links": {"coder": coder_url(coder, base=""), "previous": latent_url(coder, latent - 1, base="") if latent > 0 else None,
                      "next": latent_url(coder, latent + 1, base="") if latent + 1 < width else None,
                      "dagster_explanations": dagster_asset_url("explanations", f"{coder}|{shard}", self.dagster_url),
                      "dagster_exemplars": dagster_asset_url("exemplars", f"{coder}|{shard}", self.dagster_url),
                      "dagster_summary": dagster_asset_url("score_summary", None, self.dagster_url)},  # one asset over all coders
        }
        lens = index.logit_lens(latent)
        page["logit_lens"] = lens if lens is not None else {"note": "no decoder: this coder has no decoder directions (neurons or an encoder-only coder)"}
        neighbours = index.neighbours(latent)
        if neighbours is None:
            page["neighbours"] = {"note": "no decoder: no decoder directions to compare"}
        else:
            for n in neighbours:
                n["explanation"] = table["explanation"].iat[n["latent"]]
                n["url"] = latent_url(coder, n["latent"], base="")
            page["neighbours"] = {"latents": neighbours}
        return clean(page)

    def _senses(self, index: CoderIndex, shard: str, latent: int) -> list[dict]:
        """The latent's senses (`[explanations] senses`), none where the table was never written."""
        table = self.store.explanation_senses(index.coder, shard)
        return sorted(index.rows(f"{shard}.senses", table, latent), key=lambda r: r["sense"]) if table.exists() else []

    @staticmethod
    def _explanation(row: dict, senses: list[dict] = ()) -> dict:
        candidates = list(row.get("candidates") or [])
        scores = list(row.get("candidate_scores") or [])
        current = JOIN.join(s["explanation"] for s in senses) == row.get("explanation")  # else the senses are of an earlier explanation
        return {"senses": [{"text": s["explanation"], "windows": s["windows"]} for s in senses] if current and len(senses) > 1 else [],
                "text": row.get("explanation", ""), "status": row.get("status"), "error": row.get("error", ""), "explainer": row.get("explainer"),
                "model": row.get("model"), "candidates": [{"text": c, "score": scores[i] if i < len(scores) else None, "chosen": c == row.get("explanation")}
                                                          for i, c in enumerate(candidates)]}

    def _scorer(self, index: CoderIndex, table: pd.DataFrame, name: str, shard: str, latent: int, explained: list[dict]) -> dict:
        """The scorer's row for this latent; `stale` (a note) when it scored another text than the latent's explanation."""
        info = reader.scorer_info(name)
        rows = index.rows(f"{shard}.scores.{name}", self.store.scores(index.coder, shard, name), latent)
        verdict = reader.verdict(table[f"{name}_gap"], name)
        if not rows:
            return {"name": name, **info, "scored": False, "verdict": verdict}
        row = rows[-1]
        main = info["main_metric"]
        stale = bool(reader.stale(pd.DataFrame([row]), pd.DataFrame(explained)).iat[0])
        metrics = {m: {"explanation": row.get(m), "control": row.get(f"control_{m}")} for m in ("accuracy", "balanced_accuracy", "f1", "roc_auc", "pearson", "ev_correlation", "steering_kl", "n_scored")
                   if m in row and (row.get(m) is not None or row.get(f"control_{m}") is not None)}
        return {"name": name, **info, "scored": True, "stale": STALE if stale else None, "verdict": verdict, "score": row.get(main) if main else None,
                "control_score": row.get(f"control_{main}") if main else None, "gap": row.get("gap"),
                "explanation": row.get("explanation"), "control_explanation": row.get("control_explanation"), "control_note": row.get("control_note"),
                "n_failed": row.get("n_failed"), "metrics": metrics}

    @staticmethod
    def _windows(rows: list[dict], vocab: list[str], stats: dict | None) -> dict:
        """Activating windows grouped as the pipeline drew them (the explainer's top windows, then the
        held-out ones by activation quantile), non-activating windows grouped by where they came from."""
        def shown(row):
            return {"tokens": [vocab[t] for t in row["tokens"]], "activations": [round(float(a), 4) for a in row["activations"]],
                    "max_activation": row["max_activation"], "sequence": row["sequence"], "start": row["start"], "split": row["split"], "quantile": row["quantile"]}

        activating, silent = {}, {}
        for row in rows:
            if row["kind"] == "activating":
                if row["split"] == "train":
                    group = "top: the explainer's windows"
                elif row["quantile"] > 0:
                    group = f"quantile {row['quantile']}"
                else:
                    group = f"{row['split']} windows"
                activating.setdefault(group, []).append(shown(row))
            else:
                silent.setdefault(row["kind"], []).append(shown(row))
        order = lambda name: (0, 0) if name.startswith("top") else (1, int(name.split()[1])) if name.startswith("quantile") else (2, name)
        return {"activating": [{"group": g, "windows": sorted(activating[g], key=lambda w: -w["max_activation"])} for g in sorted(activating, key=order)],
                "non_activating": [{"source": s, "windows": silent[s]} for s in sorted(silent)],
                "quantile_boundaries": stats["quantile_boundaries"] if stats else []}

    def _simulation(self, index: CoderIndex, shard: str, latent: int, windows: list[dict], vocab: list[str]) -> dict | None:
        """The simulator's predicted activation per token beside the true one (both on its 0-10 scale),
        per held-out window, when a simulation score exists for this latent."""
        if "simulation" not in index.scorers:
            return None
        rows = [r for r in index.rows(f"{shard}.examples.simulation", self.store.scored_examples(index.coder, shard, "simulation"), latent) if r.get("source") == "explanation"]
        if not rows:
            return None
        test = [w for w in windows if w["split"] == "test"]  # `example` indexes the latent's test windows in table order
        shown = []
        for row in sorted(rows, key=lambda r: -(r.get("activation") or 0)):
            if row.get("simulated") is None or row["example"] >= len(test):
                continue
            window = test[row["example"]]
            shown.append({"tokens": [vocab[t] for t in window["tokens"]], "true": [round(float(x), 2) for x in row["true_activations"]],
                          "simulated": [round(float(x), 2) for x in row["simulated"]], "label": row["label"], "values_from": row.get("values_from")})
        return {"windows": shown} if shown else None
