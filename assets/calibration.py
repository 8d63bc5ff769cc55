"""The `calibration` asset: a judge's calibration card, made once per judge.

Latents whose truth is planted (`resources/planted_coder.py`: digits, negation words, colons and semicolons,
tokens inside parentheses, a latent with two of those senses, and latents firing at random) are encoded on the
deployment's own corpus and tokenizer, given exemplars by the exemplars stage's own sampler, explained by the
deployment's explainer and scored by its automated LLM scorers with their controls, exactly as a real coder's
latents are. The card says per scorer what the judge makes of them: the mean main metric of the planted latents
with its 95 % interval, their gap over the control, the random latents' gap (about 0 for a sound judge), and a
verdict, "can tell" only where the planted gap's interval lies above 0; and how often the explanation names its
planted class (the embedder's cosine to the class's description at or above `NAMED_THRESHOLD`). The card is a
JSON file keyed by the judge's identity (`DataRoot.calibration_card_path`): every score that judge made is
shown beside it (the summary's `<scorer>_calibration`, the scorer's metadata, the browser's coders page).
"""

import asyncio
import math
import time

import numpy as np
import pandas as pd
from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetsDefinition,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.automation import LLM_POOL, in_pool
from assets.cards import card_line
from assets.exemplars import ExemplarsConfig, NegativeSources, context_index, exemplar_batches
from assets.explainers import ExplainerDeps
from assets.explanations import ExplanationsConfig, explain_all, make_explainer
from assets.prompts import corpus_prompt_vocab
from assets.refine import Refiner
from assets.score_metrics import mean_interval, verdict, wilson
from assets.scorers import Scorer, ScorerDeps, ScorerSettings
from assets.scores import score_partition
from assets.stage_config import NO_MODELS, Models, with_defaults
from resources.embedder import unit_vectors
from resources.planted_coder import CLASSES, PlantedCoder, PlantedLatent, planted_latents
from storage.activations import ShardActivations
from storage.calibration_cards import read_card, write_card
from storage.corpus import Corpus, load_corpus

CALIBRATION_VERSION = "1"
"""Of the card's own code: part of the asset's code version with the judge's identity."""
NAMED_THRESHOLD = 0.5
"""An explanation names its planted class when the embedder's cosine between the two (the class's
description in `CLASSES`) is at least this: 'digits' and 'numbers' pass it, an unrelated phrase does not."""
AGAINST = "the shuffled-explanation control"


class CalibrationConfig(Config):
    latents_per_class: int = Field(
        default=2, ge=1, description="Planted latents per class (and of the two-sense pair)."
    )
    random_latents: int = Field(
        default=4, ge=2, description="Latents firing at random tokens (no text explains them)."
    )
    seed: int = Field(default=0, description="Seed of the random latents and the values.")
    force: bool = Field(
        default=False, description="Make the card again although this judge has one."
    )


def calibrated_scorers(scorers: dict[str, type[Scorer]], names) -> dict[str, type[Scorer]]:
    """The scorers of `names` the card covers: those that ask the judge about an explanation and read only
    windows (a scorer that steers the coder or reads the subject model has nothing to read of a planted one)."""
    return {
        name: scorers[name]
        for name in names
        if name in scorers
        and "llm" in scorers[name].uses
        and scorers[name].control == "shuffled_explanation"
        and not scorers[name].uses & {"coder", "subject_model"}
    }


