"""What one partition's run works on, and when a run counts as having produced nothing."""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

import pandas as pd
from dagster import Failure

T = TypeVar("T")


def selected_latents(exemplars: pd.DataFrame, max_latents: int) -> list[int]:
    """The latents of a shard to explain and score: every one with exemplars, or the first `max_latents`."""
    latents = sorted(int(x) for x in exemplars["latent"].unique())
    return latents[:max_latents] if max_latents else latents


def nothing_succeeded(asset: str, what: str, reasons: pd.Series) -> Failure:
    """A run in which every latent failed is no result: it fails, and the previous table stays."""
    common = reasons[reasons != ""].value_counts().head(3)
    listed = "; ".join(f"{n}× {reason[:300]}" for reason, n in common.items())
    return Failure(f"{asset}: {what}, so nothing was written and the previous results are kept. Most common reasons: {listed}")


async def stream_latents(latents: list[int], work: Callable[[int], Awaitable[T]], *, workers: int, on_finished: Callable[[int, T], None] | None = None,
                         report: Callable[[str], None] | None = None, label: str = "latents") -> dict[int, T]:
    """`work(latent)` for every latent, at most `workers` at once: a bounded queue, so a shard of 32K
    latents holds `workers` coroutines, not 32K. Each result goes to `on_finished` as soon as it is
    done (to be kept on disk); progress is reported about every tenth of the latents."""
    results: dict[int, T] = {}
    queue = iter(latents)
    step, started = max(1, len(latents) // 10), time.perf_counter()

    async def worker() -> None:
        for latent in queue:  # one iterator shared by the workers: each latent is taken once
            results[latent] = result = await work(latent)
            if on_finished is not None:
                on_finished(latent, result)
            if report and (len(results) % step == 0 or len(results) == len(latents)):
                report(f"{label}: {len(results)}/{len(latents)} done, {time.perf_counter() - started:.0f} s")

    await asyncio.gather(*(worker() for _ in range(max(1, min(workers, len(latents))))))
    return results
