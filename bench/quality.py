"""How good the explanations are, method against method, on latents whose truth we plant.

Latents planted with one sense ("digits inside parentheses", "capitalized words inside quotation
marks", "symbols inside square brackets") or with two of them (`tests/planted_latents.py`: hard
negatives hold the class outside its container), explained by a scripted explainer that reads only
what its prompt shows (too broad at first, narrowed when shown the texts it wrongly fits), and
judged by a scripted judge that answers from what the description literally says, both behind a
scripted OpenAI-compatible server on 127.0.0.1 that counts requests. For each method, single shot,
refined (`refine_rounds`) and several senses (`[explanations] senses`, clustered by the real MiniLM
embedder), it prints detection and fuzzing balanced accuracy on the `test` windows, the gap over the
shuffled-explanation control, and the requests per latent of explaining; for several senses also
how many latents have all their planted senses named, and each sense's detection on its own test
windows against the rest (`score_senses`). Single-sense latents are scored in one partition (each
with another single-sense latent's explanation as control), two-sense latents in another.
`embedding_gap` is the embedding scorer's mean ROC AUC gap at its default settings (real MiniLM,
each window by its best token) over the single-sense latents with the refined explanations, the
median over `--embedding-seeds` plantings of them (seed 0 is the one above, the others planted and
explained the same way); `embedding_gap_before` the same in the same run with the default before it,
whole windows (`span_tokens = 0`). Prints a JSON object as its last line.

    .venv/bin/python bench/quality.py [--latents-per-sense 8] [--rounds 2] [--senses 3] [--embedding-seeds 5]
"""

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings  # noqa: E402
from assets.explanations import ExplanationsConfig, explain_all  # noqa: E402
from assets.refine import Refiner  # noqa: E402
from assets.score_metrics import paired_means  # noqa: E402
from assets.scorers import SCORERS, ScorerDeps, scorer_settings  # noqa: E402
from assets.scores import score_partition, score_senses  # noqa: E402
from resources.embedder import EmbedderResource  # noqa: E402
from resources.llm import LLMResource  # noqa: E402
from resources.subject_model import load_tokenizer  # noqa: E402
from tests.planted_latents import CLASSES, planted_exemplars, scripted_llm, senses_of  # noqa: E402
from tests.scripted_llm_server import ScriptedLLMServer  # noqa: E402

EMBEDDING_BEFORE = {"span_tokens": 0}
"""The embedding scorer's default before the best token (`span_tokens = 1`) was measured better: whole windows."""


def planted(per_sense: int) -> dict[str, dict[int, tuple[str, ...]]]:
    """Group → latent → its planted classes: `per_sense` latents of each class, and as many of each
    pair of classes."""
    classes = list(CLASSES)
    pairs = [(a, b) for i, a in enumerate(classes) for b in classes[i + 1 :]]
    single = {i: (classes[i % len(classes)],) for i in range(per_sense * len(classes))}
    two = {len(single) + i: pairs[i % len(pairs)] for i in range(per_sense * len(pairs))}
    return {"single_sense": single, "two_senses": two}


def mean_gap(frame, main_metric: str) -> dict:
    """Mean score, mean control and their gap over the latents with a control (None where
    undefined, so the JSON stays JSON)."""
    score, control, n = paired_means(frame[main_metric], frame[f"control_{main_metric}"])
    return {
        name: None if math.isnan(value) else round(value, 3)
        for name, value in (("score", score), ("control", control), ("gap", score - control))
    } | {"latents_with_control": n}


async def explain(
    server,
    exemplars,
    vocab,
    rounds: int,
    senses: int = 1,
    embed=None,
    sense_rows: list | None = None,
):
    client = LLMResource(
        backend="openai",
        base_url=server.base_url,
        model="scripted",
        max_concurrency=16,
        cache_dir="",
    )
    explainer = EXPLAINERS["highlighted"](ExplainerSettings(), ExplainerDeps(llm=client.client()))
    refiner = Refiner(client.client(), rounds, ExplanationsConfig().max_tokens) if rounds else None
    return await explain_all(
        explainer,
        ExplanationsConfig(refine_rounds=rounds, senses=senses),
        exemplars,
        None,
        sorted(set(exemplars["latent"])),
        vocab,
        embed,
        refiner=refiner,
        senses=sense_rows,
    )


def score(name: str, exemplars, explanations, vocab, server=None, embedder=None, **overrides):
    llm = (
        LLMResource(
            backend="openai",
            base_url=server.base_url,
            model="scripted",
            max_concurrency=16,
            cache_dir="",
        ).client()
        if server
        else None
    )
    scorer = SCORERS[name](
        scorer_settings({name: overrides})[name], ScorerDeps(llm=llm, embedder=embedder)
    )
    return asyncio.run(score_partition(scorer, exemplars, explanations, vocab))[0]


