"""Stage 4, `explanations`: one explanation per latent from the highlighted-token explainer (delphi's default).

Requests go through the shared async LLM client with bounded concurrency. A latent whose answer
cannot be parsed is stored as failed with its reason; it never fails the partition.
"""

import asyncio

import pandas as pd
from dagster import AssetDep, AssetExecutionContext, AutomationCondition, MaterializeResult, MetadataValue, asset

from assets.corpus import load_corpus
from assets.partitions import coder_and_shard, coder_shard_partitions
from assets.prompts import explainer_messages, parse_explanation
from resources.embedder import EmbedderResource
from resources.llm import LLMClient, LLMEndpointError, LLMResource, gather_with_progress
from resources.settings import AutointerpSettings
from storage.tables import read_table, write_table
from storage.vector_store import upsert_explanations

EXPLAINER = "highlighted"
EXPLANATION_COLUMNS = ["latent", "explainer", "explanation", "status", "error", "prompt_tokens", "completion_tokens", "model"]


def selected_latents(exemplars: pd.DataFrame, max_latents: int) -> list[int]:
    latents = sorted(int(x) for x in exemplars["latent"].unique())
    return latents[:max_latents] if max_latents else latents


async def explain_latent(client: LLMClient, latent: int, train: pd.DataFrame, vocab: list[str]) -> dict:
    examples = [([vocab[t] for t in row.tokens], list(row.activations)) for row in train.itertuples()]
    row = {"latent": latent, "explainer": EXPLAINER, "model": client.model_name, "prompt_tokens": 0, "completion_tokens": 0, "error": ""}
    try:
        answer = await client.complete(explainer_messages(examples, float(train["max_activation"].max())), max_tokens=48)
    except LLMEndpointError:
        raise
    except Exception as error:  # one latent's failure must not fail the partition
        return {**row, "explanation": "", "status": "failed", "error": f"{type(error).__name__}: {error}"}
    explanation = parse_explanation(answer.text)
    return {
        **row,
        "explanation": explanation or "",
        "status": "ok" if explanation else "failed",
        "error": "" if explanation else f"unparseable answer: {answer.text[:200]!r}",
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
    }


async def explain_all(client: LLMClient, exemplars: pd.DataFrame, latents: list[int], vocab: list[str], report=None) -> pd.DataFrame:
    await client.check()
    train = exemplars[exemplars["split"] == "train"]
    jobs = [explain_latent(client, latent, train[train["latent"] == latent], vocab) for latent in latents]
    return pd.DataFrame(await gather_with_progress(jobs, report, "explanations"), columns=EXPLANATION_COLUMNS)


@asset(
    group_name="autointerp",
    partitions_def=coder_shard_partitions,
    deps=[AssetDep("exemplars")],
    code_version="1",
    automation_condition=AutomationCondition.eager(),
    description="One natural-language explanation per latent (highlighted-token explainer), also embedded into LanceDB.",
)
def explanations(
    context: AssetExecutionContext, settings: AutointerpSettings, llm: LLMResource, embedder: EmbedderResource
) -> MaterializeResult:
    coder, shard = coder_and_shard(context.partition_key)
    root = settings.root
    exemplars = read_table(root.exemplars_path(coder, shard), "exemplars")
    latents = selected_latents(exemplars, settings.max_latents_per_shard)
    context.log.info(f"explaining {len(latents)} latents of {coder} shard {shard} with {llm.backend}")
    frame = asyncio.run(explain_all(llm.client(), exemplars, latents, load_corpus(root).vocab, context.log.info))
    write_table(frame, root.explanations_path(coder, shard))
    ok = frame[frame["status"] == "ok"]
    if len(ok):
        upsert_explanations(root.lancedb_dir, coder, ok["latent"].tolist(), ok["explanation"].tolist(), embedder.embed(ok["explanation"].tolist()))
    return MaterializeResult(
        metadata={
            "explained": len(ok),
            "failed": int((frame["status"] == "failed").sum()),
            "prompt_tokens": int(frame["prompt_tokens"].sum()),
            "completion_tokens": int(frame["completion_tokens"].sum()),
            "sample": MetadataValue.md(frame.head(10)[["latent", "explanation", "status"]].to_markdown(index=False)),
            "path": MetadataValue.path(str(root.explanations_path(coder, shard))),
        }
    )
