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
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.interval_coverage import DRAWS, cases, coverage  # noqa: E402

CARD_TOKENS = 64 * 160
SCORERS = ("detection", "fuzzing")
"""The local deployment's judges that a card covers."""
"""The calibration test's corpus: 160 sequences of 64 tokens of the embedded text."""


def interval_coverage(draws: int) -> dict[str, float]:
    rows = {name: coverage(draw, draws) for name, draw in cases().items()}
    print(f"\n95 % interval coverage over {draws} seeded draws (target 0.95):")
    for name, value in rows.items():
        print(f"  {value:.3f}  {name}")
    return rows


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
    from tests.assets.test_calibration import card_with, literal_judge, random_judge
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
                made[name] = card_with(llm, corpus, embedder, SCORERS, latents_per_class)
        made["embedded"] = (
            None
            if skip_embedded
            else card_with(
                LLMResource(backend="embedded", cache_dir=""),
                corpus,
                embedder,
                SCORERS,
                latents_per_class,
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


DEMO_CODER = "smollm2-topk/model.layers.15"
STABILITY_SHARDS = ("00", "01")
"""The demo's shards (`autointerp demo`)."""


def stability(demo_data: Path, latents: int) -> dict | None:
    """Reseed stability on the demo coder: a copy of the demo's data root (its responses cached, so only
    the second texts and their scores are asked) materialized again with `[explanations]
    stability_latents = latents` in the local deployment, through `autointerp materialize`; detection's
    scores of each latent's two texts, paired."""
    import shutil
    import subprocess
    import tempfile

    import pandas as pd
    from dagster import DagsterInstance

    from assets.partitions import shard_partitions
    from assets.stability import current_reseeds, reseed_stability
    from autointerp_defs.deployments import DEPLOYMENTS_DIR, load_deployment
    from autointerp_defs.instance import write_instance
    from autointerp_defs.sensors import new_shard_keys
    from storage.layout import DataRoot
    from storage.store import TableStore

    if not (demo_data / "registry" / DEMO_CODER).exists():
        print(
            f"\nReseed stability: no demo coder under {demo_data} (run `make demo` first): skipped"
        )
        return None
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        shutil.copytree(demo_data, work / "data", ignore=shutil.ignore_patterns("scores"))
        text = (DEPLOYMENTS_DIR / "local.toml").read_text()
        assert "\n[explanations]\n" in text, (
            "local.toml has no [explanations] table to switch it on in"
        )
        deployment = work / "stability.toml"
        deployment.write_text(
            text.replace("\n[explanations]\n", f"\n[explanations]\nstability_latents = {latents}\n")
        )
        write_instance(work / "dagster_home")
        with DagsterInstance.from_config(
            str(work / "dagster_home")
        ) as instance:  # the demo's shards
            keys, _ = new_shard_keys(
                DataRoot.at(work / "data").registry_dir,
                [DEMO_CODER],
                load_deployment(str(deployment)).latents_per_shard,
                {},
            )
            instance.add_dynamic_partitions(shard_partitions.name, keys)
        env = {**os.environ, "DAGSTER_HOME": str(work / "dagster_home")}
        first, second, similarity = [], [], []
        started = time.perf_counter()
        for shard in STABILITY_SHARDS:
            done = subprocess.run(
                [
                    str(ROOT / ".venv" / "bin" / "autointerp"),
                    "--deployment",
                    str(deployment),
                    "--data",
                    str(work / "data"),
                    "materialize",
                    "exemplars,explanations,scores/detection",
                    "--coder",
                    DEMO_CODER,
                    "--shard",
                    shard,
                ],
                env=env,
                cwd=work,
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise SystemExit(f"materializing shard {shard} failed:\n{done.stderr[-3000:]}")
            store = TableStore.at(work / "data")
            explained = store.explanations(DEMO_CODER, shard).read()
            reseeds = current_reseeds(
                store.explanation_reseeds(DEMO_CODER, shard).read_if_present(), explained
            ).set_index("latent")
            scored = store.scores(DEMO_CODER, shard, "detection").read().set_index("latent")
            again = store.reseed_scores(DEMO_CODER, shard, "detection").read_if_present()
            if again is None:
                continue
            again = again.drop_duplicates("latent", keep="last").set_index("latent")
            main = "balanced_accuracy"
            both = reseeds.index.intersection(again.index).intersection(scored.index)
            first.append(scored.loc[both, main])
            second.append(again.loc[both, main])
            similarity.append(reseeds.loc[both, "similarity"])
    said = reseed_stability(
        *(pd.concat(x) if x else pd.Series(dtype=float) for x in (first, second, similarity))
    )
    lo, hi = said["mean_abs_difference_interval"]
    print(
        f"\nReseed stability on {DEMO_CODER}, shards {', '.join(STABILITY_SHARDS)} ({latents} latents each, "
        f"detection, the local deployment, {time.perf_counter() - started:.0f} s): mean |first - second| "
        f"{said['mean_abs_difference']:.3f} [{lo:.3f}, {hi:.3f}] over {said['latents']} latents; texts' "
        f"similarity {said['similarity']:.3f}"
    )
    return said


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
    parser.add_argument(
        "--demo-data", type=Path, default=ROOT / "data", help="where `make demo` ran"
    )
    parser.add_argument("--stability-latents", type=int, default=4)
    args = parser.parse_args()
    covered = interval_coverage(args.draws)
    made = cards(args.skip_embedded, args.latents_per_class)
    stable = stability(args.demo_data.resolve(), args.stability_latents)
    result = {
        "interval_coverage_min": round(min(covered.values()), 3),
        "card_good_planted_gap": planted_gap(made["good"]),
        "card_random_planted_gap": planted_gap(made["random"]),
        "card_embedded_planted_gap": planted_gap(made["embedded"]),
        "card_verdicts": {name: c and c["verdict"] for name, c in made.items()},
        "stability_mean_abs_diff": stable and round(stable["mean_abs_difference"], 4),
        "stability_latents": stable and stable["latents"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
