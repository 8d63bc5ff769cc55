"""Stage 5, `scores`: detection and fuzzing scores per latent, each beside its shuffled-explanation control.

Both scorers are delphi's: the scorer LLM reads the explanation and labels held-out windows
(detection: does the latent fire in this text? fuzzing: are the marked tokens what it is about?).
The control re-runs the same scorer with another latent's explanation; a score only means
something when it beats its control, and the summary says so.
"""

import asyncio
import base64
import io
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from dagster import AssetDep, AssetExecutionContext, AutomationCondition, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.corpus import load_corpus
from assets.partitions import coder_and_shard, coder_shard_partitions
from assets.prompts import DETECTION_SYSTEM, FUZZING_SYSTEM, highlight, parse_binary_list, scorer_messages
from resources.llm import LLMEndpointError, LLMResource, ProductionClient, gather_with_progress
from resources.settings import AutointerpSettings
from storage.tables import read_table, write_table

SCORERS = ("detection", "fuzzing")
METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1")


class ScoresConfig(Config):
    batch_size: int = Field(default=5, description="Examples per scorer prompt (delphi's default is 5).")
    seed: int = Field(default=0, description="Seed of example order, fuzzing highlights and the control's explanation shuffle.")


def binary_metrics(y_true: list[int], y_pred: list[int]) -> dict[str, float]:
    """Accuracy, balanced accuracy, precision, recall and F1 of 0/1 labels (NaN where undefined)."""
    t, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    tp, tn = int((t & p).sum()), int((~t & ~p).sum())
    fp, fn = int((~t & p).sum()), int((t & ~p).sum())
    nan = float("nan")
    precision = tp / (tp + fp) if tp + fp else nan
    recall = tp / (tp + fn) if tp + fn else nan
    specificity = tn / (tn + fp) if tn + fp else nan
    return {
        "accuracy": (tp + tn) / len(t) if len(t) else nan,
        "balanced_accuracy": (recall + specificity) / 2 if not (math.isnan(recall) or math.isnan(specificity)) else nan,
        "precision": precision,
        "recall": recall,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
    }


def roc_auc(scores, labels) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN without both."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def control_assignment(latents: list[int], seed: int) -> dict[int, int]:
    """Give each latent another latent's explanation: a seeded derangement (empty below two latents)."""
    if len(latents) < 2:
        return {}
    order = list(np.random.default_rng(seed).permutation(latents))
    return {latent: order[(i + 1) % len(order)] for i, latent in enumerate(order)}


@dataclass
class ScoringExample:
    text_plain: str
    text_marked: str
    label: int


def scoring_examples(test: pd.DataFrame, vocab: list[str], rng: np.random.Generator) -> list[ScoringExample]:
    """Held-out windows in a seeded order; non-activating windows get random fuzzing highlights."""
    activating = test[test["kind"] == "activating"]
    typical_marks = max(1, int(np.median([np.count_nonzero(a) for a in activating["activations"]]))) if len(activating) else 1
    examples = []
    for row in test.itertuples():
        token_strs = [vocab[t] for t in row.tokens]
        acts = np.asarray(row.activations)
        if row.kind == "activating":
            marks = acts > 0
        else:
            marks = np.zeros(len(acts), bool)
            marks[rng.choice(len(acts), size=min(typical_marks, len(acts)), replace=False)] = True
        examples.append(ScoringExample("".join(token_strs).replace("\n", " "), highlight(token_strs, marks.tolist()), int(row.kind == "activating")))
    return [examples[i] for i in rng.permutation(len(examples))]


async def _label_batch(client: ProductionClient, scorer: str, explanation: str, batch: list[ScoringExample]):
    system = DETECTION_SYSTEM if scorer == "detection" else FUZZING_SYSTEM
    texts = [e.text_plain if scorer == "detection" else e.text_marked for e in batch]
    messages = scorer_messages(system, explanation, texts)
    params = {"max_tokens": 8 + 4 * len(batch), "binary_list": len(batch)}
    try:
        answer = await client.complete(messages, **params)
    except LLMEndpointError:
        raise
    except Exception:  # a failed batch (budget, errors) drops its examples; the latent is scored on the rest
        return None, 0
    labels = parse_binary_list(answer.text, len(batch))
    if labels is None:
        client.forget(messages, **params)
    return labels, answer.prompt_tokens


async def score_explanation(client: ProductionClient, scorer: str, explanation: str, examples: list[ScoringExample], batch_size: int) -> dict:
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    answers = await asyncio.gather(*(_label_batch(client, scorer, explanation, b) for b in batches))
    y_true, y_pred, failed, prompt_tokens = [], [], 0, 0
    for batch, (labels, tokens) in zip(batches, answers):
        prompt_tokens += tokens
        if labels is None:
            failed += len(batch)
            continue
        y_true += [e.label for e in batch]
        y_pred += labels
    return {**binary_metrics(y_true, y_pred), "n_scored": len(y_true), "n_failed": failed, "prompt_tokens": prompt_tokens}


