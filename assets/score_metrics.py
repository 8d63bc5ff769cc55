"""Metrics of scored examples, one definition for every scorer, plus the control and its verdict.

Every scorer writes one row per judged example: `label` (1 = the latent fires in it), `quantile`
(of its activation, 0 for non-activating), `activation` (its true maximum), and a `prediction`
(0/1) and/or a `score` (any real number, higher = "fires"). The metrics of a latent come from
those rows alone, so detection, fuzzing, intruder, simulation, surprisal and embedding scores are
computed the same way and are comparable. Undefined metrics are NaN, never 0.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd

BINARY = ("accuracy", "balanced_accuracy", "precision", "recall", "f1")
CONFUSION = ("tp", "fp", "tn", "fn")
NAN = float("nan")


def binary_metrics(y_true, y_pred) -> dict[str, float]:
    """Accuracy, balanced accuracy, precision, recall, F1 and the confusion matrix of 0/1 labels."""
    t, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    tp, tn = int((t & p).sum()), int((~t & ~p).sum())
    fp, fn = int((~t & p).sum()), int((t & ~p).sum())
    recall = tp / (tp + fn) if tp + fn else NAN
    specificity = tn / (tn + fp) if tn + fp else NAN
    return {
        "accuracy": (tp + tn) / len(t) if len(t) else NAN,
        "balanced_accuracy": (recall + specificity) / 2,  # NaN unless both classes are present
        "precision": tp / (tp + fp) if tp + fp else NAN,
        "recall": recall,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else NAN,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def roc_auc(scores, labels) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN without both."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return NAN
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def pearson(x, y) -> float:
    """Pearson correlation; NaN when either side is constant or there are fewer than two points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return NAN
    return float(np.corrcoef(x, y)[0, 1])


def rsquared(predicted, true) -> float:
    """R², 1 - SS_res / SS_tot with SS_tot about the mean of `true`: the share of the true activations'
    variance the prediction explains. NaN when `true` is constant (no variance to explain).
    OpenAI's neuron-explainer divides by the mean square instead (uncentred), which credits a
    prediction for the mean alone."""
    predicted, true = np.asarray(predicted, float), np.asarray(true, float)
    total = np.sum((true - true.mean()) ** 2) if len(true) else 0.0
    if total == 0:
        return NAN
    return float(1 - np.sum((true - predicted) ** 2) / total)


def top_k_predictions(scores, n_positive: int) -> np.ndarray:
    """Call the `n_positive` highest scores positive: the threshold a score-only scorer is judged at.

    Uses only how many examples fire, never which; with as many positives predicted as there are,
    precision equals recall and chance gives 0.5 balanced accuracy on a balanced set.
    """
    scores = np.asarray(scores, float)
    predictions = np.zeros(len(scores), int)
    if n_positive > 0:
        predictions[np.argsort(-scores, kind="stable")[:n_positive]] = 1
    return predictions


