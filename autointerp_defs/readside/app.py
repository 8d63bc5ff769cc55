"""What the latent browser answers, as plain dicts (the HTTP server only turns them into JSON).

Kept apart from the server so that tests and benches can call it directly, and so that every
answer is built from the coder's cached index (`index.py`), never from a whole-table read.
"""

from __future__ import annotations

import math
import re
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import pandas as pd

from assets.links import DEFAULT_DAGSTER_URL, coder_url, dagster_asset_url, latent_url
from assets.score_metrics import STALE, mean_interval, paired_means, stale_scores
from assets.senses import of_current
from assets.stability import current_reseeds
from autointerp_defs.readside import reader
from autointerp_defs.readside.graph_labels import graphs_labelling, labelled_graph
from autointerp_defs.readside.index import MODEL_LOADS, STATUSES, CoderIndex
from storage.atomic import json_safe
from storage.store import TableStore

MAX_PER_PAGE = 500
MAX_STEER_TOKENS = 64
QUIET_S = 0.3
MAX_PAUSE_S = 5.0


class ViewerError(Exception):
    """A request the viewer cannot answer: `status` is the HTTP status, the message names the bad input and the fix;
    `headers` go with the answer (a 429's Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def integer(params: dict[str, str], name: str, default: int) -> int:
    """The whole number `params[name]` (`default` when absent or blank), or a 400 naming the parameter."""
    raw = params.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ViewerError(
            400, f"{name}={raw!r} is not a whole number. Fix: give one, e.g. {name}={default}."
        ) from None


class Viewer:
    """The browser's answers for the tables of one `store`; `embedder` (the deployment's embedder resource; None: the
    default one) turns a query into a vector (loaded lazily), and search reads the explanations table of its vectors.
    `dagster_url` is where latent pages link to their partitions (the deployment's `[settings] dagster_url`),
    `subject` the subject-model resource (its `[subject_model]`; None: the embedded model) whose unembedding the
    logit lens reads and which the steering box steers.

    After `start_warm_up()` (what `autointerp view` calls) nothing waits on a model or a cache: the embedder and
    every cached index load in the background, a search answers with word matches until the embedder is ready,
    a latent page reads its rows from the tables until its shard's caches are built and shows the logit lens as
    pending until the unembedding is cached."""

    def __init__(
        self, store: TableStore, embedder=None, dagster_url: str = DEFAULT_DAGSTER_URL, subject=None
    ):
        from resources.subject_model import SubjectModelResource

        self.store = store
        self.dagster_url = dagster_url
        self.subject = subject or SubjectModelResource()
        self.subject_model = (self.subject.model, self.subject.gguf_file, self.subject.revision)
        if embedder is None:
            from resources.embedder import EmbedderResource

            embedder = EmbedderResource()
        self.embedder = embedder
        self.steering = SteeringBox(store, self.subject)
        self._indexes: dict[str, tuple[str, CoderIndex]] = {}
        """By coder: (the stamp of its cache's `meta.json` when the index was made, the index)."""
        self._lock = threading.Lock()
        self.background = False
        """Set by `start_warm_up`: models and caches load in background threads, and no answer waits for them."""
        self._embedder_loading: threading.Thread | None = None
        self._embedder_ready = threading.Event()
        self._in_flight, self._last_answer = 0, 0.0

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(texts)

    @property
    def embedder_loading(self) -> bool:
        """Whether the warm-up is still to load, or loading, the embedder (after a failure: False,
        so that search says why)."""
        thread = self._embedder_loading
        return (
            thread is not None
            and not self._embedder_ready.is_set()
            and (thread.ident is None or thread.is_alive())
        )

    @contextmanager
    def answering(self):
        """Around each request the server answers (`pause_for_requests`)."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_answer = time.monotonic()

    def pause_for_requests(self) -> None:
        """Wait until no request is being answered and none was for `QUIET_S` (at most `MAX_PAUSE_S`), before a
        step of background work: on a first start, importing the embedder or copying a shard beside a request
        took the interpreter and the cores from it, and its answer took twice as long."""
        deadline = time.monotonic() + MAX_PAUSE_S
        while time.monotonic() < deadline and (
            self._in_flight or time.monotonic() - self._last_answer < QUIET_S
        ):
            time.sleep(0.05)

    def start_warm_up(self) -> None:
        """Build or open every coder's cached indexes and load the embedder, in a background thread: first each
        coder's latent table, then the embedder, then the rest: on a first start pages read the tables meanwhile,
        and the cores go to the first answers and the embedder instead of to copies no page has asked for yet."""
        self.background = True
        self._embedder_loading = threading.Thread(target=self._warm_embedder, daemon=True)
        threading.Thread(target=self._warm_indexes, daemon=True).start()

    def _warm_embedder(self) -> None:
        try:
            with MODEL_LOADS:
                self.embed(["warm up"])
            self._embedder_ready.set()
        except Exception as error:  # search says what is wrong when it is used
            print(
                f"viewer: could not load the embedder ({error}); search will say why",
                file=sys.stderr,
            )

    def _warm_indexes(self) -> None:
        coders = reader.list_coders(self.store)
        for coder in coders:
            try:
                self.index(coder).latents()
            except Exception:  # said below, or by the page that needs it
                pass
        self.pause_for_requests()
        self._embedder_loading.start()
        self._embedder_loading.join()
        for coder in coders:
            try:
                self.index(coder).warm_up()
            except Exception as error:  # the page that needs it says what is wrong
                print(
                    f"viewer: could not prepare {coder} ({type(error).__name__}: {error}); its pages will say why",
                    file=sys.stderr,
                )

    def index(self, coder: str) -> CoderIndex:
        """The coder's index, made anew when its activation cache's `meta.json` changed (the coder cached again, maybe
        with another width or shard size): an index holds the width and shards it was made with."""
        if not coder:
            raise ViewerError(
                400, "No coder given. Fix: add ?coder=<name>/<hookpoint> (see the coders page)."
            )
        with self._lock:
            stamp, held = (
                reader.stamp([self.store.layout.cache_meta_path(coder)]),
                self._indexes.get(coder),
            )
            if held is not None and held[0] == stamp:
                return held[1]
            try:
                index = CoderIndex(
                    self.store,
                    coder,
                    self.subject_model,
                    self.embedder.model,
                    background=self.background,
                    pause=self.pause_for_requests,
                )
            except reader.NotMaterialized as error:
                raise ViewerError(404, str(error)) from None
            self._indexes[coder] = (stamp, index)
            return index

    # ---- coders -------------------------------------------------------------------------------

    def coders(self) -> dict:
        rows, scorers = [], []
        for coder in reader.list_coders(self.store):
            index = self.index(coder)
            table = index.latents()
            meta = index.meta
            row = {
                "coder": coder,
                "url": coder_url(coder, base=""),
                "width": int(meta["width"]),
                "dead_fraction": meta.get("dead_fraction"),
                "mean_l0": meta.get("mean_l0"),
                "fvu": meta.get("fvu"),
                "explained": int((table["status"] == "ok").sum()),
                "failed": int((table["status"] == "failed").sum()),
                "accounting": {  # every latent in one bucket (assets/accounting.py)
                    k: v for k, v in (index.accounting() or {}).items() if k != "shards"
                },
                "scorers": {},
            }
            for name in index.scorers:
                scored = table[table[name].notna()]
                mean, control, paired = paired_means(scored[name], scored[f"{name}_control"])
                both = scored[name][scored[f"{name}_control"].notna()] if paired else scored[name]
                gaps = table[f"{name}_gap"]
                row["scorers"][name] = {  # each mean with its 95 % t interval over the same latents
                    "mean": mean if len(scored) else None,
                    "mean_interval": list(mean_interval(both)),
                    "control": control if paired else None,
                    "gap": float(gaps.mean()) if gaps.notna().any() else None,
                    "gap_interval": list(mean_interval(gaps.dropna())),
                    "verdict": reader.verdict(table[f"{name}_gap"], name),
                    "calibration": reader.calibration(self.store, coder, name, index.shards),
                    "n": len(scored),
                    "with_control": paired,
                }
                if name not in scorers:
                    scorers.append(name)
            rows.append(row)
        return json_safe(
            {"coders": rows, "scorers": [{"name": s, **reader.scorer_info(s)} for s in scorers]}
        )

    # ---- the latent list ----------------------------------------------------------------------

    def latent_list(self, coder: str, params: dict[str, str]) -> dict:
        """One page of latents, filtered (`status`, `min_<column>`, `max_<column>`, `q` semantic search)
        and sorted (`sort`, `order`); `several_senses` counts the coder's latents explained as several senses
        (`min_senses=2` lists them)."""
        index = self.index(coder)
        table = index.latents()
        numeric = [
            c for c in table.columns if c not in ("latent", "shard", "status", "explanation")
        ] + ["latent"]
        mask = np.ones(len(table), bool)
        status = params.get("status", "")
        if status:
            if status not in STATUSES:
                raise ViewerError(
                    400,
                    f"Unknown status {status!r}. Fix: use one of {', '.join(STATUSES)}, or leave it out.",
                )
            mask &= (table["status"] == status).to_numpy()
        for key, raw in params.items():
            if not raw or not key.startswith(("min_", "max_")):
                continue
            column = key[4:]
            if column not in numeric:
                raise ViewerError(
                    400, f"Cannot filter on {column!r}. Fix: use one of {', '.join(numeric)}."
                )
            try:
                bound = float(raw)
            except ValueError:
                raise ViewerError(
                    400, f"{key}={raw!r} is not a number. Fix: give a number, e.g. {key}=0.5."
                ) from None
            values = table[column].to_numpy()
            mask &= (values >= bound) if key.startswith("min_") else (values <= bound)
        query, hits, note = params.get("q", "").strip(), None, None
        if query:
            found = self.search(coder, query, limit=integer(params, "limit", 100))
            hits, note = found["hits"], found.get("note")
            mask &= table["latent"].isin([h["latent"] for h in hits]).to_numpy()
        sort = params.get("sort") or ("distance" if hits is not None else "status")
        descending = (
            params.get("order", "desc" if sort not in ("latent", "distance", "status") else "asc")
            == "desc"
        )
        by_distance = sort == "distance" and hits is not None
        if by_distance:  # hits come nearest first (word matches: most words first)
            latents = table["latent"][mask]
            rank = latents.map({h["latent"]: i for i, h in enumerate(hits)}).to_numpy()
            order = latents.index[np.argsort(-rank if descending else rank, kind="stable")]
        elif (
            sort in table.columns
        ):  # the sort column alone is sorted; the rows are taken for the page only
            order = (
                table[sort][mask]
                .sort_values(ascending=not descending, na_position="last", kind="stable")
                .index
            )
        else:
            raise ViewerError(
                400, f"Cannot sort by {sort!r}. Fix: use one of {', '.join(table.columns)}."
            )
        per_page = min(max(integer(params, "per_page", 50), 1), MAX_PER_PAGE)
        pages = max(1, math.ceil(len(order) / per_page))
        page = min(max(integer(params, "page", 1), 1), pages)
        shown = table.loc[order[(page - 1) * per_page : page * per_page]]
        if by_distance:
            shown = shown.assign(
                distance=shown["latent"].map({h["latent"]: h["distance"] for h in hits})
            )
        return json_safe(
            {
                "coder": coder,
                "total": int(len(order)),
                "page": page,
                "pages": pages,
                "per_page": per_page,
                "sort": sort,
                "order": "desc" if descending else "asc",
                "scorers": [{"name": s, **reader.scorer_info(s)} for s in index.scorers],
                "columns": list(shown.columns),
                "rows": shown.to_dict("records"),
                "width": int(index.meta["width"]),
                "search_note": note,
                "several_senses": int((table["senses"] > 1).sum()),
            }
        )

    def search(self, coder: str, query: str, limit: int = 20) -> dict:
        """Explanations of this coder nearest in meaning to `query` (the LanceDB explanations table)."""
        index = self.index(coder)
        if not query.strip():
            raise ViewerError(400, "Empty search. Fix: give ?q=<words>, e.g. q=closing a file.")
        table = index.latents()
        limit = max(1, min(limit, 200))
        note = None
        if self.embedder_loading:
            found = word_matches(table["explanation"], query, limit)
            note = (
                "The embedder is still loading (the first seconds after a start): "
                "these are word matches, most words first; search again for semantic results."
            )
        else:
            found = index.search(self.embed([query])[0], limit)
        hits = []
        for latent, distance in found:
            known = latent < len(table)
            hits.append(
                {
                    "latent": latent,
                    "distance": distance,
                    "explanation": table["explanation"].iat[latent] if known else "",
                    "url": latent_url(coder, latent, base=""),
                    "mean_gap": table["mean_gap"].iat[latent] if known else None,
                }
            )
        return json_safe({"coder": coder, "query": query, "hits": hits, "note": note})

    # ---- one latent ---------------------------------------------------------------------------

    def latent(self, coder: str, latent_raw: str | int) -> dict:
        index = self.index(coder)
        latent = self._latent_number(index, latent_raw)
        width = int(index.meta["width"])
        table = index.latents()
        shard = index.shard_of(latent)
        vocab = reader.display_vocab_cached(self.store)
        base = table.iloc[latent].to_dict()
        explained = index.rows(latent, "explanations")
        stats = index.rows(latent, "profiles")
        windows = index.windows(latent)
        page = {
            "coder": coder,
            "latent": latent,
            "shard": shard,
            "width": width,
            "summary": base,
            "explanation": self._explanation(explained[-1], self._senses(index, latent))
            if explained
            else None,
            "scorers": [
                self._scorer(index, table, name, latent, explained) for name in index.scorers
            ],
            "windows": self._windows(windows, vocab, stats[0] if stats else None),
            "density": index.density(latent),
            "frequency": base["frequency"],
            "top_tokens": [
                {"token": vocab[t], "mean_activation": a}
                for t, a in zip(
                    stats[0]["top_tokens"], stats[0]["top_token_mean_activation"], strict=False
                )
            ]
            if stats
            else [],
            "simulation": self._simulation(index, latent, windows, vocab),
            "links": {
                "coder": coder_url(coder, base=""),
                "previous": latent_url(coder, latent - 1, base="") if latent > 0 else None,
                "next": latent_url(coder, latent + 1, base="") if latent + 1 < width else None,
                "dagster_explanations": dagster_asset_url(
                    "explanations", f"{coder}|{shard}", self.dagster_url
                ),
                "dagster_exemplars": dagster_asset_url(
                    "exemplars", f"{coder}|{shard}", self.dagster_url
                ),
                "dagster_summary": dagster_asset_url("score_summary", None, self.dagster_url),
            },  # one asset over all coders
        }
        page["graphs"] = [  # attribution graphs `autointerp label-graph` labelled it in
            {**g, "url": f"/graphs/{g['slug']}.json"}
            for g in graphs_labelling(self.store, coder, latent)
        ]
        if page["explanation"] is not None:
            page["explanation"]["reseed"] = self._reseed(index, latent, explained[-1])
        page["logit_lens"] = self._logit_lens(index, latent)
        page["steering"] = self.steering.availability(index)
        neighbours = index.neighbours(latent)
        if neighbours is None:
            page["neighbours"] = {"note": "no decoder: no decoder directions to compare"}
        else:
            for n in neighbours:
                n["explanation"] = table["explanation"].iat[n["latent"]]
                n["url"] = latent_url(coder, n["latent"], base="")
            page["neighbours"] = {"latents": neighbours}
        return json_safe(page)

    def labelled_graph(self, slug: str) -> bytes:
        """A graph `autointerp label-graph` recorded."""
        text = labelled_graph(self.store, slug)
        if text is None:
            raise ViewerError(
                404, f"No labelled graph {slug!r}. Fix: autointerp label-graph GRAPH_JSON --coder …"
            )
        return text

    def logit_lens(self, coder: str, latent_raw: str) -> dict:
        """The latent page's logit lens alone: what the page asks again while the lens is pending."""
        index = self.index(coder)
        return json_safe(self._logit_lens(index, self._latent_number(index, latent_raw)))

    def _logit_lens(self, index: CoderIndex, latent: int) -> dict:
        lens = index.logit_lens(latent, wait=not self.background)
        return (
            lens
            if lens is not None
            else {
                "note": "no decoder: this coder has no decoder directions (neurons or an encoder-only coder)"
            }
        )

    def steer(self, coder: str, params: dict[str, str]) -> dict:
        """The steering box: the prompt's continuations without and with the latent steered (`SteeringBox`)."""
        index = self.index(coder)
        latent = self._latent_number(index, params.get("latent", ""))
        prompt = params.get("prompt", "")
        if not prompt.strip():
            raise ViewerError(400, 'Empty prompt. Fix: give a prompt, e.g. "prompt": "The".')
        raw = params.get("strength", "") or "2"
        try:
            strength = float(raw)
        except ValueError:
            raise ViewerError(
                400,
                f"strength={raw!r} is not a number. Fix: give one, e.g. "
                "strength=2 (times the latent's max cached activation).",
            ) from None
        tokens = integer(params, "tokens", 24)
        if not 1 <= tokens <= MAX_STEER_TOKENS:
            raise ViewerError(
                400, f"tokens={tokens} is out of range. Fix: give 1..{MAX_STEER_TOKENS}."
            )
        return json_safe(self.steering.steer(index, latent, prompt, strength, tokens))

    @staticmethod
    def _latent_number(index: CoderIndex, latent_raw: str | int) -> int:
        width = int(index.meta["width"])
        try:
            latent = int(latent_raw)
        except (TypeError, ValueError):
            raise ViewerError(
                400, f"Latent {latent_raw!r} is not a number. Fix: ?latent=<0..{width - 1}>."
            ) from None
        if not 0 <= latent < width:
            raise ViewerError(
                404,
                f"Latent {latent} is outside {index.coder}, which has latents 0..{width - 1}. "
                "Fix: pick one in that range.",
            )
        return latent

    @staticmethod
    def _senses(index: CoderIndex, latent: int) -> list[dict]:
        """The latent's senses (`[explanations] senses`), none where the table was never written; each with its
        scores by scorer (`sense_scores`: main metric and control), only those made with that sense's text."""
        senses = sorted(index.rows(latent, "senses"), key=lambda r: r["sense"])
        for sense in senses:
            sense["scores"] = {}
        for name in index.scorers:
            main = reader.scorer_info(name)["main_metric"]
            for row in index.rows(latent, f"senses.{name}") if main else []:
                for sense in senses:
                    if (sense["sense"], sense["explanation"]) == (row["sense"], row["explanation"]):
                        sense["scores"][name] = {
                            "metric": main,
                            "score": row.get(main),
                            "control": row.get(f"control_{main}"),
                        }
        return senses

    @staticmethod
    def _reseed(index: CoderIndex, latent: int, row: dict) -> dict | None:
        """The latent's second text (`[explanations] stability_latents`), drawn beside its current explanation
        `row`, with each scorer's main metric of it (`reseed_scores`, only scores of that text); None where
        it has none."""
        if "reseeds" not in index.shard_tables(index.shard_of(latent)):
            return None
        rows = index.rows(latent, "reseeds")
        fresh = current_reseeds(pd.DataFrame(rows), pd.DataFrame([row]))
        if not len(fresh):
            return None
        second = fresh.iloc[-1]
        drawn = [r for r in rows if r["explanation"] == second["explanation"]]
        scores = {}
        for name in index.scorers:
            main = reader.scorer_info(name)["main_metric"]
            for scored in index.rows(latent, f"reseeds.{name}") if main else []:
                if scored["explanation"] == second["explanation"]:
                    scores[name] = {"metric": main, "score": scored.get(main)}
        return {
            "text": second["explanation"],
            "windows": drawn[-1]["windows"],
            "similarity": second["similarity"],
            "scores": scores,
        }

    @staticmethod
    def _explanation(row: dict, senses: list[dict] = ()) -> dict:
        candidates = list(row.get("candidates") or [])
        scores = list(row.get("candidate_scores") or [])
        current = len(senses) > 1 and len(
            of_current(pd.DataFrame(senses), pd.DataFrame([row]))
        ) == len(senses)  # else of an earlier explanation
        return {
            "senses": [
                {
                    "text": s["explanation"],
                    "windows": s["windows"],
                    "test_windows": len(s.get("test_windows") or []),
                    "scores": s["scores"],
                }
                for s in senses
            ]
            if current
            else [],
            "text": row.get("explanation", ""),
            "status": row.get("status"),
            "error": row.get("error", ""),
            "explainer": row.get("explainer"),
            "model": row.get("model"),
            "candidates": [
                {
                    "text": c,
                    "score": scores[i] if i < len(scores) else None,
                    "chosen": c == row.get("explanation"),
                }
                for i, c in enumerate(candidates)
            ],
        }

    def _scorer(
        self, index: CoderIndex, table: pd.DataFrame, name: str, latent: int, explained: list[dict]
    ) -> dict:
        """The scorer's row for this latent; `stale` (a note) when it scored another text than the latent's explanation;
        `permalink` opens this page with this scorer's score and control shown first."""
        info = reader.scorer_info(name)
        rows = index.rows(latent, f"scores.{name}")
        verdict = reader.verdict(table[f"{name}_gap"], name)
        permalink = latent_url(index.coder, latent, base="", scorer=name)
        if not rows:
            return {
                "name": name,
                **info,
                "scored": False,
                "verdict": verdict,
                "permalink": permalink,
            }
        row = rows[-1]
        main = info["main_metric"]
        stale = bool(stale_scores(pd.DataFrame([row]), pd.DataFrame(explained)).iat[0])
        metrics = {
            m: {"explanation": row.get(m), "control": row.get(f"control_{m}")}
            for m in (
                "accuracy",
                "balanced_accuracy",
                "f1",
                "roc_auc",
                "pearson",
                "ev_correlation",
                "steering_kl",
                "n_scored",
            )
            if m in row and (row.get(m) is not None or row.get(f"control_{m}") is not None)
        }
        return {
            "name": name,
            **info,
            "scored": True,
            "stale": STALE if stale else None,
            "verdict": verdict,
            "score": row.get(main) if main else None,
            "interval": [row.get(f"{main}_lo"), row.get(f"{main}_hi")] if main else [None, None],
            "control_score": row.get(f"control_{main}") if main else None,
            "gap": row.get("gap"),
            "explanation": row.get("explanation"),
            "control_explanation": row.get("control_explanation"),
            "control_note": row.get("control_note"),
            "n_failed": row.get("n_failed"),
            "metrics": metrics,
            "permalink": permalink,
        }

    @staticmethod
    def _windows(rows: list[dict], vocab: list[str], stats: dict | None) -> dict:
        """Activating windows grouped as the pipeline drew them (the explainer's top windows, then the
        held-out ones by activation quantile), non-activating windows grouped by where they came from."""

        def shown(row):
            return {
                "tokens": [vocab[t] for t in row["tokens"]],
                "activations": [round(float(a), 4) for a in row["activations"]],
                "max_activation": row["max_activation"],
                "sequence": row["sequence"],
                "start": row["start"],
                "split": row["split"],
                "quantile": row["quantile"],
            }

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

        def order(name: str) -> tuple:
            if name.startswith("top"):
                return (0, 0)
            if name.startswith("quantile"):
                return (1, int(name.split()[1]))
            return (2, name)

        return {
            "activating": [
                {"group": g, "windows": sorted(activating[g], key=lambda w: -w["max_activation"])}
                for g in sorted(activating, key=order)
            ],
            "non_activating": [{"source": s, "windows": silent[s]} for s in sorted(silent)],
            "quantile_boundaries": stats["quantile_boundaries"] if stats else [],
        }

    def _simulation(
        self, index: CoderIndex, latent: int, windows: list[dict], vocab: list[str]
    ) -> dict | None:
        """The simulator's predicted activation per token beside the true one (both on its 0-10 scale),
        per held-out window, when a simulation score exists for this latent."""
        if "simulation" not in index.scorers:
            return None
        rows = [
            r for r in index.rows(latent, "examples.simulation") if r.get("source") == "explanation"
        ]
        if not rows:
            return None
        test = [
            w for w in windows if w["split"] == "test"
        ]  # `example` indexes the latent's test windows in table order
        shown = []
        for row in sorted(rows, key=lambda r: -(r.get("activation") or 0)):
            if row.get("simulated") is None or row["example"] >= len(test):
                continue
            window = test[row["example"]]
            shown.append(
                {
                    "tokens": [vocab[t] for t in window["tokens"]],
                    "true": [round(float(x), 2) for x in row["true_activations"]],
                    "simulated": [round(float(x), 2) for x in row["simulated"]],
                    "label": row["label"],
                    "values_from": row.get("values_from"),
                }
            )
        return {"windows": shown} if shown else None


def word_matches(explanations: pd.Series, query: str, limit: int) -> list[tuple[int, None]]:
    """(latent, no distance) of the explanations holding most of the query's words (case-insensitive), most
    first, then by latent: what search answers while the embedder loads."""
    words = set(re.findall(r"\w+", query.lower()))
    if not words:
        return []
    lowered = explanations.str.lower()
    matched = sum(
        lowered.str.contains(rf"\b{re.escape(w)}\b", regex=True).astype(int) for w in words
    )
    order = np.lexsort((np.arange(len(matched)), -matched.to_numpy()))
    return [(int(explanations.index[i]), None) for i in order[:limit] if matched.iat[i] > 0]


STEER_RETRY_S = 5
"""Seconds a steering request refused while another runs is told to wait (Retry-After): about one
generation of 24 tokens on CPU."""
_STEERING: dict[tuple[str, str | None], threading.Lock] = {}
_STEERING_LOCK = threading.Lock()


def steering_lock(model: str, gguf_file: str | None) -> threading.Lock:
    """The one lock of a subject model's steering in this process: a second request for the same model is refused
    (429), not queued, since each costs the model's time for every core and a web page could send many."""
    with _STEERING_LOCK:
        return _STEERING.setdefault((model, gguf_file), threading.Lock())


class SteeringBox:
    """The latent page's steering box: the subject model is loaded once, in a background thread started by the
    first request (which answers "loading" at once, as every request does until it is ready; other pages are
    served meanwhile), then each request continues its prompt without and with the latent steered, through
    `resources/steering.py` (one at a time per model, `steering_lock`: generation uses every core)."""

    def __init__(self, store: TableStore, subject):
        self.store, self.subject = store, subject
        self._state, self._error = "idle", ""
        self._steerer = None
        self._lock = threading.Lock()
        self._running = steering_lock(subject.model, subject.gguf_file)
        self._coders: dict[str, object] = {}

    def availability(self, index: CoderIndex) -> dict:
        """Whether this latent page offers steering, and if not why, without loading anything."""
        from resources.subject_model import unavailable_reason

        if index.decoder() is None:
            return {
                "available": False,
                "message": "This coder has no decoder directions, so its latents cannot be steered.",
            }
        reason = self._error or unavailable_reason(
            self.subject.model, self.subject.gguf_file, self.subject.revision
        )
        if reason:
            return {"available": False, "message": f"Steering is off: {reason}"}
        return {"available": True, "state": self._state, "model": self.subject.model}

    def steer(
        self, index: CoderIndex, latent: int, prompt: str, strength: float, tokens: int
    ) -> dict:
        from resources.sparse_coders import load_registered
        from resources.steering import SteeringError, continue_side_by_side, max_activation

        offered = self.availability(index)
        if not offered["available"]:
            return {"state": "unavailable", "message": offered["message"]}
        with self._lock:
            if self._state == "idle":
                self._state = "loading"
                threading.Thread(target=self._load, daemon=True).start()
            if self._state == "loading":
                return {
                    "state": "loading",
                    "message": f"Loading the subject model {self.subject.model} (once per server start)…",
                }
        if not self._running.acquire(blocking=False):
            raise ViewerError(
                429,
                f"The subject model {self.subject.model} is steering another request "
                "(one at a time). Fix: try again in a few seconds.",
                {"Retry-After": str(STEER_RETRY_S)},
            )
        try:
            if index.coder not in self._coders:
                self._coders[index.coder] = load_registered(
                    self.store.layout.registry_dir, index.coder
                )
            unit = max_activation(self.store.layout.activations_dir(index.coder), latent)
            result = continue_side_by_side(
                self._steerer, self._coders[index.coder], latent, prompt, strength * unit, tokens
            )
        except SteeringError as error:
            raise ViewerError(400, str(error)) from None
        finally:
            self._running.release()
        return {
            "state": "done",
            "prompt": prompt,
            "strength": strength,
            "unit": unit,
            "delta": result.delta,
            "kl": result.kl,
            "unsteered": result.unsteered,
            "steered": result.steered,
            "tokens": tokens,
        }

    def _load(self) -> None:
        try:
            with MODEL_LOADS:
                self._steerer = self.subject.steerer()
            self._state = "ready"
        except Exception as error:  # shown in the box, with the reason
            self._error = (
                f"the subject model {self.subject.model} could not be loaded "
                f"({type(error).__name__}: {error})."
            )
            self._state = "failed"