def sense_detection(server, exemplars, senses: list[dict], vocab) -> dict:
    """Mean detection of each sense on its own test windows against the rest (`score_senses`)."""
    llm = LLMResource(
        backend="openai",
        base_url=server.base_url,
        model="scripted",
        max_concurrency=16,
        cache_dir="",
    ).client()
    scorer = SCORERS["detection"](scorer_settings()["detection"], ScorerDeps(llm=llm))
    scored = asyncio.run(score_senses(scorer, exemplars, pd.DataFrame(senses), vocab))
    return mean_gap(scored, "balanced_accuracy") if len(scored) else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--latents-per-sense",
        type=int,
        default=4,
        help="latents planted per sense, and as many per pair of senses",
    )
    parser.add_argument("--rounds", type=int, default=2, help="refine_rounds of the refined method")
    parser.add_argument(
        "--senses", type=int, default=3, help="[explanations] senses of the several_senses method"
    )
    parser.add_argument(
        "--embedding-seeds",
        type=int,
        default=5,
        help="plantings of the single-sense latents the embedding scorer is measured on",
    )
    args = parser.parse_args()

    tokenizer = load_tokenizer()
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    plan = planted(args.latents_per_sense)
    groups = {
        group: planted_exemplars(tokenizer, latents, seed=i)
        for i, (group, latents) in enumerate(plan.items())
    }
    methods = {
        "single_shot": (0, 1),
        "refined": (args.rounds, 1),
        "several_senses": (0, args.senses),
    }
    results, explained, senses = {}, {}, {}
    embedder = EmbedderResource()
    started = time.perf_counter()
    with ScriptedLLMServer(scripted_llm) as server:
        for method, (rounds, most) in methods.items():
            results[method] = {}
            for group, exemplars in groups.items():
                before = len(server.requests)
                senses[group] = []
                explanations = asyncio.run(
                    explain(server, exemplars, vocab, rounds, most, embedder.embed, senses[group])
                )
                explained[method, group] = explanations
                n = explanations["latent"].nunique()
                results[method][group] = {
                    "explain_requests_per_latent": round((len(server.requests) - before) / n, 2),
                    **{
                        name: mean_gap(
                            score(name, exemplars, explanations, vocab, server), "balanced_accuracy"
                        )
                        for name in ("detection", "fuzzing")
                    },
                }
                if most > 1:
                    named = [
                        {cls for cls, _ in senses_of(text)} == set(plan[group][latent])
                        for latent, text in zip(
                            explanations["latent"], explanations["explanation"], strict=False
                        )
                    ]
                    results[method][group]["all_senses_named"] = f"{sum(named)}/{len(named)}"
                    results[method][group]["per_sense_detection"] = sense_detection(
                        server, exemplars, senses[group], vocab
                    )
        plantings = {0: (groups["single_sense"], explained["refined", "single_sense"])}
        for seed in range(1, args.embedding_seeds):
            exemplars = planted_exemplars(tokenizer, plan["single_sense"], seed=seed)
            plantings[seed] = exemplars, asyncio.run(explain(server, exemplars, vocab, args.rounds))
    embedding = {
        form: [
            mean_gap(
                score("embedding", exemplars, explanations, vocab, embedder=embedder, **overrides),
                "roc_auc",
            )
            for exemplars, explanations in plantings.values()
        ]
        for form, overrides in (("before", EMBEDDING_BEFORE), ("default", {}))
    }
    median = {
        form: {key: float(np.median([r[key] for r in runs])) for key in ("score", "control", "gap")}
        for form, runs in embedding.items()
    }
    seconds = time.perf_counter() - started

    counts = (
        f"{len(latents)} {group}" for group, latents in planted(args.latents_per_sense).items()
    )
    print(
        f"{', '.join(counts)} planted latents; refined: at most {args.rounds} rounds; {seconds:.0f} s"
    )
    print(
        f"{'method':14} {'latents':13} {'detection':>22} {'fuzzing':>22} {'explain requests/latent':>24}"
    )
    for method, by_group in results.items():
        for group, r in by_group.items():
            d, f = r["detection"], r["fuzzing"]
            print(
                f"{method:14} {group:13} {d['score']:>7.3f} (gap {d['gap']:+.3f}) "
                f"{f['score']:>7.3f} (gap {f['gap']:+.3f}) {r['explain_requests_per_latent']:>24}"
            )
    print(
        "(a two-sense latent's control is another pair's explanation, which shares one of its "
        "senses: its control is not at chance)"
    )
    for group, r in results["several_senses"].items():
        d = r["per_sense_detection"]
        print(
            f"several_senses {group}: all planted senses named in {r['all_senses_named']} latents; "
            + (
                f"per-sense detection {d['score']:.3f} (gap {d['gap']:+.3f}) on {len(senses[group])} senses"
                if d
                else "no latent explained as several senses"
            )
        )
    for form, label in (
        ("before", "whole windows (span_tokens 0, the default before)"),
        ("default", "best token (span_tokens 1, the default)"),
    ):
        m, per_planting = median[form], ", ".join(f"{r['gap']:+.3f}" for r in embedding[form])
        print(
            f"embedding, {label}, refined single-sense explanations, median of {len(plantings)} "
            f"plantings: ROC AUC {m['score']:.3f}, control {m['control']:.3f}, "
            f"gap {m['gap']:+.3f} (per planting {per_planting})"
        )
    print(
        json.dumps(
            {
                "single_shot_detection_gap": results["single_shot"]["single_sense"]["detection"][
                    "gap"
                ],
                "refined_detection_gap": results["refined"]["single_sense"]["detection"]["gap"],
                "embedding_gap": round(median["default"]["gap"], 3),
                "embedding_gap_before": round(median["before"]["gap"], 3),
                "several_senses": {
                    group: {
                        "detection_gap": r["detection"]["gap"],
                        "fuzzing_gap": r["fuzzing"]["gap"],
                        "all_senses_named": r["all_senses_named"],
                        "explain_requests_per_latent": r["explain_requests_per_latent"],
                    }
                    for group, r in results["several_senses"].items()
                },
                "methods": results,
                "embedding": {
                    form: {
                        "median": {k: round(v, 3) for k, v in median[form].items()},
                        "per_planting": runs,
                    }
                    for form, runs in embedding.items()
                },
                "rounds": args.rounds,
                "latents_per_sense": args.latents_per_sense,
            }
        )
    )


if __name__ == "__main__":
    main()