def planted_exemplars(
    corpus: Corpus,
    latents: list[PlantedLatent],
    config: ExemplarsConfig,
    seed: int,
    contexts=None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(exemplars, latent profiles) of the planted latents on the corpus, by the exemplars stage's sampler.
    Non-activating windows come from the configured sources but 'neighbour' (planted latents have no decoder);
    'embedding' needs the corpus's `contexts` (`assets.exemplars.context_index`)."""
    locations, values = PlantedCoder(latents, seed).encode(
        corpus.tokens, corpus.vocab, corpus.special_ids
    )
    width = len(latents)
    stats = {
        "count": np.bincount(locations[:, 2], minlength=width),
        "sum": np.bincount(locations[:, 2], weights=values, minlength=width),
        "max": np.zeros(width),
    }
    np.maximum.at(stats["max"], locations[:, 2], values)
    blocks_per_seq = corpus.tokens.shape[1] // config.example_ctx_len
    sources = NegativeSources(
        blocks_per_seq, corpus.tokens.shape[0] * blocks_per_seq, {}, None, contexts
    )
    batches = list(
        exemplar_batches(
            ShardActivations(locations, values),
            corpus.tokens,
            config,
            sources,
            stats,
            corpus.tokens.size,
        )
    )
    frames = [frame for frame, _ in batches]
    return (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
        pd.concat([p for _, p in batches], ignore_index=True) if batches else pd.DataFrame(),
    )


def without_neighbours(config: ExemplarsConfig) -> ExemplarsConfig:
    sources = [s for s in config.non_activating_sources if s != "neighbour"] or ["random"]
    return ExemplarsConfig(**{**config.model_dump(), "non_activating_sources": sources})


async def explain_and_score(
    explainer,
    config: ExplanationsConfig,
    exemplars: pd.DataFrame,
    profiles: pd.DataFrame,
    vocab: list[str],
    embed,
    judges: dict[str, Scorer],
    refiner: Refiner | None = None,
    report=None,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The planted latents' explanations, then each judge's scores of them with controls, as the stages make
    them; in one event loop, the clients' own."""
    latents = sorted(set(exemplars["latent"].astype(int))) if len(exemplars) else []
    explained = await explain_all(
        explainer, config, exemplars, profiles, latents, vocab, embed, report, refiner=refiner
    )
    scored = {}
    for name, judge in judges.items():
        scored[name], _ = await score_partition(judge, exemplars, explained, vocab, report=report)
    return explained, scored


def named(explained: pd.DataFrame, latents: list[PlantedLatent], embed) -> dict[int, float]:
    """Per planted latent explained: the highest cosine of its explanation to the descriptions of its classes."""
    ok = explained[explained["status"] == "ok"]
    classes = {p.latent: p.classes for p in latents if p.classes}
    rows = [(int(r.latent), r.explanation) for r in ok.itertuples() if int(r.latent) in classes]
    if not rows:
        return {}
    names = list(CLASSES)
    vectors = unit_vectors(embed([CLASSES[n] for n in names] + [text for _, text in rows]))
    similarity = vectors[len(names) :] @ vectors[: len(names)].T
    return {
        latent: float(max(similarity[i, names.index(c)] for c in classes[latent]))
        for i, (latent, _) in enumerate(rows)
    }


def number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def judged_verdict(planted_gaps: pd.Series, random_gaps: pd.Series) -> str:
    """'can tell' only where the planted latents' gap over the control has a 95 % interval above 0 (the
    score verdict's rule, `verdict`); else 'cannot tell', with why. A random latents' gap whose interval
    excludes 0 is said too: then the control is not neutral for this judge."""
    said = verdict(planted_gaps, AGAINST)
    head, _, detail = said.partition(": ")
    text = (
        f"can tell: on the planted latents, the explanation {detail}"
        if head == "informative"
        else f"cannot tell: the judge does not tell the planted latents' explanations from {AGAINST}; "
        + detail
    )
    lo, hi = mean_interval(random_gaps)
    if lo > 0 or hi < 0:
        text += (
            f"; the random latents' gap {random_gaps.mean():+.3f} [{lo:.3f}, {hi:.3f}] excludes 0: "
            "the control is not neutral for this judge"
        )
    return text


def scorer_card(frame: pd.DataFrame, main: str, kind: dict[int, str]) -> dict:
    frame = frame.assign(kind=frame["latent"].astype(int).map(kind))
    planted, random = frame[frame["kind"] == "planted"], frame[frame["kind"] == "random"]
    part = {"main_metric": main}
    for name, rows in (("planted", planted), ("random", random)):
        scored = rows[main].dropna()
        part[name] = {
            "latents": len(scored),
            "with_control": int(rows["gap"].notna().sum()),
            "mean": number(scored.mean()) if len(scored) else None,
            "mean_interval": [number(x) for x in mean_interval(scored)],
            "gap": number(rows["gap"].mean()) if rows["gap"].notna().any() else None,
            "gap_interval": [number(x) for x in mean_interval(rows["gap"])],
        }
    part["verdict"] = judged_verdict(planted["gap"], random["gap"])
    return part


def calibrate(
    corpus: Corpus,
    explainer,
    config: ExplanationsConfig,
    judges: dict[str, Scorer],
    embed,
    exemplars_config: ExemplarsConfig,
    latents_per_class: int = 2,
    random_latents: int = 4,
    seed: int = 0,
    contexts=None,
    refiner: Refiner | None = None,
    report=None,
) -> dict:
    """The card of the judge behind `judges` (each a scorer built on it), with `explainer` explaining."""
    started = time.perf_counter()
    latents = planted_latents(latents_per_class, random_latents)
    exemplars, profiles = planted_exemplars(
        corpus, latents, without_neighbours(exemplars_config), seed, contexts
    )
    with_windows = set(exemplars["latent"].astype(int)) if len(exemplars) else set()
    kind = {p.latent: p.kind for p in latents}
    planted = [latent for latent in with_windows if kind[latent] == "planted"]
    if len(planted) < 2:
        raise ValueError(
            f"Only {len(planted)} planted latents fire in {exemplars_config.min_activating_windows} windows "
            "of the corpus or more: a card needs 2. Fix: a larger [corpus] n_tokens."
        )
    vocab = corpus_prompt_vocab(corpus)
    explained, scored = asyncio.run(
        explain_and_score(
            explainer, config, exemplars, profiles, vocab, embed, judges, refiner, report
        )
    )
    similarity = named(explained, latents, embed)
    text = dict(zip(explained["latent"].astype(int), explained["explanation"], strict=False))
    n_named = sum(s >= NAMED_THRESHOLD for s in similarity.values())
    rows = []
    for p in latents:
        row = {
            "latent": p.latent,
            "kind": p.kind,
            "classes": list(p.classes),
            "explanation": text.get(p.latent),
            "similarity": number(similarity.get(p.latent)),
        }
        for name, frame in scored.items():
            mine = frame[frame["latent"].astype(int) == p.latent]
            main = judges[name].main_metric
            row[name] = number(mine[main].iloc[0]) if len(mine) else None
            row[f"{name}_control"] = number(mine[f"control_{main}"].iloc[0]) if len(mine) else None
        rows.append(row)
    scorers = {
        name: scorer_card(frame, judges[name].main_metric, kind) for name, frame in scored.items()
    }
    tells = [name for name, part in scorers.items() if part["verdict"].startswith("can tell")]
    return {
        "version": CALIBRATION_VERSION,
        "latents_per_class": latents_per_class,
        "random_latents": random_latents,
        "planted_latents": len(planted),
        "random_latents_with_exemplars": len(with_windows) - len(planted),
        "classes": CLASSES,
        "corpus": corpus.meta.get("hash"),
        "explainer_failed": int((explained["status"] != "ok").sum()),
        "named": {
            "threshold": NAMED_THRESHOLD,
            "by": "embedder cosine of the explanation to its class's description",
            "named": int(n_named),
            "of": len(planted),  # a failed explanation names nothing
            "rate": number(n_named / len(planted)),
            "interval": [number(x) for x in wilson(n_named, len(planted))],
        },
        "scorers": scorers,
        "verdict": (
            f"can tell ({', '.join(tells)})"
            if tells
            else "cannot tell: no scorer's planted gap lies above 0"
        ),
        "latents": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---- the asset ------------------------------------------------------------------------------------


def calibration_asset(
    exemplars_defaults: dict,
    explanations_defaults: dict,
    explainers: dict,
    scorers: dict[str, type[Scorer]],
    settings: dict[str, ScorerSettings],
    models: Models = NO_MODELS,
) -> AssetsDefinition:
    """`calibration`: the card of the deployment's judge with its explainer and its exemplars and explanations
    settings, for `scorers` (the automated ones it can calibrate). Its code version names the judge: another
    judge is stale until it has its own card; the same judge's card is made once (`force` makes it again)."""
    ExemplarsDefaults = with_defaults(ExemplarsConfig, exemplars_defaults, "exemplars")
    Explaining = with_defaults(ExplanationsConfig, explanations_defaults, "explanations")

    @asset(
        name="calibration",
        group_name="scores",
        deps=[AssetDep("corpus")],
        code_version=f"{CALIBRATION_VERSION}{models.version_part('judge')}",
        required_resource_keys={"settings", "llm", "embedder"},
        **in_pool(LLM_POOL),
        description="The judge's calibration card: planted-truth latents on the corpus, explained and scored "
        "as real ones; run once per judge (`autointerp calibrate`).",
    )
    def calibration(context: AssetExecutionContext, config: CalibrationConfig):
        resources = context.resources
        layout = resources.settings.store.layout
        llm, url = resources.llm, resources.settings.coordination_url
        judge_identity = llm.identity("judge")
        path = layout.calibration_card_path(judge_identity)
        if path.exists() and not config.force:
            context.log.info(f"{judge_identity} has a card already ({path}): kept")
            card = read_card(layout, judge_identity)
        else:
            if not scorers:
                raise Failure(
                    "No automated scorer asks the judge about an explanation: nothing to calibrate. "
                    "Fix: list detection or fuzzing in the deployment's automated_scorers."
                )
            explaining = Explaining()
            chosen = explainers.get(explaining.explainer)
            if chosen is not None and chosen.uses & {"coder", "subject_model"}:
                raise Failure(
                    f"The {explaining.explainer!r} explainer reads the coder or the subject model, which a "
                    "planted latent has not. Fix: calibrate with a deployment whose [explanations] "
                    "explainer reads windows (highlighted, contrastive, token_table, top_tokens)."
                )
            explainer_client = llm.client(layout, role="explainer", coordination_url=url)
            judge_client = llm.client(layout, role="judge", coordination_url=url)
            explainer = make_explainer(explaining, explainers, ExplainerDeps(llm=explainer_client))
            named_models = f"judge={judge_identity}"
            judges = {
                name: scorer(settings[name], ScorerDeps(llm=judge_client, models=named_models))
                for name, scorer in scorers.items()
            }
            window_config = without_neighbours(ExemplarsDefaults())
            corpus = load_corpus(layout)
            contexts = (
                context_index(
                    layout, corpus, window_config.example_ctx_len, resources.embedder, url
                )
                if "embedding" in window_config.non_activating_sources
                else None
            )
            refiner = (
                Refiner(judge_client, explaining.refine_rounds, explaining.max_tokens)
                if explaining.refine_rounds
                else None
            )
            card = calibrate(
                corpus,
                explainer,
                explaining,
                judges,
                resources.embedder.embed,
                window_config,
                config.latents_per_class,
                config.random_latents,
                config.seed,
                contexts,
                refiner,
                context.log.info,
            )
            card |= {
                "judge": judge_identity,
                "explainer": llm.identity("explainer"),
                "embedder": resources.embedder.identity(),
                "made_at": pd.Timestamp.now("UTC").isoformat(timespec="seconds"),
            }
            write_card(layout, judge_identity, card)
        metadata = {
            "judge_model": card["judge"],
            "explainer_model": card["explainer"],
            "verdict": card["verdict"],
            "named": f"{card['named']['named']} of {card['named']['of']} explanations name their "
            f"planted class (embedder cosine ≥ {card['named']['threshold']})",
            **{f"{name}_card": card_line(card, name) for name in card["scorers"]},
            "latents_per_class": card["latents_per_class"],
            "seconds": card["seconds"],
            "path": MetadataValue.path(str(path)),
        }
        context.log.info(f"calibration: {card['verdict']}")
        return MaterializeResult(metadata=metadata)

    return calibration
