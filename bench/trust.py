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


def interval_coverage(draws: int) -> dict[str, float]:
    rows = {name: coverage(draw, draws) for name, draw in cases().items()}
    print(f"\n95 % interval coverage over {draws} seeded draws (target 0.95):")
    for name, value in rows.items():
        print(f"  {value:.3f}  {name}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=DRAWS)
    parser.add_argument("--skip-embedded", action="store_true")
    args = parser.parse_args()
    covered = interval_coverage(args.draws)
    result = {"interval_coverage_min": round(min(covered.values()), 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