async def score_partition(client: ProductionClient, exemplars: pd.DataFrame, explanations: pd.DataFrame, vocab: list[str], config: ScoresConfig, report=None) -> pd.DataFrame:
    await client.check()
    ok = explanations[explanations["status"] == "ok"]
    text_of = dict(zip(ok["latent"].astype(int), ok["explanation"]))
    control_of = control_assignment(sorted(text_of), config.seed)
    test = exemplars[exemplars["split"] == "test"]
    jobs, keys = [], []
    for latent, explanation in sorted(text_of.items()):
        examples = scoring_examples(test[test["latent"] == latent], vocab, np.random.default_rng([config.seed, latent]))
        for scorer in SCORERS:
            jobs.append(score_explanation(client, scorer, explanation, examples, config.batch_size))
            keys.append((latent, scorer, "own"))
            if latent in control_of:
                jobs.append(score_explanation(client, scorer, text_of[control_of[latent]], examples, config.batch_size))
                keys.append((latent, scorer, "control"))
    results = dict(zip(keys, await gather_with_progress(jobs, report, "scoring jobs (latent × scorer × explanation)")))
    rows = []
    for latent, explanation in sorted(text_of.items()):
        for scorer in SCORERS:
            own = results[(latent, scorer, "own")]
            control = results.get((latent, scorer, "control"), {m: float("nan") for m in METRICS})
            rows.append(
                {
                    "latent": latent,
                    "scorer": scorer,
                    "explanation": explanation,
                    **{m: own[m] for m in (*METRICS, "n_scored", "n_failed", "prompt_tokens")},
                    **{f"control_{m}": control[m] for m in METRICS},
                    "gap": own["balanced_accuracy"] - control["balanced_accuracy"],
                }
            )
    return pd.DataFrame(rows)


def verdict(gaps: pd.Series) -> str:
    """Whether a scorer's mean gap over its control is clearly above zero (mean - 2 standard errors > 0)."""
    gaps = gaps.dropna()
    if len(gaps) < 2:
        return "uninformative: fewer than two latents have a control"
    mean, se = gaps.mean(), gaps.std(ddof=1) / math.sqrt(len(gaps))
    if mean - 2 * se > 0:
        return f"informative: beats the shuffled-explanation control by {mean:.3f} ± {se:.3f}"
    return f"uninformative: does not beat the shuffled-explanation control (gap {mean:.3f} ± {se:.3f})"


def histogram_png(frame: pd.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCORERS), figsize=(4 * len(SCORERS), 3), sharey=True)
    bins = np.linspace(0, 1, 11)
    for ax, scorer in zip(np.atleast_1d(axes), SCORERS):
        part = frame[frame["scorer"] == scorer]
        ax.hist(part["balanced_accuracy"].dropna(), bins=bins, alpha=0.7, label="explanation")
        ax.hist(part["control_balanced_accuracy"].dropna(), bins=bins, alpha=0.5, label="shuffled control")
        ax.axvline(0.5, color="k", linestyle=":", linewidth=1)
        ax.set_title(scorer)
        ax.set_xlabel("balanced accuracy")
    np.atleast_1d(axes)[0].set_ylabel("latents")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def summary_metadata(frame: pd.DataFrame) -> dict:
    metadata = {"latents_scored": int(frame["latent"].nunique()) if len(frame) else 0}
    for scorer in SCORERS:
        part = frame[frame["scorer"] == scorer] if len(frame) else frame
        for metric in ("accuracy", "f1", "balanced_accuracy", "control_balanced_accuracy"):
            mean = round(float(part[metric].mean()), 4) if len(part) else float("nan")
            metadata[f"{scorer}_{metric}"] = MetadataValue.float(mean)
        metadata[f"{scorer}_verdict"] = verdict(part["gap"]) if len(part) else "uninformative: nothing scored"
    return metadata


@asset(
    group_name="autointerp",
    partitions_def=coder_shard_partitions,
    deps=[AssetDep("exemplars"), AssetDep("explanations")],
    code_version="1",
    automation_condition=AutomationCondition.eager(),
    description="Detection and fuzzing scores per latent, each with a shuffled-explanation control and a verdict.",
)
def scores(context: AssetExecutionContext, config: ScoresConfig, settings: AutointerpSettings, llm: LLMResource) -> MaterializeResult:
    coder, shard = coder_and_shard(context.partition_key)
    root = settings.root
    exemplars = read_table(root.exemplars_path(coder, shard), "exemplars")
    explanations = read_table(root.explanations_path(coder, shard), "explanations")
    client = llm.client(root.llm_cache_dir)
    frame = asyncio.run(score_partition(client, exemplars, explanations, load_corpus(root).vocab, config, context.log.info))
    write_table(frame, root.scores_path(coder, shard))
    metadata = {**summary_metadata(frame), **client.ledger.as_metadata()}
    if len(frame):
        png = histogram_png(frame)
        root.scores_plot_path(coder, shard).write_bytes(png)
        metadata["histogram"] = MetadataValue.md(f"![scores](data:image/png;base64,{base64.b64encode(png).decode()})")
        table = frame[["latent", "scorer", "balanced_accuracy", "control_balanced_accuracy", "f1", "explanation"]]
        metadata["per_latent"] = MetadataValue.md(table.round(3).to_markdown(index=False))
    for scorer in SCORERS:
        context.log.info(f"{scorer}: {metadata[f'{scorer}_verdict']}")
    return MaterializeResult(metadata=metadata)
