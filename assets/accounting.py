"""Every latent accounted for: where each latent of a coder went, per shard and per coder.

Each latent of a shard is in exactly one of these buckets:

- `dead`: never fired in the cached corpus (its `latent_stats` count is 0).
- `too_rare`: fired, but in fewer activating windows than the exemplars stage's
  `min_activating_windows` (the shard's `threshold.json`), so it has no exemplars and is never explained.
- `awaiting_exemplars`: fired, in a shard whose exemplars are not made yet (rare or not is unknown).
- `explained`: has exemplars and an explanation with status ok.
- `failed`: has exemplars but no ok explanation, counted per reason (`failed_by_reason`): the
  kind of the explanations table's `error` (its text before the first ": "), or why it was never asked
  (`NOT_ASKED_*`).

`live` = fired at least once = too_rare + awaiting_exemplars + explainable, `explainable` = has exemplars
= explained + failed, and dead + live = the shard's latents (summed over shards: the coder's width).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from storage.activations import load_latent_stats, read_cache_meta, shard_keys, shard_latent_range
from storage.store import TableStore
from storage.tables import latents_in

NOT_EXPLAINED_YET = "not asked yet: explanations not materialized"
NOT_ASKED_CAP = "not asked: past [settings] max_latents_per_shard"
NOT_ASKED_NEWER = "not asked yet: the exemplars changed after the explanations were made"
NO_REASON = "failed (no reason recorded)"
COUNTS = ("dead", "live", "too_rare", "awaiting_exemplars", "explainable", "explained", "failed")


def shard_accounting(
    store: TableStore, coder: str, shard: str, meta: dict | None = None, fired=None
) -> dict | None:
    """The buckets of one shard's latents (see the module); None when the coder has no finished activation
    cache. `meta` and `fired` (latent stats count > 0, over the coder) may be passed to read them once."""
    meta = meta or read_cache_meta(store.layout.activations_dir(coder))
    if meta is None:
        return None
    if fired is None:
        fired = load_latent_stats(store.layout.latent_stats_path(coder))["count"] > 0
    start, end = shard_latent_range(meta["width"], meta["latents_per_shard"], int(shard))
    live = np.arange(start, end)[fired[start:end]]
    found = {"latents": end - start, "dead": end - start - len(live), "live": len(live)}
    found["min_activating_windows"] = store.exemplars_threshold(coder, shard)
    exemplars = store.exemplars(coder, shard)
    if not exemplars.exists():
        waiting = {"too_rare": 0, "awaiting_exemplars": len(live), "explainable": 0}
        return found | waiting | {"explained": 0, "failed": 0, "failed_by_reason": {}}
    explainable = np.intersect1d(live, latents_in(exemplars))
    found |= {"too_rare": len(live) - len(explainable), "awaiting_exemplars": 0}
    reasons = failure_reasons(store, coder, shard, explainable)
    failed = {reason: int(n) for reason, n in reasons[reasons != ""].value_counts().items()}
    return found | {
        "explainable": len(explainable),
        "explained": int((reasons == "").sum()),
        "failed": sum(failed.values()),
        "failed_by_reason": failed,
    }


def failure_reasons(
    store: TableStore, coder: str, shard: str, explainable: np.ndarray
) -> pd.Series:
    """Per explainable latent, why it has no ok explanation ("" where it has one)."""
    table = store.explanations(coder, shard).read_if_present(columns=["latent", "status", "error"])
    if table is None:
        return pd.Series(NOT_EXPLAINED_YET, index=explainable)
    asked = sorted(set(table["latent"].astype(int)))
    # The explanations stage asks the first max_latents_per_shard latents with exemplars: rows that are
    # exactly such a prefix mean the rest were past the cap; other rows were made from older exemplars.
    capped = len(asked) > 0 and asked == [int(x) for x in explainable[: len(asked)]]
    rows = table.drop_duplicates("latent", keep="last").set_index("latent")
    status = rows["status"].reindex(explainable)
    # Failures are stored as `<kind>: <detail>` (resources/llm.py); counted by kind, as a real model's
    # unreadable answers would otherwise each be a reason of their own. The detail stays in the table.
    kind = rows["error"].reindex(explainable).fillna("").str.split(": ", n=1).str[0]
    error = kind.replace("", NO_REASON)
    reasons = error.where(status != "ok", "")
    missing = f"{NOT_ASKED_CAP} ({len(asked)})" if capped else NOT_ASKED_NEWER
    return reasons.where(status.notna(), missing)


def coder_accounting(store: TableStore, coder: str) -> dict | None:
    """The buckets of every latent of `coder`, summed over its shards, with each shard's under `shards`;
    `min_activating_windows` lists the thresholds the shards' exemplars were made with. None when the
    coder has no finished activation cache."""
    meta = read_cache_meta(store.layout.activations_dir(coder))
    if meta is None:
        return None
    fired = load_latent_stats(store.layout.latent_stats_path(coder))["count"] > 0
    shards = {
        shard: shard_accounting(store, coder, shard, meta, fired)
        for shard in shard_keys(meta["n_shards"])
    }
    total = {"latents": int(meta["width"])} | {
        name: sum(s[name] for s in shards.values()) for name in COUNTS
    }
    failed: dict[str, int] = {}
    for s in shards.values():
        for reason, n in s["failed_by_reason"].items():
            failed[reason] = failed.get(reason, 0) + n
    thresholds = {s["min_activating_windows"] for s in shards.values()} - {None}
    return total | {
        "failed_by_reason": failed,
        "min_activating_windows": sorted(thresholds),
        "shards": shards,
    }


def accounting_lines(found: dict) -> list[str]:
    """The buckets in words, one a line, as `autointerp scores` prints them."""
    threshold = found["min_activating_windows"]
    if isinstance(threshold, list):
        threshold = " or ".join(map(str, threshold)) or None
    said = [
        f"latents {found['latents']} = dead {found['dead']} + live {found['live']}",
        f"  dead (never fired in the cached corpus): {found['dead']}",
        f"  live {found['live']} = too rare {found['too_rare']} + explainable "
        f"{found['explainable']} + awaiting exemplars {found['awaiting_exemplars']}",
        f"  too rare (fewer activating windows than [exemplars] min_activating_windows = "
        f"{threshold if threshold is not None else 'not recorded'}): {found['too_rare']}",
        f"  explainable {found['explainable']} = explained {found['explained']} + failed "
        f"{found['failed']}",
    ]
    said += [f"  failed, {reason}: {n}" for reason, n in found["failed_by_reason"].items()]
    return said
