"""Stage 4, `explanations`: one explanation per latent from the chosen explainer, optionally best of N.

Explainers are plugins (`assets/explainers/`, one module each): `highlighted` (delphi's default),
`contrastive`, `token_table`, `top_tokens`, `delphi` (reads a delphi run's explanations, asking no
LLM: `autointerp import delphi`), and any a deployment adds. With `best_of_n > 1`, N
candidates are sampled and each is scored by the embedding scorer on the held-out `valid` windows;
the best is kept and every candidate is stored with its score (Transluce). With `refine_rounds`, the
explanation is then revised from its mistakes on the `valid` windows, judged by the deployment's judge
(`assets/refine.py`); every round is a row of `explanation_rounds`. With `senses` > 1, a latent whose
activating windows fall into distinct clusters is explained once per cluster and its explanation is
their union (`assets/senses.py`); each sense is a row of `explanation_senses`. Requests go through the
production client (response cache, bounded concurrency, retries, ledger, budget). A latent whose
answer cannot be parsed, or that the budget stopped, is stored as failed with its reason; it never
fails the partition and is asked again on the next materialization. The settings (which explainer,
its settings, N, ...) come from the deployment file and are part of the code version: changing
them re-runs exactly this asset and the scorers below it.
"""

import asyncio
import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetsDefinition,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field, ValidationError

from assets.accounting import shard_accounting
from assets.automation import CODE_CHANGED, FOLLOW, LLM_POOL, in_pool
from assets.checks import explanations_results, explanations_specs
from assets.explainers import EXPLAINERS, Explainer, ExplainerDeps
from assets.latent_queue import (
    ChunkLoader,
    nothing_succeeded,
    overlaps_shards,
    selected_latents,
    stream_latents,
)
from assets.links import coder_url, latent_url
from assets.partitions import backfill_policy, coder_and_shard, each_shard, shard_partitions
from assets.prompts import corpus_prompt_vocab, plain_text
from assets.records import RESEED, LatentRecord, read_records
from assets.refine import Refiner
from assets.score_metrics import roc_auc
from assets.senses import JOIN, sense_clusters, sense_record, sense_test_windows
from assets.stage_config import (
    NO_MODELS,
    Models,
    added_later,
    problems,
    settings_digest,
    with_defaults,
)
from resources.embedder import EmbedderResource, explanation_similarity
from resources.llm import UNREADABLE, LLMResource, stopped_by_budget
from resources.settings import AutointerpSettings
from resources.sparse_coders import load_registered
from resources.subject_model import SubjectModelResource
from storage.corpus import load_corpus
from storage.journal import Journal
from storage.tables import TABLES
from storage.vector_store import sync_explanations


class ExplanationsConfig(Config):
    explainer: str = Field(
        default="highlighted",
        description="Which explainer plugin writes the explanation "
        "(a module of assets/explainers/ or of the deployment's plugins).",
    )
    explainer_settings: dict = Field(
        default={}, description="The chosen explainer's own settings (its `Settings` model)."
    )
    best_of_n: int = Field(
        default=1,
        description="Candidates per latent; above 1 the best by embedding score on held-out windows is kept.",
    )
    candidate_temperature: float = Field(
        default=0.7,
        description="Sampling temperature of best-of-N candidates (a single explanation uses 0).",
    )
    max_tokens: int = Field(default=48, description="Longest explanation, in tokens.")
    refine_rounds: int = added_later(
        0,
        ge=0,
        description="Revisions asked after the first explanation: each shows the explainer the "
        "`valid` windows the explanation misjudges (detection by the deployment's judge) "
        "and is kept only if it scores better there. 0: single shot.",
    )
    senses: int = added_later(
        1,
        ge=1,
        description="Most senses per latent: above 1, the latent's activating windows are "
        "clustered by the embedder and each distinct cluster is explained on its own; "
        "the explanation is their union (assets/senses.py). 1: one explanation.",
    )
    stability_latents: int = added_later(
        0,
        ge=0,
        description="Latents per shard explained a second time, from a draw of their top windows "
        "disjoint from the first (the exemplars' `reseed` split); the scorers score both texts and "
        "the summary reports how far their scores differ. 0: off.",
    )


