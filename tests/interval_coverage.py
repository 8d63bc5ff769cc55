"""Seeded draws with a known truth for each 95 % interval of `assets/score_metrics.py`, at the example
counts the default settings give a latent: the coverage test and `bench/trust.py` both read them."""

import functools
from statistics import NormalDist

import numpy as np

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


def coverage(draw, draws: int = DRAWS) -> float:
    """Share of `draws` seeded draws whose interval holds the truth. Each draw takes its known rate from
    a seeded spread of rates: at 10 examples a binomial's coverage swings between about 0.92 and 0.98
    from one rate to the next (its discreteness), so it is judged over rates, as it is for Wilson's."""
    hits = 0
    for seed in range(draws):
        (lo, hi), truth = draw(np.random.default_rng(seed))
        hits += lo <= truth <= hi
    return hits / draws


def accuracy_draw(n: int):
    def draw(rng):
        p = rng.uniform(0.3, 0.9)
        return wilson(int(rng.binomial(n, p)), n), p

    return draw


def balanced_accuracy_draw(rng):
    recall, specificity = rng.uniform(0.5, 0.95, 2)
    tp, tn = rng.binomial(TEST_POSITIVES, recall), rng.binomial(TEST_NEGATIVES, specificity)
    interval = balanced_accuracy_interval(tp, TEST_POSITIVES - tp, tn, TEST_NEGATIVES - tn)
    return interval, (recall + specificity) / 2


def roc_auc_draw(rng):
    """Scores of firing windows shifted by d standard deviations: the true AUC is Φ(d / √2), here 0.5 to
    0.96."""
    shift = rng.uniform(0, 2.5)
    scores = np.r_[rng.normal(shift, 1, TEST_POSITIVES), rng.normal(0, 1, TEST_NEGATIVES)]
    labels = np.r_[np.ones(TEST_POSITIVES), np.zeros(TEST_NEGATIVES)]
    interval = auc_interval(roc_auc(scores, labels), TEST_POSITIVES, TEST_NEGATIVES)
    return interval, NormalDist().cdf(shift / np.sqrt(2))


def intervention_draw(rng):
    truth = rng.uniform(-0.5, 1.0)
    return mean_interval(rng.normal(truth, 0.7, 8)), truth


def windows(rng, n: int, noise: float):
    """Simulated and true 0-10 activations of n windows of 32 tokens, half of them firing; the
    simulation errs per token and by a per-window offset."""
    true = [np.maximum(rng.normal(0, 1, 32) + (2 if w % 2 else -1), 0) for w in range(n)]
    simulated = [t + rng.normal(0, noise, 32) + rng.normal(0, 0.5) for t in true]
    return simulated, true


@functools.cache
def correlation_truths() -> dict[float, float]:
    """The simulation scorer's correlation per noise level over very many windows: the truth."""
    truths = {}
    for noise in (0.5, 1.0, 2.0):
        simulated, true = windows(np.random.default_rng(99), 20_000, noise)
        truths[noise] = float(np.corrcoef(np.concatenate(simulated), np.concatenate(true))[0, 1])
    return truths


def correlation_draw(rng):
    truths = correlation_truths()
    noise = float(rng.choice(list(truths)))
    simulated, true = windows(rng, TEST_POSITIVES + TEST_NEGATIVES, noise)
    return correlation_interval(simulated, true, int(rng.integers(1 << 30))), truths[noise]


def cases() -> dict:
    """Each interval's draw, by the metric and example count it stands for."""
    return {
        "accuracy, 10 intruder tasks (Wilson)": accuracy_draw(10),
        "accuracy, 14 saebench windows (Wilson)": accuracy_draw(14),
        "balanced accuracy, 10 + 10 windows (Newcombe)": balanced_accuracy_draw,
        "ROC AUC, 10 + 10 windows (Hanley-McNeil)": roc_auc_draw,
        "intervention mean, 8 prompts (t)": intervention_draw,
        "simulation correlation, 20 windows (bootstrap)": correlation_draw,
    }
