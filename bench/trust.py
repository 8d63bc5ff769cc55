"""How far to trust a score (issue 38, line 6): interval coverage, judge calibration cards, reseed stability.

1. Interval coverage: each 95 % interval of `assets/score_metrics.py` on seeded synthetic answers with a
   known rate (`tests/interval_coverage.py`, the draws the coverage test uses), at the example counts the
   defaults give a latent. Should be near 0.95.
2. Calibration cards (`assets/calibration.py`): planted-truth latents on the deployment's corpus sent through
   its explainer and judge, for a scripted good judge (answers from what the explanation says), a scripted
   judge answering at random, and the embedded model (`--skip-embedded` leaves it out: minutes on a CPU).
3. Reseed stability on the demo coder (`[explanations] stability_latents`): mean absolute score difference
   between two explanations of one latent from disjoint windows.

Prints a table per part, then a JSON object as its last line with `interval_coverage_min`,
`card_good_planted_gap`, `card_random_planted_gap`, `card_embedded_planted_gap`, `stability_mean_abs_diff`.

    .venv/bin/python bench/trust.py [--draws 1000] [--skip-embedded]
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.interval_coverage import DRAWS, cases, coverage  # noqa: E402

CARD_TOKENS = 64 * 160
"""The calibration test's corpus: 160 sequences of 64 tokens of the embedded text."""


def interval_coverage(draws: int) -> dict[str, float]:
    rows = {name: coverage(draw, draws) for name, draw in cases().items()}
    print(f"\n95 % interval coverage over {draws} seeded draws (target 0.95):")
    for name, value in rows.items():
        print(f"  {value:.3f}  {name}")
    return rows


def card(llm, corpus, embedder, latents_per_class: int) -> dict:
    """The calibration card of the judge behind `llm` (an LLM resource), which also explains, with
    detection and fuzzing as the deployment's judges."""
    from assets.calibration import calibrate
    from assets.exemplars import ExemplarsConfig
    from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings
    from assets.explanations import ExplanationsConfig
    from assets.scorers import SCORERS, ScorerDeps, scorer_settings
    from tests.conftest import TINY_EXEMPLARS_CONFIG

    client = llm.client()
    explainer = EXPLAINERS["highlighted"](ExplainerSettings(), ExplainerDeps(llm=client))
    judges = {
        name: SCORERS[name](
            scorer_settings()[name], ScorerDeps(llm=client, models=f"judge={llm.identity()}")
        )
        for name in ("detection", "fuzzing")
    }
    return calibrate(
        corpus,
        explainer,
        ExplanationsConfig(),
        judges,
        embedder.embed,
        ExemplarsConfig(**TINY_EXEMPLARS_CONFIG, non_activating_sources=["random"]),
        latents_per_class=latents_per_class,
        random_latents=4,
    )


def cards(skip_embedded: bool, latents_per_class: int) -> dict[str, dict | None]:
    """Cards of a scripted judge that answers from what the explanation says, one that answers at random
    (both explain with the scripted explainer of `tests/assets/test_calibration.py`), and the embedded
    model explaining and judging."""
    import tempfile

    from assets.corpus import CorpusConfig, build_corpus
    from resources.embedder import EmbedderResource
    from resources.llm import LLMResource
    from resources.subject_model import SubjectModelResource
    from storage.corpus import load_corpus
    from storage.layout import DataRoot
    from tests.assets.test_calibration import literal_judge, random_judge
    from tests.scripted_llm_server import ScriptedLLMServer

    with tempfile.TemporaryDirectory() as folder:
        root = DataRoot.at(Path(folder))
        tokenizer = SubjectModelResource().tokenizer()
        build_corpus(CorpusConfig(ctx_len=64, n_tokens=CARD_TOKENS), tokenizer, root)
        corpus, embedder = load_corpus(root), EmbedderResource()
        made = {}
        for name, reply in (("good", literal_judge), ("random", random_judge)):
            with ScriptedLLMServer(reply) as server:
                llm = LLMResource(
                    backend="openai", base_url=server.base_url, model=name, cache_dir=""
                )
                made[name] = card(llm, corpus, embedder, latents_per_class)
        made["embedded"] = (
            None
            if skip_embedded
            else card(
                LLMResource(backend="embedded", cache_dir=""), corpus, embedder, latents_per_class
            )
        )
    print(f"\nCalibration cards ({latents_per_class} planted latents per class, 4 random):")
    for name, found in made.items():
        if found is None:
            print(f"  {name}: skipped")
            continue
        for scorer, part in found["scorers"].items():
            planted, random = part["planted"], part["random"]
            print(
                f"  {name:8s} {scorer:9s} planted {planted['mean']:.3f} gap {planted['gap']:+.3f} "
                f"{fmt_interval(planted['gap_interval'])}, random gap {random['gap']:+.3f}: "
                f"{part['verdict'].split(':')[0]}"
            )
        print(
            f"  {name:8s} named its class: {found['named']['named']} of {found['named']['of']}, "
            f"explainer failed {found['explainer_failed']}, {found['seconds']:.0f} s"
        )
    return made


def fmt_interval(interval) -> str:
    lo, hi = interval
    return "[–]" if lo is None or hi is None else f"[{lo:+.3f}, {hi:+.3f}]"


def planted_gap(found: dict | None) -> float | None:
    """The card's detection gap on planted latents."""
    return None if found is None else found["scorers"]["detection"]["planted"]["gap"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=DRAWS)
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--latents-per-class", type=int, default=3)
    args = parser.parse_args()
    covered = interval_coverage(args.draws)
    made = cards(args.skip_embedded, args.latents_per_class)
    result = {
        "interval_coverage_min": round(min(covered.values()), 3),
        "card_good_planted_gap": planted_gap(made["good"]),
        "card_random_planted_gap": planted_gap(made["random"]),
        "card_embedded_planted_gap": planted_gap(made["embedded"]),
        "card_verdicts": {name: c and c["verdict"] for name, c in made.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