def window_texts(rows: pd.DataFrame, vocab: list[str]) -> list[str]:
    """Windows as plain text, for the embedder."""
    return [plain_text("".join(vocab[t] for t in row.tokens)) for row in rows.itertuples()]


def embedding_scores(
    candidates: list[str], valid: pd.DataFrame, vocab: list[str], embed
) -> list[float]:
    """ROC AUC of each candidate's embedding similarity at telling held-out activating windows from random ones."""
    labels = (valid["kind"] == "activating").to_numpy()
    if not len(candidates) or labels.all() or not labels.any():
        return [float("nan")] * len(candidates)
    sims = explanation_similarity(embed, candidates, window_texts(valid, vocab))
    return [roc_auc(sims[:, i], labels) for i in range(len(candidates))]


def read_latent(explainer: Explainer, record: LatentRecord) -> dict:
    """The row of an explainer that asks no LLM: the text it reads, or failed saying why it has none."""
    row = {
        "latent": record.latent,
        "explainer": explainer.name,
        "model": explainer.model,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "examples_dropped": 0,
    }
    try:
        text = explainer.read(record)
    except LookupError as error:
        failed = {"explanation": "", "status": "failed", "error": str(error)}
        return {**row, **failed, "candidates": [], "candidate_scores": []}
    ok = {"explanation": text, "status": "ok", "error": ""}
    return {**row, **ok, "candidates": [text], "candidate_scores": [float("nan")]}


async def explain_latent(
    explainer: Explainer,
    config: ExplanationsConfig,
    record: LatentRecord,
    embed,
    refiner: Refiner | None = None,
) -> tuple[dict, list[dict]]:
    """The latent's `explanations` row and, with a `refiner`, its `explanation_rounds` rows."""
    if not explainer.asks_llm:
        return read_latent(explainer, record), []
    client = explainer.deps.llm
    row = {
        "latent": record.latent,
        "explainer": explainer.name,
        "model": client.identity,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "error": "",
        "explanation": "",
        "status": "failed",
        "candidates": [],
        "candidate_scores": [],
        "examples_dropped": 0,
    }
    try:
        messages, dropped = explainer.prompt(record, config.max_tokens)
        row["examples_dropped"] = dropped
        if messages is None:
            return {
                **row,
                "error": "prompt longer than the LLM's context even with one example",
            }, []
        n = max(1, config.best_of_n)
        params = [
            {
                "max_tokens": config.max_tokens,
                "temperature": 0.0 if n == 1 else config.candidate_temperature,
                "seed": None if n == 1 else i,
            }
            for i in range(n)
        ]
    except Exception as error:  # one latent's failure must not fail the partition
        return {**row, "error": f"{type(error).__name__}: {error}"}, []
    outcomes = await asyncio.gather(
        *(client.ask(messages, explainer.parse, explainer.reask, **p) for p in params)
    )
    row["prompt_tokens"] = sum(o.prompt_tokens for o in outcomes)
    row["completion_tokens"] = sum(o.completion_tokens for o in outcomes)
    candidates = [o.value for o in outcomes if o.value is not None]
    lost = [
        o.failure for o in outcomes if o.failure and not o.failure.startswith(UNREADABLE)
    ]  # a candidate the budget or a request lost
    if lost or not candidates:
        return {**row, "error": (lost or [outcomes[0].failure])[0]}, []
    scores = (
        embedding_scores(
            candidates, record.windows[record.windows["split"] == "valid"], record.vocab, embed
        )
        if len(candidates) > 1
        else [float("nan")]
    )
    best = int(np.nanargmax(scores)) if not np.all(np.isnan(scores)) else 0
    row = {
        **row,
        "explanation": candidates[best],
        "status": "ok",
        "candidates": candidates,
        "candidate_scores": [float(s) for s in scores],
    }
    if refiner is None:
        return row, []
    refined = await refiner.refine(explainer, record, messages, candidates[best])
    row["prompt_tokens"] += refined.prompt_tokens
    row["completion_tokens"] += refined.completion_tokens
    if refined.failure:  # the budget stopped it: failed, so that it is refined next time
        return {**row, "explanation": "", "status": "failed", "error": refined.failure}, []
    return {**row, "explanation": refined.explanation}, refined.rounds


