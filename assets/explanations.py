"""Stage 4, `explanations`: one explanation per latent from the chosen explainer, optionally best of N.

Explainers: `highlighted` (delphi's default: activating tokens marked, strengths listed),
`contrastive` (delphi: plus hard-negative counter-examples), `token_table` (OpenAI: every token
with its 0-10 activation) and `top_tokens` (OpenAI's token-space explainer: the vocabulary tokens
with the highest mean activation). With `best_of_n > 1`, N candidates are sampled and each is
scored by the embedding scorer on the held-out `valid` windows; the best is kept and every
candidate is stored with its score (Transluce). Requests go through the production client
(response cache, bounded concurrency, retries, ledger, budget). A latent whose answer cannot be
parsed, or that the budget stopped, is stored as failed with its reason; it never fails the
partition and is asked again on the next materialization.
"""
import asyncio
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from dagster import AssetDep, AssetExecutionContext, Config, Failure, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.automation import FOLLOW, LLM_POOL
from assets.corpus import load_corpus
from assets.partitions import coder_and_shard, coder_shard_partitions
from assets.prompts import REASK_EXPLANATION, contrastive_messages, explainer_messages, parse_explanation, plain_text, token_table_messages, top_tokens_messages
from assets.score_metrics import roc_auc
from assets.scorers import explanation_similarity
from resources.embedder import EmbedderResource
from resources.llm import BudgetExceeded, LLMEndpointError, LLMResource, ProductionClient, gather_with_progress
from resources.settings import AutointerpSettings
from storage.tables import file_fingerprint, read_table, refuse_emptier, write_table
from storage.vector_store import upsert_explanations