def predictions_of(label: np.ndarray, prediction: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The 0/1 predictions; for score-only scorers (a prediction is NaN), the top-k of the scores."""
    if not np.isnan(prediction).any():
        return prediction.astype(int)
    return top_k_predictions(score, int(label.sum()))


def quantile_accuracy(
    label: np.ndarray, quantile: np.ndarray, predictions: np.ndarray
) -> dict[int, float]:
    """Accuracy per activation quantile (0 = the non-activating examples)."""
    correct = predictions == label
    return {int(q): float(correct[quantile == q].mean()) for q in np.unique(quantile)}


def latent_metrics(rows: pd.DataFrame) -> dict:
    """Every metric of one latent's scored examples (one explanation, one scorer)."""
    return example_metrics(
        *(
            rows[c].to_numpy(float)
            for c in ("label", "quantile", "activation", "prediction", "score")
        )
    )


def example_metrics(label, quantile, activation, prediction, score) -> dict:
    """`latent_metrics` of the examples' columns as arrays (a latent's rows, without building a frame)."""
    label, quantile = np.asarray(label, float).astype(int), np.asarray(quantile, float).astype(int)
    activation, prediction, score = (np.asarray(x, float) for x in (activation, prediction, score))
    if not len(label):
        return {
            **{m: NAN for m in (*BINARY, "roc_auc", "pearson")},
            **{c: 0 for c in CONFUSION},
            "n_scored": 0,
            "quantile_accuracy": {},
        }
    predictions = predictions_of(label, prediction, score)
    has_score = not np.isnan(score).any()
    evidence = score if has_score else predictions.astype(float)
    return {
        **binary_metrics(label, predictions),
        "roc_auc": roc_auc(score, label) if has_score else NAN,
        "pearson": pearson(evidence, activation),
        "n_scored": len(label),
        "quantile_accuracy": quantile_accuracy(label, quantile, predictions),
    }


CONTROLS_VERSION = "2"
"""Of `control_assignment`, part of the code version of every scorer with the shuffled-explanation control:
another assignment gives other control scores (2: places on a seeded ring instead of a shuffle of the set)."""


def ring_place(seed: int, latent: int) -> int:
    """A latent's place on the control ring: a seeded hash of its own id, whatever other latents there are."""
    return int.from_bytes(
        hashlib.blake2b(f"{seed}:{latent}".encode(), digest_size=8).digest(), "big"
    )


def control_assignment(explanations: dict[int, str], seed: int) -> dict[int, int]:
    """Give each latent the explanation of another latent whose text differs from its own: latents sit on
    a ring by `ring_place`, and each takes the first latent after it with a different text. A shuffle of the
    set would give other controls to nearly every latent when one latent is added, removed or re-explained,
    and every control question would be asked again; on the ring only the latent before it (with distinct
    texts) gets another control. A latent whose text every other latent shares gets none: the same words
    as a control would match by construction."""
    ring = sorted(explanations, key=lambda latent: (ring_place(seed, latent), latent))
    text = [" ".join(str(explanations[latent]).casefold().split()) for latent in ring]
    n, after = len(ring), [None] * len(ring)
    for k in range(
        2 * n - 1, -1, -1
    ):  # backwards twice round: a run of equal texts may wrap past the start
        i, j = k % n, (k + 1) % n
        after[i] = j if text[j] != text[i] else after[j]
    return {ring[i]: ring[j] for i, j in enumerate(after) if j is not None}


def no_control_reason(n_latents: int) -> str:
    if n_latents < 2:
        return "no control: no other latent was explained in this partition"
    return "no control: every other latent of this partition has the same explanation"


def paired_means(scores, controls) -> tuple[float, float, int]:
    """The mean score and the mean control score over the latents that have both, and how many: a mean
    over every scored latent beside a mean over those with a control would compare different latents.
    When no latent has a control: the mean over the scored latents, NaN for the control, and 0."""
    frame = pd.DataFrame({"score": scores, "control": controls}, dtype=float)
    both = frame.dropna()
    if not len(both):
        return float(frame["score"].mean()), NAN, 0
    return float(both["score"].mean()), float(both["control"].mean()), len(both)


def beside_control(score: float, control: float, digits: int = 3) -> str:
    """A score beside its control's, for people to read: 'score / control', 'score / no control', or 'n/a'
    when there is no score."""
    if math.isnan(score):
        return "n/a"
    return f"{score:.{digits}f} / " + (
        "no control" if math.isnan(control) else f"{control:.{digits}f}"
    )


MIN_LATENTS = 10
"""Latents with a control that a verdict needs. The test is one-sided: the scorer is informative when
the mean gap over its control exceeds 2 standard errors of the mean (a z test, 2.3% false positives).
The standard error is estimated from the same gaps, so with n latents the statistic follows Student's t
with n - 1 degrees of freedom: a scorer with no signal passes by luck 15% of the time with 2 latents, 6%
with 5 and 3.8% with 10. From 10 latents on the test keeps close to its nominal rate; below, a verdict
would be mostly noise, so none is given."""


def verdict(gaps: pd.Series, against: str = "the shuffled-explanation control") -> str:
    """Whether a scorer's mean gap over its control is clearly above zero: one-sided, mean gap > 2
    standard errors, over at least `MIN_LATENTS` latents with a control."""
    gaps = pd.Series(gaps, dtype=float).dropna()
    if len(gaps) < MIN_LATENTS:
        return f"too few latents to tell ({len(gaps)} with a control; the test needs at least {MIN_LATENTS})"
    mean, se = gaps.mean(), gaps.std(ddof=1) / math.sqrt(len(gaps))
    test = f"one-sided, mean gap > 2 standard errors over {len(gaps)} latents"
    if mean - 2 * se > 0:
        return f"informative: beats {against} by {mean:.3f} ± {se:.3f} ({test})"
    return f"uninformative: does not beat {against} (gap {mean:.3f} ± {se:.3f}; {test})"