async def explain_senses(
    explainer: Explainer,
    config: ExplanationsConfig,
    record: LatentRecord,
    embed,
    refiner: Refiner | None = None,
) -> tuple[dict, list[dict], list[dict]]:
    """`explain_latent` with up to `config.senses` senses: its rows and the latent's `explanation_senses` rows
    (none when it has one sense). Each sense is explained single shot; their union is the explanation."""
    clusters = (
        sense_clusters(record, config.senses, embed) if config.senses > 1 else []
    )  # one sense: no windows to split (~1 ms a latent)
    if len(clusters) <= 1:
        return *await explain_latent(explainer, config, record, embed, refiner), []
    asked = await asyncio.gather(
        *(
            explain_latent(explainer, config, sense_record(record, windows), embed)
            for windows in clusters
        )
    )
    rows = [row for row, _ in asked]
    failed = next((row for row in rows if row["status"] != "ok"), None)
    distinct = list(dict.fromkeys(row["explanation"] for row in rows))
    if failed is None and len(distinct) == 1:  # the clusters are one sense after all
        row, rounds = await explain_latent(explainer, config, record, embed, refiner)
        return (
            {
                **row,
                **{
                    k: row[k] + sum(r[k] for r in rows)
                    for k in ("prompt_tokens", "completion_tokens")
                },
            },
            rounds,
            [],
        )
    union = {
        **rows[0],
        **{
            k: sum(r[k] for r in rows)
            for k in ("prompt_tokens", "completion_tokens", "examples_dropped")
        },
    }
    if failed is not None:
        return (
            {
                **union,
                "explanation": "",
                "status": "failed",
                "error": failed["error"],
                "candidates": [],
                "candidate_scores": [],
            },
            [],
            [],
        )
    members = [[k for k, row in enumerate(rows) if row["explanation"] == text] for text in distinct]
    held_out = sense_test_windows(record, clusters, members, embed)
    senses = [
        {
            "latent": record.latent,
            "sense": i,
            "explanation": text,
            "windows": sum(len(clusters[k]) for k in sense),
            "clusters": sense,
            "test_windows": test,
        }
        for i, (text, sense, test) in enumerate(zip(distinct, members, held_out, strict=False))
    ]
    return (
        {
            **union,
            "explanation": JOIN.join(distinct),
            "candidates": [JOIN.join(distinct)],
            "candidate_scores": [float("nan")],
        },
        [],
        senses,
    )


async def explain_reseeds(
    explainer: Explainer,
    config: ExplanationsConfig,
    exemplars: pd.DataFrame | Path,
    explained: pd.DataFrame,
    vocab: list[str],
    embed,
    coder: str = "",
    refiner: Refiner | None = None,
) -> list[dict]:
    """The `explanation_reseeds` rows: the first `config.stability_latents` explained latents that have `reseed`
    windows, each explained again as its first text was but from those windows, with the two texts'
    embedding similarity. A second draw that sees other windows may say something else: how much that
    changes the scores is what the scorers then measure."""
    ok = explained[explained["status"] == "ok"]
    first = dict(zip(ok["latent"].astype(int), ok["explanation"], strict=False))
    splits = (
        exemplars[["latent", "split"]]
        if isinstance(exemplars, pd.DataFrame)
        else pd.read_parquet(exemplars, columns=["latent", "split"])
    )  # two columns, not every window of the shard
    drawn = splits.loc[splits["split"] == RESEED, "latent"].astype(int)
    latents = sorted(set(drawn) & set(first))[: config.stability_latents]
    if not latents:
        return []
    records = read_records(exemplars, latents, coder, vocab)
    client = explainer.deps.llm
    async with (
        client.session(),
        refiner.judge.session() if refiner is not None else contextlib.nullcontext(),
    ):
        asked = await asyncio.gather(
            *(
                explain_senses(explainer, config, records[latent].reseeded(), embed, refiner)
                for latent in latents
            )
        )
    rows = []
    for latent, (row, _, _) in zip(latents, asked, strict=True):
        second = row["explanation"] if row["status"] == "ok" else ""
        rows.append(
            {
                "latent": latent,
                "explanation": second,
                "first_explanation": first[latent],
                "windows": int((drawn == latent).sum()),
                "similarity": float(explanation_similarity(embed, [first[latent]], [second])[0, 0])
                if second
                else float("nan"),
                **{k: row[k] for k in ("status", "error", "prompt_tokens", "completion_tokens")},
            }
        )
    return rows


