"""95 % intervals of the scorers' main metrics (`assets/score_metrics.py`): each covers its true value
close to 95 % of the time at the example counts the default settings give a latent, and adding them
changed no existing score."""

import asyncio
import hashlib

import numpy as np
import pandas as pd
import pytest

from assets.score_metrics import auc_interval, balanced_accuracy_interval, mean_interval, wilson
from tests.interval_coverage import cases, coverage


@pytest.mark.parametrize("case", sorted(cases()))
def test_each_interval_covers_at_the_default_counts(case):
    assert 0.93 <= coverage(cases()[case]) <= 0.97


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
