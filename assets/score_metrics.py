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


Z80 = 0.8416212335729143
"""The standard normal's 80 % quantile: the power `latents_to_tell` plans for."""


def latents_to_tell(mean: float, sd: float) -> int | None:
    """Latents a gap of `mean` with spread `sd` needs for its 95 % interval to exclude 0 four times in
    five (80 % power, normal approximation); None when the gap is 0 or its spread unknown."""
    if not mean or not math.isfinite(mean) or not math.isfinite(sd):
        return None
    return max(2, math.ceil(((Z95 + Z80) * sd / abs(mean)) ** 2))


def verdict(gaps: pd.Series, against: str = "the shuffled-explanation control") -> str:
    """Whether a scorer's explanations beat its control, from the 95 % t interval of the mean gap over
    the latents with a control: "informative" when it lies above 0, "uninformative" below, and
    "cannot tell" when it holds 0, with the latents it would take at the observed spread."""
    gaps = pd.Series(gaps, dtype=float).dropna()
    n = len(gaps)
    if n < 2:
        return f"cannot tell: {n} latent{'s' * (n != 1)} with a control (an interval needs 2)"
    mean, (lo, hi) = float(gaps.mean()), mean_interval(gaps)
    said = f"gap {mean:.3f} [{lo:.3f}, {hi:.3f}], 95 % interval over {n} latents"
    if lo > 0:
        return f"informative: beats {against} ({said})"
    if hi < 0:
        return f"uninformative: worse than {against} ({said})"
    needed = latents_to_tell(mean, float(gaps.std(ddof=1)))
    power = (
        f"about {needed} latents would tell at this spread"
        if needed is not None
        else "no number of latents would tell a gap of 0"
    )
    return f"cannot tell: {said} holds 0 against {against}; {power}"


# ---- how far to trust a number: 95 % intervals ----------------------------------------------------

Z95 = 1.959963984540054
"""The standard normal's 97.5 % quantile: every interval here is a two-sided 95 % one."""
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
       2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
       2.052, 2.048, 2.045, 2.042)  # fmt: skip
"""Student's t 97.5 % quantiles for 1 to 30 degrees of freedom (numpy has no t distribution)."""
BOOTSTRAP_DRAWS = 1000


def t95(df: int) -> float:
    """Student's t 97.5 % quantile: the table, then Cornish–Fisher's expansion (exact to 1e-3 from 30)."""
    if df < 1:
        return NAN
    if df <= len(T95):
        return T95[df - 1]
    z = Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson's score interval of a proportion k / n: keeps inside [0, 1] and covers near 95 % even at
    n = 10, where the normal one does not."""
    if n <= 0:
        return NAN, NAN
    p, z2 = k / n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def balanced_accuracy_interval(tp: int, fn: int, tn: int, fp: int) -> tuple[float, float]:
    """Newcombe's square-and-add (MOVER) interval of (recall + specificity) / 2 from each rate's Wilson
    interval: the two rates are independent proportions of the positives and of the negatives."""
    if not (tp + fn) or not (tn + fp):
        return NAN, NAN
    rates = [(tp / (tp + fn), *wilson(tp, tp + fn)), (tn / (tn + fp), *wilson(tn, tn + fp))]
    mean = sum(r for r, _, _ in rates) / 2
    below = math.sqrt(sum((r - lo) ** 2 for r, lo, _ in rates)) / 2
    above = math.sqrt(sum((hi - r) ** 2 for r, _, hi in rates)) / 2
    return max(0.0, mean - below), min(1.0, mean + above)


def auc_interval(auc: float, n_pos: int, n_neg: int) -> tuple[float, float]:
    """Hanley & McNeil's (1982) interval of a ROC AUC from its value and the class sizes, inverted as
    Wilson's is: the AUCs θ with |auc - θ| ≤ 1.96 · SE(θ), the standard error taken at θ, not at the
    estimate, so that an AUC of 1 from 10 + 10 examples still gets a lower end short of 1."""
    if math.isnan(auc) or not n_pos or not n_neg:
        return NAN, NAN
    theta = np.linspace(0, 1, 4001)
    q1, q2 = theta / (2 - theta), 2 * theta**2 / (1 + theta)
    var = (theta * (1 - theta) + (n_pos - 1) * (q1 - theta**2) + (n_neg - 1) * (q2 - theta**2)) / (
        n_pos * n_neg
    )
    inside = theta[np.abs(auc - theta) <= Z95 * np.sqrt(np.maximum(var, 0)) + 1e-12]
    return (float(inside.min()), float(inside.max())) if len(inside) else (auc, auc)


def mean_interval(values) -> tuple[float, float]:
    """Student's t interval of a mean (NaN with fewer than two values)."""
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return NAN, NAN
    mean, se = values.mean(), values.std(ddof=1) / math.sqrt(len(values))
    return float(mean - t95(len(values) - 1) * se), float(mean + t95(len(values) - 1) * se)