def make_explainer(
    config: ExplanationsConfig, explainers: dict[str, type[Explainer]], deps: ExplainerDeps
) -> Explainer:
    """The configured explainer with its settings checked; a wrong name or setting names the fix."""
    if config.explainer not in explainers:
        raise ValueError(
            f"Unknown explainer {config.explainer!r}. Fix: set [explanations] explainer to one "
            f"of {sorted(explainers)} in the deployment file."
        )
    cls = explainers[config.explainer]
    if not cls.asks_llm and (
        config.best_of_n,
        config.refine_rounds,
        config.senses,
        config.stability_latents,
    ) != (1, 0, 1, 0):
        raise ValueError(
            f"The {cls.name!r} explainer asks no LLM: best_of_n, refine_rounds, senses and "
            "stability_latents do not apply. Fix: leave them at 1, 0, 1 and 0 in [explanations]."
        )
    try:
        settings = cls.Settings(**config.explainer_settings)
    except ValidationError as error:
        raise ValueError(
            f"Bad explainer settings: {problems(error, 'explanations.explainer_settings')}"
        ) from None
    return cls(settings, deps)


async def explain_all(
    explainer: Explainer,
    config: ExplanationsConfig,
    exemplars: pd.DataFrame | Path,
    latent_stats: pd.DataFrame | None,
    latents: list[int],
    vocab: list[str],
    embed,
    report=None,
    coder: str = "",
    journal: Journal | None = None,
    refiner: Refiner | None = None,
    rounds: list[dict] | None = None,
    senses: list[dict] | None = None,
) -> pd.DataFrame:
    """One row per latent. `exemplars` is the table or its file; from a file, a chunk of latents' rows is
    read at a time. Latents stream through a bounded queue; with a `journal` (parts `rounds`, `senses`,
    `rows`), each explained latent is kept as it finishes and latents kept by an interrupted run are not
    asked again. With a `refiner`, each explanation is refined, and the rows of every round are added to
    `rounds`; the rows of a latent's senses (`config.senses` > 1) are added to `senses`."""
    stats_of = (
        {int(r["latent"]): r for r in latent_stats.to_dict("records")}
        if latent_stats is not None
        else {}
    )
    done = journal.kept(latents) if journal is not None else {}
    if done and report:
        report(
            f"explanations: {len(done)} latents kept from an interrupted run; "
            f"explaining the other {len(latents) - len(done)}"
        )
    todo = [latent for latent in latents if latent not in done]

    async def load(chunk: list[int]) -> dict[int, LatentRecord]:
        return await asyncio.to_thread(read_records, exemplars, chunk, coder, vocab, stats_of)

    loader = ChunkLoader(todo, load)

    async def explain(latent: int) -> tuple[dict, list[dict], list[dict]]:
        return await explain_senses(explainer, config, await loader.take(latent), embed, refiner)

    def keep(latent: int, result: tuple[dict, list[dict], list[dict]]) -> None:
        row, latent_rounds, latent_senses = result
        if (
            journal is not None and row["status"] == "ok"
        ):  # failed or budget-stopped latents are asked again next time
            journal.add(
                [row],
                rounds=latent_rounds,
                **({"senses": latent_senses} if "senses" in journal.part_names else {}),
            )

    client = explainer.deps.llm  # None for an explainer that asks no LLM
    async with (
        client.session() if client is not None else contextlib.nullcontext(),
        refiner.judge.session() if refiner is not None else contextlib.nullcontext(),
    ):
        try:
            results = await stream_latents(
                todo,
                explain,
                workers=2 * client.max_concurrency if client is not None else 1,
                on_finished=keep,
                report=report,
                label="explanations",
            )
        finally:
            if journal is not None:
                journal.flush()
    if rounds is not None:
        kept_rounds = journal.finished("rounds").to_dict("records") if done else []
        rounds += [r for r in kept_rounds if r["latent"] in done] + [
            r for latent in todo for r in results[latent][1]
        ]
    if senses is not None:
        kept_senses = journal.finished("senses").to_dict("records") if done else []
        senses += [r for r in kept_senses if r["latent"] in done] + [
            r for latent in todo for r in results[latent][2]
        ]
    rows = [done[latent] if latent in done else results[latent][0] for latent in latents]
    return pd.DataFrame(
        rows, columns=TABLES["explanations"].columns[:-1]
    )  # the fingerprint is added by the asset