EXPLANATION_COLUMNS = ["latent", "explainer", "explanation", "status", "error", "prompt_tokens", "completion_tokens", "model", "candidates", "candidate_scores", "examples_dropped"]
EXPLANATIONS_SCHEMA = pa.schema([
    ("latent", pa.int64()), ("explainer", pa.large_string()), ("explanation", pa.large_string()), ("status", pa.large_string()), ("error", pa.large_string()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("model", pa.large_string()), ("candidates", pa.list_(pa.string())),
    ("candidate_scores", pa.list_(pa.float64())), ("examples_dropped", pa.int64()), ("exemplars_fingerprint", pa.large_string()),
])


class ExplanationsConfig(Config):
    explainer: Literal["highlighted", "contrastive", "token_table", "top_tokens"] = Field(default="highlighted", description="Which explainer writes the explanation.")
    best_of_n: int = Field(default=1, description="Candidates per latent; above 1 the best by embedding score on held-out windows is kept.")
    candidate_temperature: float = Field(default=0.7, description="Sampling temperature of best-of-N candidates (a single explanation uses 0).")
    max_tokens: int = Field(default=48, description="Longest explanation, in tokens.")


def nothing_succeeded(asset: str, what: str, reasons: pd.Series) -> Failure:
    """A run in which every latent failed is no result: it fails, and the previous table stays."""
    common = reasons[reasons != ""].value_counts().head(3)
    listed = "; ".join(f"{n}× {reason[:300]}" for reason, n in common.items())
    return Failure(f"{asset}: {what}, so nothing was written and the previous results are kept. Most common reasons: {listed}")


def selected_latents(exemplars: pd.DataFrame, max_latents: int) -> list[int]:
    latents = sorted(int(x) for x in exemplars["latent"].unique())
    return latents[:max_latents] if max_latents else latents


def explainer_prompt(config: ExplanationsConfig, group: pd.DataFrame, stats: dict | None, vocab: list[str], client: ProductionClient) -> tuple[list[dict] | None, int]:
    """The explainer's prompt with as many of its examples (strongest first) as fit the LLM's context,
    and how many were dropped to fit; None when not even one fits."""
    train = group[group["split"] == "train"]
    shown = train[train["kind"] == "activating"]
    examples = [([vocab[t] for t in row.tokens], list(row.activations)) for row in shown.itertuples()]
    top = float(shown["max_activation"].max())
    if config.explainer == "contrastive":
        counters = [[vocab[t] for t in row.tokens] for row in train[train["kind"] != "activating"].itertuples()]
        return client.fitting(lambda kept: contrastive_messages(kept, counters, top), examples, config.max_tokens)
    if config.explainer == "token_table":
        return client.fitting(lambda kept: token_table_messages(kept, top), examples, config.max_tokens)
    if config.explainer == "top_tokens":
        if not stats or not len(stats["top_tokens"]):
            raise ValueError("no token fires this latent twice: top_tokens has nothing to show")
        tokens = list(zip([vocab[t] for t in stats["top_tokens"]], stats["top_token_mean_activation"]))
        return client.fitting(lambda kept: top_tokens_messages([t for t, _ in kept], [float(a) for _, a in kept]), tokens, config.max_tokens)
    return client.fitting(lambda kept: explainer_messages(kept, top), examples, config.max_tokens)


def window_texts(rows: pd.DataFrame, vocab: list[str]) -> list[str]:
    """Windows as plain text, for the embedder."""
    return [plain_text("".join(vocab[t] for t in row.tokens)) for row in rows.itertuples()]


def embedding_scores(candidates: list[str], valid: pd.DataFrame, vocab: list[str], embed) -> list[float]:
    """ROC AUC of each candidate's embedding similarity at telling held-out activating windows from random ones."""
    labels = (valid["kind"] == "activating").to_numpy()
    if not len(candidates) or labels.all() or not labels.any():
        return [float("nan")] * len(candidates)
    sims = explanation_similarity(embed, candidates, window_texts(valid, vocab))
    return [roc_auc(sims[:, i], labels) for i in range(len(candidates))]


async def ask_explanation(client: ProductionClient, messages: list[dict], params: dict) -> tuple[str | None, list]:
    """One candidate explanation (asked again once if unreadable), and every answer received."""
    answers = []
    return await client.ask_readable(messages, parse_explanation, REASK_EXPLANATION, answers, **params), answers


async def explain_latent(client: ProductionClient, config: ExplanationsConfig, latent: int, group: pd.DataFrame, stats: dict | None, vocab: list[str], embed) -> dict:
    row = {"latent": latent, "explainer": config.explainer, "model": client.model_name, "prompt_tokens": 0, "completion_tokens": 0,
           "error": "", "explanation": "", "status": "failed", "candidates": [], "candidate_scores": [], "examples_dropped": 0}
    try:
        messages, dropped = explainer_prompt(config, group, stats, vocab, client)
        row["examples_dropped"] = dropped
        if messages is None:
            return {**row, "error": "prompt longer than the LLM's context even with one example"}
        n = max(1, config.best_of_n)
        params = [{"max_tokens": config.max_tokens, "temperature": 0.0 if n == 1 else config.candidate_temperature, "seed": None if n == 1 else i} for i in range(n)]
        outcomes = await asyncio.gather(*(ask_explanation(client, messages, p) for p in params))
    except LLMEndpointError:
        raise
    except BudgetExceeded as stop:
        return {**row, "error": f"budget: {stop}"}
    except Exception as error:  # one latent's failure must not fail the partition
        return {**row, "error": f"{type(error).__name__}: {error}"}
    answers = [a for _, received in outcomes for a in received]
    row["prompt_tokens"] = sum(a.prompt_tokens for a in answers)
    row["completion_tokens"] = sum(a.completion_tokens for a in answers)
    candidates = [e for e, _ in outcomes if e]
    if not candidates:
        raws = " then ".join(repr(a.text[:200]) for a in outcomes[0][1])
        return {**row, "error": f"unreadable answer: {raws}"}
    scores = embedding_scores(candidates, group[group["split"] == "valid"], vocab, embed) if len(candidates) > 1 else [float("nan")]
    best = int(np.nanargmax(scores)) if not np.all(np.isnan(scores)) else 0
    return {**row, "explanation": candidates[best], "status": "ok", "candidates": candidates, "candidate_scores": [float(s) for s in scores]}


async def explain_all(client: ProductionClient, config: ExplanationsConfig, exemplars: pd.DataFrame, latent_stats: pd.DataFrame | None,
                      latents: list[int], vocab: list[str], embed, report=None) -> pd.DataFrame:
    stats_of = {int(r["latent"]): r for r in latent_stats.to_dict("records")} if latent_stats is not None else {}
    groups = dict(tuple(exemplars[exemplars["latent"].isin(latents)].groupby("latent")))
    async with client.session():
        jobs = [explain_latent(client, config, latent, groups[latent], stats_of.get(latent), vocab, embed) for latent in latents]
        return pd.DataFrame(await gather_with_progress(jobs, report, "explanations"), columns=EXPLANATION_COLUMNS)


def viewer_links(coder: str, latents: list[int], n: int = 20) -> dict:
    """Links into the latent browser (`autointerp view`): the coder's page and the first `n` latents' pages."""
    from autointerp_defs.viewer import coder_url, latent_url  # here, not at the top: the package imports the assets

    pages = "\n".join(f"- [latent {latent}]({latent_url(coder, latent)})" for latent in latents[:n])
    return {"viewer": MetadataValue.url(coder_url(coder)), **({"latent_pages": MetadataValue.md(pages)} if pages else {})}


@asset(
    group_name="autointerp",
    partitions_def=coder_shard_partitions,
    deps=[AssetDep("exemplars")],
    code_version="2",
    automation_condition=FOLLOW,
    pool=LLM_POOL,
    description="One natural-language explanation per latent (highlighted, contrastive, token-table or top-tokens explainer, optionally best of N), embedded into LanceDB.",
)
def explanations(
    context: AssetExecutionContext, config: ExplanationsConfig, settings: AutointerpSettings, llm: LLMResource, embedder: EmbedderResource
) -> MaterializeResult:
    coder, shard = coder_and_shard(context.partition_key)
    root = settings.root
    exemplars = read_table(root.exemplars_path(coder, shard), "exemplars")
    latent_stats = pd.read_parquet(root.latent_stats_path(coder, shard)) if root.latent_stats_path(coder, shard).exists() else None
    latents = selected_latents(exemplars, settings.max_latents_per_shard)
    context.log.info(f"explaining {len(latents)} latents of {coder} shard {shard} with {llm.backend} ({config.explainer}, best of {config.best_of_n})")
    client = llm.client(root.llm_cache_dir)
    frame = asyncio.run(explain_all(client, config, exemplars, latent_stats, latents, load_corpus(root).prompt_vocab, embedder.embed, context.log.info))
    frame["exemplars_fingerprint"] = file_fingerprint(root.exemplars_path(coder, shard))  # what the scorers check they score against
    if len(frame) and not (frame["status"] == "ok").any():
        raise nothing_succeeded("explanations", f"all {len(frame)} latents failed", frame["error"])
    refuse_emptier(frame, root.explanations_path(coder, shard), f"explanations of {coder} shard {shard}", settings.allow_empty_results)
    write_table(frame, root.explanations_path(coder, shard), EXPLANATIONS_SCHEMA)
    ok = frame[frame["status"] == "ok"]
    if len(ok):
        upsert_explanations(root.lancedb_dir, coder, ok["latent"].tolist(), ok["explanation"].tolist(), embedder.embed(ok["explanation"].tolist()))
    budget_stopped = int(frame["error"].str.startswith("budget:").sum())
    if budget_stopped:
        context.log.warning(f"{budget_stopped} latents were not explained: the LLM budget was reached; they will be asked next time")
    return MaterializeResult(
        metadata={
            **({} if latents else {"note": "empty shard: no explainable latent, nothing asked"}),
            "explained": len(ok),
            "failed": int((frame["status"] == "failed").sum()),
            "stopped_by_budget": budget_stopped,
            "examples_dropped_to_fit": int(frame["examples_dropped"].sum()),
            **client.ledger.as_metadata(),
            "sample": MetadataValue.md(frame.head(10)[["latent", "explanation", "status", "error"]].to_markdown(index=False)),
            **viewer_links(coder, ok["latent"].tolist()),
            "path": MetadataValue.path(str(root.explanations_path(coder, shard))),
        }
    )
