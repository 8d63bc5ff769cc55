"""95 % intervals of the scorers' main metrics (`assets/score_metrics.py`): each covers its true value
close to 95 % of the time at the example counts the default settings give a latent, and adding them
changed no existing score."""

import asyncio
import hashlib
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from assets.score_metrics import (
    auc_interval,
    balanced_accuracy_interval,
    correlation_interval,
    mean_interval,
    roc_auc,
    wilson,
)

DRAWS = 1000
TEST_POSITIVES, TEST_NEGATIVES = 10, 10
"""`[exemplars] n_examples_test` and `n_non_activating`: the windows detection, fuzzing, embedding and
surprisal judge per latent; intruder asks `max_tasks` = 10 tasks, saebench shows 14 windows,
intervention continues its 8 neutral prompts."""


def coverage(interval_and_truth) -> float:
    """Share of `DRAWS` seeded draws whose interval holds the truth. Each draw takes its known rate from
    a seeded spread of rates: at 10 examples a binomial's coverage swings between about 0.92 and 0.98
    from one rate to the next (its discreteness), so it is judged over rates, as it is for Wilson's."""
    hits = 0
    for seed in range(DRAWS):
        (lo, hi), truth = interval_and_truth(np.random.default_rng(seed))
        hits += lo <= truth <= hi
    return hits / DRAWS


def test_accuracy_intervals_cover_at_the_default_counts():
    for n in (10, 14):  # intruder tasks, saebench windows

        def draw(rng, n=n):
            p = rng.uniform(0.3, 0.9)
            return wilson(int(rng.binomial(n, p)), n), p

        assert 0.93 <= coverage(draw) <= 0.97, n


def test_balanced_accuracy_intervals_cover_at_the_default_counts():
    def draw(rng):
        recall, specificity = rng.uniform(0.5, 0.95, 2)
        tp, tn = rng.binomial(TEST_POSITIVES, recall), rng.binomial(TEST_NEGATIVES, specificity)
        interval = balanced_accuracy_interval(tp, TEST_POSITIVES - tp, tn, TEST_NEGATIVES - tn)
        return interval, (recall + specificity) / 2

    assert 0.93 <= coverage(draw) <= 0.97


def test_roc_auc_intervals_cover_at_the_default_counts():
    """Scores of firing windows shifted by d standard deviations: the true AUC is Φ(d / √2), here 0.5 to
    0.96."""

    def draw(rng):
        shift = rng.uniform(0, 2.5)
        scores = np.r_[rng.normal(shift, 1, TEST_POSITIVES), rng.normal(0, 1, TEST_NEGATIVES)]
        labels = np.r_[np.ones(TEST_POSITIVES), np.zeros(TEST_NEGATIVES)]
        interval = auc_interval(roc_auc(scores, labels), TEST_POSITIVES, TEST_NEGATIVES)
        return interval, NormalDist().cdf(shift / np.sqrt(2))

    assert 0.93 <= coverage(draw) <= 0.97


def test_intervention_score_intervals_cover_at_the_default_prompts():
    def draw(rng):
        truth = rng.uniform(-0.5, 1.0)
        return mean_interval(rng.normal(truth, 0.7, 8)), truth

    assert 0.93 <= coverage(draw) <= 0.97


def windows(rng, n: int, noise: float):
    """Simulated and true 0-10 activations of n windows of 32 tokens, half of them firing; the
    simulation errs per token and by a per-window offset."""
    true = [np.maximum(rng.normal(0, 1, 32) + (2 if w % 2 else -1), 0) for w in range(n)]
    simulated = [t + rng.normal(0, noise, 32) + rng.normal(0, 0.5) for t in true]
    return simulated, true


def test_ev_correlation_bootstrap_intervals_cover_at_the_default_windows():
    truths = {}
    for noise in (0.5, 1.0, 2.0):  # the correlation over very many windows is the truth
        simulated, true = windows(np.random.default_rng(99), 20_000, noise)
        truths[noise] = np.corrcoef(np.concatenate(simulated), np.concatenate(true))[0, 1]

    def draw(rng):
        noise = float(rng.choice(list(truths)))
        simulated, true = windows(rng, TEST_POSITIVES + TEST_NEGATIVES, noise)
        return correlation_interval(simulated, true, int(rng.integers(1 << 30))), truths[noise]

    assert 0.93 <= coverage(draw) <= 0.97


def test_intervals_hold_their_metric_and_are_nan_where_it_is_undefined():
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 10)[0] == pytest.approx(0.0)
    lo, hi = balanced_accuracy_interval(7, 3, 9, 1)
    assert lo < 0.8 < hi
    assert np.isnan(balanced_accuracy_interval(7, 3, 0, 0)).all()
    assert np.isnan(auc_interval(float("nan"), 10, 10)).all()
    lo, hi = auc_interval(1.0, 10, 10)  # a perfect AUC from 20 examples is not sure to be perfect
    assert 0.75 < lo < hi == 1.0
    assert np.isnan(mean_interval([0.3])).all()


# Digests of the detection and fuzzing tables' existing columns and examples on the planted latents,
# recorded on main before intervals existed (89f741d): intervals are added, no score changes.
BEFORE = {
    "detection": ("593365bda253e013", "f36abf56c2820c1d"),
    "fuzzing": ("ba693bc76db53d68", "f8c4f69fae577514"),
}
PLANTED = {
    1: ("digits",),
    2: ("capitalized words",),
    3: ("symbols",),
    4: ("digits", "capitalized words"),
    5: ("capitalized words", "symbols"),
    6: ("digits", "symbols"),
}
EXPLANATIONS = [
    "digits inside parentheses",
    "capitalized words",
    "symbols inside square brackets",
    "digits",
    "symbols",
    "capitalized words inside quotation marks",
]


def digest(frame: pd.DataFrame) -> str:
    return hashlib.sha256(
        pd.util.hash_pandas_object(frame, index=False).values.tobytes()
    ).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_existing_score_columns_are_as_they_were_before_intervals(subject, name):
    from assets.scorers import SCORERS, ScorerDeps, scorer_settings
    from assets.scores import score_partition
    from storage.tables import INTERVAL_COLUMNS
    from tests.conftest import llm_resource
    from tests.planted_latents import planted_exemplars, scripted_llm
    from tests.scripted_llm_server import ScriptedLLMServer

    tokenizer = subject.tokenizer()
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    exemplars = planted_exemplars(tokenizer, PLANTED)
    explained = pd.DataFrame(
        {"latent": sorted(PLANTED), "explanation": EXPLANATIONS, "status": "ok"}
    )
    with ScriptedLLMServer(scripted_llm) as server:
        scorer = SCORERS[name](
            scorer_settings()[name], ScorerDeps(llm=llm_resource(server).client())
        )
        frame, examples = asyncio.run(score_partition(scorer, exemplars, explained, vocab))
    existing = frame.drop(columns=list(INTERVAL_COLUMNS))
    assert (digest(existing), digest(examples)) == BEFORE[name]
    main = scorer.main_metric
    assert (frame[f"{main}_lo"] <= frame[main]).all() and (frame[main] <= frame[f"{main}_hi"]).all()