def viewer_links(base: str, coder: str, latents: list[int], n: int = 20) -> dict:
    """Links into the latent browser (`autointerp view` at `base`, the deployment's [settings] viewer_url):
    the coder's page and the first `n` latents' pages."""
    pages = "\n".join(
        f"- [latent {latent}]({latent_url(coder, latent, base)})" for latent in latents[:n]
    )
    return {
        "viewer": MetadataValue.url(coder_url(coder, base)),
        **({"latent_pages": MetadataValue.md(pages)} if pages else {}),
    }


EXPLANATIONS_VERSION = "4"
"""Bump when this stage's own code changes results; each explainer has its own `version` too."""
SENSES_VERSION = "2"
"""Bump when what `senses` > 1 writes changes (2: `explanation_senses.test_windows`); part of the code version only
with `senses` > 1, so that deployments without the option re-run nothing."""


def explanations_asset(
    defaults: dict | None = None,
    explainers: dict[str, type[Explainer]] | None = None,
    partitions_per_run: int = 1,
    models: Models = NO_MODELS,
) -> AssetsDefinition:
    """The `explanations` asset of a deployment: `defaults` are its [explanations] table. Its code version
    names the explainer model and the other models the explanations depend on (the subject model for
    output-side explainers, the embedder that picks the best of N)."""
    explainers = explainers or EXPLAINERS
    Configured = with_defaults(ExplanationsConfig, defaults or {}, "explanations")
    chosen = Configured()
    if chosen.explainer not in explainers:
        raise ValueError(
            f"[explanations] explainer = {chosen.explainer!r} is not an explainer. "
            f"Fix: use one of {sorted(explainers)}."
        )
    files = make_explainer(
        chosen, explainers, ExplainerDeps(llm=None)
    ).files_digest()  # checked now
    asks_llm = explainers[chosen.explainer].asks_llm
    roles = [
        *(["explainer"] if asks_llm else []),
        *(["subject_model"] if "subject_model" in explainers[chosen.explainer].uses else []),
        *(
            ["embedder"]
            if chosen.best_of_n > 1 or chosen.senses > 1 or chosen.stability_latents
            else []
        ),
        *(["judge"] if chosen.refine_rounds else []),
    ]
    version = (
        f"{EXPLANATIONS_VERSION}-{explainers[chosen.explainer].version}-{settings_digest(chosen)}"
        + models.version_part(*roles)
        + (f"-senses{SENSES_VERSION}" if chosen.senses > 1 else "")
        + (f"-files{files}" if files else "")
    )

    def explanations(
        context: AssetExecutionContext,
        config,
        settings: AutointerpSettings,
        llm: LLMResource,
        embedder: EmbedderResource,
        subject_model: SubjectModelResource,
    ):
        known = config.explainer in explainers  # else `make_explainer` names the fix
        uses = explainers[config.explainer].uses if known else frozenset()
        asks_llm = explainers[config.explainer].asks_llm if known else True

        def explain_shard(partition_key: str, asked=lambda: None) -> MaterializeResult:
            coder, shard = coder_and_shard(partition_key)
            store = settings.store
            layout = store.layout
            explanations_table = store.explanations(coder, shard)
            with explanations_table.lock(
                f"Explaining {coder} shard {shard}", wait=True
            ) as lease:  # held from reading the inputs to the commit
                exemplars = store.exemplars(
                    coder, shard
                ).require()  # read a chunk of latents at a time
                latent_stats = store.latent_profiles(coder, shard).read_if_present()
                latents = selected_latents(exemplars, settings.max_latents_per_shard)
                context.log.info(
                    f"explaining {len(latents)} latents of {coder} shard {shard} with "
                    f"{llm.backend if asks_llm else 'no LLM'} ({config.explainer}, "
                    f"best of {config.best_of_n})"
                )
                client = (
                    llm.client(
                        layout,
                        role="explainer",
                        coordination_url=settings.coordination_url,
                    )
                    if asks_llm
                    else None
                )
                deps = ExplainerDeps(
                    llm=client,
                    subject_model=subject_model if "subject_model" in uses else None,
                    coder=load_registered(layout.registry_dir, coder)
                    if "coder" in uses and latents
                    else None,
                )
                explainer = make_explainer(config, explainers, deps)
                judge = (
                    llm.client(
                        layout,
                        role="judge",
                        coordination_url=settings.coordination_url,
                    )
                    if config.refine_rounds
                    else None
                )
                refiner = (
                    Refiner(judge, config.refine_rounds, config.max_tokens)
                    if judge is not None
                    else None
                )
                exemplars_fingerprint = exemplars.fingerprint()
                files = explainer.files_digest()
                key = (
                    f"{version}|{settings_digest(config)}|{explainer.model}|"
                    f"{judge.identity if judge else ''}|{exemplars_fingerprint}"
                ) + (f"|{files}" if files else "")
                rounds: list[dict] = []
                senses: list[dict] = []
                reseeds_table = store.explanation_reseeds(coder, shard)
                vocab = corpus_prompt_vocab(load_corpus(layout))
                with store.writing(
                    explanations_table,
                    journal_key=key,
                    parts=("rounds", "senses", "rows"),
                    lease=lease,
                ) as writer:

                    async def explain_and_reseed() -> tuple[pd.DataFrame, list[dict]]:
                        explained = await explain_all(
                            explainer,
                            config,
                            exemplars,
                            latent_stats,
                            latents,
                            vocab,
                            embedder.embed,
                            context.log.info,
                            coder,
                            writer.journal,
                            refiner,
                            rounds,
                            senses,
                        )
                        if not config.stability_latents:
                            return explained, []
                        return explained, await explain_reseeds(
                            explainer,
                            config,
                            exemplars,
                            explained,
                            vocab,
                            embedder.embed,
                            coder,
                            refiner,
                        )

                    frame, reseeds = asyncio.run(explain_and_reseed())
                    asked()  # a range's next shard may ask now, while this one is written (`each_shard`)
                    frame["exemplars_fingerprint"] = (
                        exemplars_fingerprint  # what the scorers check they score against
                    )
                    if len(frame) and not (frame["status"] == "ok").any():
                        raise nothing_succeeded(
                            "explanations", f"all {len(frame)} latents failed", frame["error"]
                        )
                    writer.commit(
                        frame,
                        (
                            store.explanation_rounds(coder, shard),
                            pd.DataFrame(rounds, columns=TABLES["explanation_rounds"].columns),
                        ),
                        (
                            store.explanation_senses(coder, shard),
                            pd.DataFrame(senses, columns=TABLES["explanation_senses"].columns),
                        ),
                        *(
                            [
                                (
                                    reseeds_table,
                                    pd.DataFrame(
                                        reseeds, columns=TABLES["explanation_reseeds"].columns
                                    ),
                                )
                            ]
                            if config.stability_latents or reseeds_table.exists()
                            else []
                        ),  # off and never on: no table; turned off: emptied
                    )
                ok = frame[frame["status"] == "ok"]
                sync_explanations(
                    layout.lancedb_dir,
                    embedder.model,
                    coder,
                    shard,
                    dict(zip(ok["latent"].tolist(), ok["explanation"], strict=False)),
                    embedder.embed,
                    settings.coordination_url,
                )
                budget_stopped = int(frame["error"].map(stopped_by_budget).sum())
                accounted = shard_accounting(store, coder, shard)  # every latent of the shard
                if budget_stopped:
                    context.log.warning(
                        f"{budget_stopped} latents were not explained: "
                        "the LLM budget was reached; they will be asked next time"
                    )
                return MaterializeResult(
                    check_results=explanations_results(frame),
                    metadata={
                        **(
                            {}
                            if latents
                            else {"note": "empty shard: no explainable latent, nothing asked"}
                        ),
                        "settings": MetadataValue.json(config.model_dump()),
                        "explainer_model": explainer.model,
                        **({"explainer_files": files} if files else {}),
                        "embedder": embedder.identity(),  # the search vectors' (and best-of-N's) model
                        **(
                            {"subject_model": subject_model.identity()}
                            if "subject_model" in uses
                            else {}
                        ),
                        "explained": len(ok),
                        **(
                            {"latents_with_several_senses": len({r["latent"] for r in senses})}
                            if config.senses > 1
                            else {}
                        ),
                        **(
                            {
                                "reseeded": sum(r["status"] == "ok" for r in reseeds),
                                "mean_reseed_similarity": MetadataValue.float(
                                    float(np.nanmean([r["similarity"] for r in reseeds]))
                                    if any(r["status"] == "ok" for r in reseeds)
                                    else float("nan")
                                ),
                            }
                            if config.stability_latents
                            else {}
                        ),
                        "failed": int((frame["status"] == "failed").sum()),
                        "stopped_by_budget": budget_stopped,
                        **(
                            {"latent_accounting": MetadataValue.json(accounted)}
                            if accounted
                            else {}
                        ),
                        "examples_dropped_to_fit": int(frame["examples_dropped"].sum()),
                        **(client.ledger.as_metadata() if client is not None else {}),
                        **(
                            {f"judge_{k}": v for k, v in judge.ledger.as_metadata().items()}
                            if judge
                            else {}
                        ),
                        **(
                            {
                                "judge_model": judge.identity,
                                "revisions_kept": int(
                                    sum(r["kept"] and r["round"] > 0 for r in rounds)
                                ),
                                "requests_per_latent": round(
                                    (client.ledger.requests + judge.ledger.requests)
                                    / max(1, len(latents)),
                                    2,
                                ),
                            }
                            if judge
                            else {}
                        ),
                        "sample": MetadataValue.md(
                            frame.head(10)[
                                ["latent", "explanation", "status", "error"]
                            ].to_markdown(index=False)
                        ),
                        **viewer_links(settings.viewer_url, coder, ok["latent"].tolist()),
                        "path": MetadataValue.path(explanations_table.location),
                    },
                )

        yield from each_shard(
            context, explain_shard, overlap=overlaps_shards(llm, "explainer", uses)
        )

    explanations.__annotations__.update(
        config=Configured,
        context=AssetExecutionContext,
        settings=AutointerpSettings,
        llm=LLMResource,
        embedder=EmbedderResource,
        subject_model=SubjectModelResource,
    )
    return asset(
        name="explanations",
        group_name="autointerp",
        partitions_def=shard_partitions,
        deps=[AssetDep("exemplars")],
        code_version=version,
        automation_condition=FOLLOW | CODE_CHANGED,
        backfill_policy=backfill_policy(partitions_per_run),
        output_required=False,  # a range records each shard itself (`each_shard`)
        **in_pool(LLM_POOL),
        check_specs=explanations_specs(),
        description="One natural-language explanation per latent from the deployment's explainer "
        "plugin (optionally best of N), embedded into LanceDB.",
    )(explanations)
