"""Stability across reseeds (`[explanations] stability_latents`): how much a latent's scores move when it
is explained again from a disjoint draw of its top windows.

The explanations stage writes each re-explained latent's second text beside its first
(`explanation_reseeds`); every scorer that scores an explanation scores the second on the same windows
(`reseed_scores`); the summary pairs the two scores per latent. Small differences say a score measures the
latent, not the luck of which windows the explainer saw.
"""

import numpy as np
import pandas as pd

from assets.score_metrics import mean_interval

NAN = float("nan")


def current_reseeds(reseeds: pd.DataFrame | None, explanations: pd.DataFrame) -> pd.DataFrame:
    """The `explanation_reseeds` rows (status ok) drawn beside the latent's current explanation (its last
    `explanations` row, status ok): a second text of an explanation since replaced is left out."""
    if reseeds is None or not len(reseeds) or not len(explanations):
        return pd.DataFrame(columns=["latent", "explanation", "similarity"])
    ok = explanations[explanations["status"] == "ok"].drop_duplicates("latent", keep="last")
    current = ok.set_index("latent")["explanation"]
    fresh = reseeds[
        (reseeds["status"] == "ok")
        & (reseeds["first_explanation"] == reseeds["latent"].map(current))
    ]
    return fresh[["latent", "explanation", "similarity"]]


def reseed_stability(first: pd.Series, second: pd.Series, similarity: pd.Series) -> dict:
    """Over the latents scored with both texts (paired): the mean absolute difference of their scores with
    its 95 % t interval (its lower end kept at 0, where a mean of absolute values is), and the mean
    embedding similarity of the two texts with its interval."""
    paired = pd.DataFrame({"first": first, "second": second, "similarity": similarity}).dropna(
        subset=["first", "second"]
    )
    difference = (paired["first"] - paired["second"]).abs()
    lo, hi = mean_interval(difference)
    return {
        "latents": len(paired),
        "mean_abs_difference": float(difference.mean()) if len(paired) else NAN,
        "mean_abs_difference_interval": [max(0.0, lo) if not np.isnan(lo) else lo, hi],
        "similarity": float(paired["similarity"].mean())
        if paired["similarity"].notna().any()
        else NAN,
        "similarity_interval": list(mean_interval(paired["similarity"])),
    }


def stability_line(said: dict) -> str:
    """`reseed_stability`'s numbers in one line, for the summary's metadata and `autointerp scores`."""
    lo, hi = said["mean_abs_difference_interval"]
    s_lo, s_hi = said["similarity_interval"]
    return (
        f"mean |first - second| {said['mean_abs_difference']:.3f} [{lo:.3f}, {hi:.3f}] "
        f"(95 %, paired over {said['latents']} latents); texts' similarity "
        f"{said['similarity']:.3f} [{s_lo:.3f}, {s_hi:.3f}]"
    )
