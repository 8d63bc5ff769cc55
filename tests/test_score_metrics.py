import math

import pandas as pd

from assets.scores import binary_metrics, control_assignment, verdict


def test_binary_metrics_against_hand_computation():
    # tp=2 (idx 0,1), fn=1 (idx 2), fp=1 (idx 3), tn=2 (idx 4,5)
    m = binary_metrics([1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0])
    assert m["accuracy"] == 4 / 6
    assert m["precision"] == 2 / 3 and m["recall"] == 2 / 3
    assert m["f1"] == 2 * 2 / (2 * 2 + 1 + 1)
    assert m["balanced_accuracy"] == (2 / 3 + 2 / 3) / 2


def test_undefined_metrics_are_nan_not_zero():
    m = binary_metrics([0, 0], [0, 0])
    assert m["accuracy"] == 1.0 and math.isnan(m["precision"]) and math.isnan(m["recall"]) and math.isnan(m["balanced_accuracy"])


def test_control_gives_every_latent_another_latents_explanation():
    latents = [3, 8, 11, 42, 50]
    control = control_assignment(latents, seed=0)
    assert sorted(control) == latents and sorted(control.values()) == latents
    assert all(latent != other for latent, other in control.items())
    assert control == control_assignment(latents, seed=0)
    assert control_assignment([5], seed=0) == {}


def test_verdict_needs_a_gap_clearly_above_zero():
    assert verdict(pd.Series([0.3, 0.35, 0.25, 0.3])).startswith("informative")
    assert verdict(pd.Series([0.1, -0.1, 0.05, -0.05])).startswith("uninformative")
    assert verdict(pd.Series([0.4])).startswith("uninformative")
