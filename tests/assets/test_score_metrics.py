import math

import numpy as np
import pandas as pd
import pytest

from assets.score_metrics import (
    binary_metrics,
    control_assignment,
    latent_metrics,
    latents_to_tell,
    pearson,
    roc_auc,
    rsquared,
    stale_scores,
    top_k_predictions,
    verdict,
)


def test_binary_metrics_against_hand_computation():
    # tp=2 (idx 0,1), fn=1 (idx 2), fp=1 (idx 3), tn=2 (idx 4,5)
    m = binary_metrics([1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0])
    assert m["accuracy"] == 4 / 6
    assert m["precision"] == 2 / 3 and m["recall"] == 2 / 3
    assert m["f1"] == 2 * 2 / (2 * 2 + 1 + 1)
    assert m["balanced_accuracy"] == (2 / 3 + 2 / 3) / 2
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 2)


def test_roc_auc_counts_pairs_and_half_ties():
    # positives 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4) (0.9>0.1) (0.4=0.4 → ½) (0.4>0.1) = 3.5 / 4
    assert roc_auc([0.9, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == 3.5 / 4
    assert math.isnan(roc_auc([0.3, 0.2], [1, 1]))


def test_pearson_by_hand_and_undefined_when_constant():
    # x = 1,2,3; y = 1,3,2: cov = (−1·−1 + 0 + 1·0)/3 = 1/3, var x = var y = 2/3 → r = 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_rsquared_is_centred_on_the_true_mean_by_hand_and_undefined_when_constant():
    # true 1,2,3,4 (mean 2.5): SS_tot = 2.25 + 0.25 + 0.25 + 2.25 = 5; predicted 1,2,3,3: SS_res = 1 → 1 - 1/5
    assert rsquared([1, 2, 3, 3], [1, 2, 3, 4]) == pytest.approx(
        0.8
    )  # the uncentred form gives 1 - 1/30
    assert rsquared([2.5] * 4, [1, 2, 3, 4]) == pytest.approx(
        0.0
    )  # the mean alone explains nothing
    assert math.isnan(rsquared([1, 2, 3], [2, 2, 2]))


def test_score_only_scorers_are_judged_at_as_many_positives_as_there_are():
    assert top_k_predictions([0.2, 0.9, 0.5, 0.1], 2).tolist() == [0, 1, 1, 0]
    assert top_k_predictions([0.2, 0.9], 0).tolist() == [0, 0]


def test_latent_metrics_of_scored_examples_by_hand():
    rows = pd.DataFrame(
        {
            "label": [1, 1, 1, 1, 0, 0, 0, 0],
            "quantile": [1, 1, 2, 2, 0, 0, 0, 0],
            "activation": [4.0, 3.0, 2.0, 1.0, 0, 0, 0, 0],
            "prediction": [1, 1, 1, 0, 1, 0, 0, 0],
            "score": [np.nan] * 8,
        }
    )
    m = latent_metrics(rows)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert (
        m["accuracy"] == 6 / 8
        and m["precision"] == 3 / 4
        and m["recall"] == 3 / 4
        and m["balanced_accuracy"] == 3 / 4
    )
    assert m["quantile_accuracy"] == {0: 3 / 4, 1: 1.0, 2: 1 / 2}
    assert math.isnan(m["roc_auc"])  # no score, no AUC
    assert m["pearson"] == pytest.approx(
        np.corrcoef([1, 1, 1, 0, 1, 0, 0, 0], [4, 3, 2, 1, 0, 0, 0, 0])[0, 1]
    )
    scored = rows.assign(prediction=np.nan, score=[0.9, 0.8, 0.3, 0.2, 0.7, 0.1, 0.05, 0.0])
    m = latent_metrics(scored)
    # top-4 scores are 0.9, 0.8, 0.7, 0.3 → predictions 1,1,1,0 | 1,0,0,0 as above;
    # AUC: 4 + 4 + 3 + 3 = 14 of 16 pairs
    assert (m["tp"], m["fp"]) == (3, 1) and m["roc_auc"] == 14 / 16


def test_undefined_metrics_are_nan_not_zero():
    m = binary_metrics([0, 0], [0, 0])
    assert (
        m["accuracy"] == 1.0
        and math.isnan(m["precision"])
        and math.isnan(m["recall"])
        and math.isnan(m["balanced_accuracy"])
    )


def test_control_gives_every_latent_another_latents_explanation():
    latents = [3, 8, 11, 42, 50]
    control = control_assignment({latent: f"text {latent}" for latent in latents}, seed=0)
    assert sorted(control) == latents and sorted(control.values()) == latents
    assert all(latent != other for latent, other in control.items())
    assert control == control_assignment({latent: f"text {latent}" for latent in latents}, seed=0)
    assert control_assignment({5: "x"}, seed=0) == {}


def test_control_is_always_a_different_text():
    texts = {1: "the word cat", 2: "The word  cat", 3: "rivers", 4: "the word cat", 5: "numbers"}
    control = control_assignment(texts, seed=0)
    assert set(control) == set(texts)
    for latent, other in control.items():
        assert " ".join(texts[other].lower().split()) != " ".join(texts[latent].lower().split())
    # nobody else has a different text: no control at all, rather than a control that matches by construction
    assert control_assignment({1: "cats", 2: "cats", 3: "Cats"}, seed=0) == {}
    assert control_assignment({1: "cats", 2: "cats", 3: "dogs"}, seed=0).keys() == {1, 2, 3}


def moved_controls(before: dict[int, str], after: dict[int, str], seed: int = 0) -> set[int]:
    """The latents, other than one added, removed or changed, whose control text differs between the two sets."""
    a, b = control_assignment(before, seed), control_assignment(after, seed)
    changed = {
        latent for latent in before.keys() | after.keys() if before.get(latent) != after.get(latent)
    }
    return {
        latent
        for latent in (before.keys() & after.keys()) - changed
        if (before[a[latent]] if latent in a else None)
        != (after[b[latent]] if latent in b else None)
    }


def test_adding_removing_or_changing_one_explanation_moves_at_most_one_other_control():
    """The controls of the other latents stay: their control questions are answered by the response cache."""
    texts = {latent: f"text {latent}" for latent in range(200)}
    for latent in (0, 57, 149, 199):
        assert (
            len(moved_controls(texts, {other: t for other, t in texts.items() if other != latent}))
            <= 1
        )  # removed
        assert (
            len(moved_controls({other: t for other, t in texts.items() if other != latent}, texts))
            <= 1
        )  # added
        for text in (
            "a new text",
            texts[(latent + 1) % 200],
            texts[(latent + 7) % 200],
        ):  # re-explained, also as another latent's words
            assert len(moved_controls(texts, texts | {latent: text})) <= 1
    assert moved_controls(texts, texts | {200: "text 200"}) and control_assignment(
        texts, 1
    ) != control_assignment(texts, 0)


def test_each_latent_takes_the_first_latent_after_it_on_the_ring_with_another_text():
    """Also where a run of equal texts wraps past the ring's start."""
    from assets.score_metrics import ring_place

    rng = np.random.default_rng(1)
    for n in (2, 3, 7, 40):
        texts = {
            latent: f"text {rng.integers(3)}"
            for latent in rng.choice(1000, n, replace=False).tolist()
        }
        ring = sorted(texts, key=lambda latent: ring_place(0, latent))
        expected = {}
        for i, latent in enumerate(ring):
            after = [
                ring[(i + step) % n]
                for step in range(1, n)
                if texts[ring[(i + step) % n]] != texts[latent]
            ]
            if after:
                expected[latent] = after[0]
        assert control_assignment(texts, seed=0) == expected


def test_verdict_names_its_control():
    assert "tasks without an intruder" in verdict(
        pd.Series([0.5, 0.6, 0.55] * 4), "tasks without an intruder"
    )


def test_a_verdict_is_given_only_when_the_gaps_interval_excludes_zero():
    informative = verdict(pd.Series([0.3, 0.35, 0.25, 0.3] * 3))
    assert (
        informative.startswith("informative: beats")
        and "95 % interval over 12 latents" in informative
    )
    worse = verdict(pd.Series([-0.3, -0.35, -0.25, -0.3] * 3))
    assert worse.startswith("uninformative: worse than")
    noise = verdict(pd.Series([0.1, -0.1, 0.05, -0.05] * 3))
    assert (
        noise.startswith("cannot tell:") and "no number of latents would tell a gap of 0" in noise
    )


def test_cannot_tell_says_how_many_latents_it_would_take_at_the_observed_spread():
    """The demo's two latents were called informative (0.030 ± 0.010) by the old 2-SE rule; now their
    interval holds 0 and the verdict says how many latents would tell."""
    gaps = pd.Series([0.03, 0.01, np.nan])
    needed = latents_to_tell(0.02, float(gaps.std()))
    assert verdict(gaps).startswith("cannot tell: gap 0.020 [")
    assert f"about {needed} latents would tell at this spread" in verdict(gaps)
    assert verdict(pd.Series([0.4])) == "cannot tell: 1 latent with a control (an interval needs 2)"


def test_the_power_estimate_is_right_four_times_in_five():
    """With as many latents as `latents_to_tell` says, the interval of a real gap excludes 0 about 80 %
    of the time."""
    rng = np.random.default_rng(0)
    n = latents_to_tell(0.05, 0.2)
    told = np.mean(
        [verdict(pd.Series(rng.normal(0.05, 0.2, n))).startswith("informative") for _ in range(400)]
    )
    assert 0.7 <= told <= 0.88, (n, told)


def test_a_score_is_stale_only_when_it_judged_another_text_than_the_current_explanation():
    """One rule for the summary and the browser: the intruder's rows (no text) are never stale; a
    latent whose explanation failed since, or is gone, has no text a score could still be of."""
    explanations = pd.DataFrame(
        {
            "latent": [0, 1, 2, 2],
            "explanation": ["cats", "", "old dogs", "dogs"],
            "status": ["ok", "failed", "ok", "ok"],
        }
    )
    scored = pd.DataFrame(
        {
            "latent": [0, 0, 1, 2, 2, 3, 0],
            "explanation": ["cats", "", "x", "dogs", "old dogs", "y", None],
        }
    )
    assert stale_scores(scored, explanations).tolist() == [0, 0, 1, 0, 1, 1, 0]
    assert stale_scores(scored, explanations.iloc[:0]).tolist() == [1, 0, 1, 1, 1, 1, 0]
    assert stale_scores(scored.iloc[:0], explanations).tolist() == []
