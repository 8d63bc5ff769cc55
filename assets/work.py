"""What one partition's run works on, and when a run counts as having produced nothing."""
from __future__ import annotations

import pandas as pd
from dagster import Failure


def selected_latents(exemplars: pd.DataFrame, max_latents: int) -> list[int]:
    """The latents of a shard to explain and score: every one with exemplars, or the first `max_latents`."""
    latents = sorted(int(x) for x in exemplars["latent"].unique())
    return latents[:max_latents] if max_latents else latents


def nothing_succeeded(asset: str, what: str, reasons: pd.Series) -> Failure:
    """A run in which every latent failed is no result: it fails, and the previous table stays."""
    common = reasons[reasons != ""].value_counts().head(3)
    listed = "; ".join(f"{n}× {reason[:300]}" for reason, n in common.items())
    return Failure(f"{asset}: {what}, so nothing was written and the previous results are kept. Most common reasons: {listed}")
