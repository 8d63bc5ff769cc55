"""The queue of a shard's latents in the explanations and scores stages: which latents, their inputs
loaded a chunk at a time, at most `workers` at work at once, and when a run counts as having produced
nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Generic, TypeVar

import pandas as pd
from dagster import Failure

from resources.llm import LLMResource
from storage.tables import latents_in

T = TypeVar("T")

LATENTS_PER_CHUNK = 1024
"""Latents whose exemplar rows are read and whose jobs are made together (`ChunkLoader`)."""


def selected_latents(exemplars: pd.DataFrame | Path, max_latents: int) -> list[int]:
    """The latents of a shard to explain and score: every one with exemplars, or the first `max_latents`."""
    latents = latents_in(exemplars)
    return latents[:max_latents] if max_latents else latents


class ChunkLoader(Generic[T]):
    """Per-latent inputs (a latent's windows, its jobs) made a chunk of latents at a time, when a worker
    first asks for a latent of the chunk, and let go as they are taken. Workers take latents in order,
    so the next chunk loads while the last latents of the previous one still run (no stall between
    chunks), and a partition of any size holds about two chunks' inputs, not all of them."""

    def __init__(
        self,
        latents: list[int],
        load: Callable[[list[int]], Awaitable[dict[int, T]]],
        size: int | None = None,
    ):
        size = size or LATENTS_PER_CHUNK
        self.chunks = [latents[i : i + size] for i in range(0, len(latents), size)]
        self.chunk_of = {latent: i for i, chunk in enumerate(self.chunks) for latent in chunk}
        self.load = load
        self.loaded: dict[int, dict[int, T]] = {}
        self.locks = [asyncio.Lock() for _ in self.chunks]

    async def take(self, latent: int) -> T:
        i = self.chunk_of[latent]
        async with self.locks[i]:
            if i not in self.loaded:
                self.loaded[i] = await self.load(self.chunks[i])
        items = self.loaded[i]
        item = items.pop(latent)
        if not items:
            del self.loaded[i]
        return item


def overlaps_shards(llm: LLMResource, role: str, uses) -> bool:
    """Whether a ranged step asks for its next shard while it writes this one (`each_shard`'s `overlap`): only when
    the model answering `role` is a remote endpoint, which two shards' threads may ask at once; not an in-process
    model (embedded, vLLM offline) nor a stage that runs the subject model."""
    return llm.for_role(role).backend == "openai" and "subject_model" not in uses


def nothing_succeeded(asset: str, what: str, reasons: pd.Series) -> Failure:
    """A run in which every latent failed is no result: it fails, and the previous table stays."""
    common = reasons[reasons != ""].value_counts().head(3)
    listed = "; ".join(f"{n}× {reason[:300]}" for reason, n in common.items())
    return Failure(
        f"{asset}: {what}, so nothing was written and the previous results are kept. Most common reasons: {listed}"
    )


async def stream_latents(
    latents: list[int],
    work: Callable[[int], Awaitable[T]],
    *,
    workers: int,
    on_finished: Callable[[int, T], None] | None = None,
    report: Callable[[str], None] | None = None,
    label: str = "latents",
    retain: bool = True,
) -> dict[int, T]:
    """`work(latent)` for every latent, at most `workers` at once: a bounded queue, so a shard of 32K
    latents holds `workers` coroutines, not 32K. Each result goes to `on_finished` as soon as it is
    done (to be kept on disk); with `retain=False` it is then let go (the caller kept it). Progress is
    reported about every tenth of the latents."""
    results: dict[int, T] = {}
    queue = iter(latents)
    step, started, finished = max(1, len(latents) // 10), time.perf_counter(), 0

    async def worker() -> None:
        nonlocal finished
        for latent in queue:  # one iterator shared by the workers: each latent is taken once
            result = await work(latent)
            if retain:
                results[latent] = result
            if on_finished is not None:
                on_finished(latent, result)
            finished += 1
            if report and (finished % step == 0 or finished == len(latents)):
                report(
                    f"{label}: {finished}/{len(latents)} done, {time.perf_counter() - started:.0f} s"
                )

    await asyncio.gather(*(worker() for _ in range(max(1, min(workers, len(latents))))))
    return results