def correlation_interval(simulated, true, seed: int) -> tuple[float, float]:
    """A seeded percentile bootstrap over windows (each a list of token values) of the correlation over
    all tokens at once, as `ev_correlation` is: windows are resampled whole, their tokens are not
    independent. A constant simulation counts 0, as the metric does."""
    n = len(simulated)
    if n < 2:
        return NAN, NAN
    stats = np.array(
        [
            [len(x), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()]
            for x, y in (
                (np.asarray(a, float), np.asarray(b, float))
                for a, b in zip(simulated, true, strict=True)
            )
        ]
    )
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=BOOTSTRAP_DRAWS)
    t, sx, sy, sxx, syy, sxy = (counts @ stats).T
    vx, vy, cxy = sxx - sx * sx / t, syy - sy * sy / t, sxy - sx * sy / t
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(
            vx <= 1e-12 * np.maximum(sxx, 1), np.where(vy > 0, 0.0, NAN), cxy / np.sqrt(vx * vy)
        )
    r = r[~np.isnan(r)]
    if not len(r):
        return NAN, NAN
    return float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def main_interval(
    metric: str, label, prediction, score, windows=None, seed: int = 0
) -> tuple[float, float]:
    """The 95 % interval of a latent's `metric` from its own judged examples (the columns of its rows):
    Wilson for accuracy, Newcombe for balanced accuracy, Hanley–McNeil for ROC AUC, Student's t over
    prompts for the intervention score (a mean of per-prompt gains), and for `ev_correlation` a seeded
    bootstrap over `windows`: (simulated, true), each a list of token values per window. NaN where it is undefined."""
    label = np.asarray(label, float).astype(int)
    prediction, score = np.asarray(prediction, float), np.asarray(score, float)
    if not len(label):
        return NAN, NAN
    if (
        metric == "intervention_score"
    ):  # rows alternate steered (label 1) and unsteered (label 0) gains
        return mean_interval(score[label == 1] - score[label == 0])
    if metric == "ev_correlation":
        return correlation_interval(*windows, seed) if windows else (NAN, NAN)
    if metric == "roc_auc":
        if np.isnan(score).any():
            return NAN, NAN
        n_pos = int(label.sum())
        return auc_interval(roc_auc(score, label), n_pos, len(label) - n_pos)
    m = binary_metrics(label, predictions_of(label, prediction, score))
    if metric == "accuracy":
        return wilson(m["tp"] + m["tn"], len(label))
    if metric == "balanced_accuracy":
        return balanced_accuracy_interval(m["tp"], m["fn"], m["tn"], m["fp"])
    return NAN, NAN


STALE = "stale: scored an earlier explanation"
"""How the summary and the browser mark a score of a text other than its latent's explanation now."""


def stale_scores(scored: pd.DataFrame, explanations: pd.DataFrame) -> pd.Series:
    """Per row of a scores table: whether it scored a text other than its latent's current explanation
    (the latent's last row of `explanations`, status ok), so that no score is shown or exported beside an
    explanation it did not judge. A row with an empty `explanation` scored the latent itself (the
    intruder scorer) and is never stale."""
    if not len(scored):
        return pd.Series(False, index=scored.index)
    current = pd.Series(dtype=object)
    if len(explanations):
        last = explanations.drop_duplicates("latent", keep="last").set_index("latent")
        current = last["explanation"].where(last["status"] == "ok")
    text = scored["explanation"].fillna("")
    return (text != "") & (text != scored["latent"].map(current))
