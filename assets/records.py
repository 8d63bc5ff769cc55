"""What crosses from the exemplars to the explainers and scorers: one latent's evidence, a `LatentRecord`.

Explainers prompt from a record; a scorer's `Job` carries the record of the latent it judges, with
the held-out windows drawn from it as `Example`s. Both stages read records the same way, a chunk of
latents' exemplar rows at a time (`read_records`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from itertools import compress
from pathlib import Path

import numpy as np
import pandas as pd

from assets.prompts import highlight
from storage.tables import rows_for_latents


@dataclass
class Example:
    """A held-out window as a scorer judges it."""

    index: int
    token_ids: list[int]
    token_strs: list[str]
    activations: np.ndarray
    marks: np.ndarray
    """The latent's firing tokens; in non-activating windows, random tokens (as many as typically fire)."""
    label: int
    quantile: int
    sequence: int = -1
    start: int = -1
    """Where the window is in the corpus (-1: not known)."""
    kind: str = "activating"
    """`activating`, or the source of a non-activating window (`random`, `neighbour`, `embedding`)."""

    @cached_property
    def text(self) -> str:
        """The window as prompts show it (whitespace and document boundaries visible); rendered once,
        though a latent's job and its control's both show it."""
        return highlight(self.token_strs, [False] * len(self.token_strs))

    @cached_property
    def marked_text(self) -> str:
        return highlight(self.token_strs, self.marks.tolist())


EXAMPLE_COLUMNS = ("kind", "quantile", "tokens", "activations", "sequence", "start")
"""The exemplar columns an `Example` is made of."""
RESEED = "reseed"
"""The split of a latent's second draw of explainer windows, disjoint from all its others
(`[explanations] stability_latents`): what its second explanation is written from."""


@dataclass
class LatentRecord:
    """One latent's evidence: its exemplar windows (every split), its firing statistics, the vocabulary."""

    coder: str
    latent: int
    windows: pd.DataFrame
    stats: dict | None
    """The exemplars' per-latent statistics row (`top_tokens`, `top_token_mean_activation`, ...), if read."""
    vocab: list[str]

    def train(self, kind: str = "activating") -> pd.DataFrame:
        """The windows shown to the explainer: `activating` ones, or any other kind (counter-examples)."""
        train = self.windows[self.windows["split"] == "train"]
        return (
            train[train["kind"] == kind]
            if kind == "activating"
            else train[train["kind"] != "activating"]
        )

    def shown_examples(self) -> tuple[list[tuple[list[str], list[float]]], float]:
        """(token strings, activations) of the activating training windows, strongest first, and the top activation."""
        windows = (
            self.windows
        )  # lists, not a filtered frame and itertuples: ~2 ms a latent with Arrow string columns
        shown = [
            s == "train" and k == "activating"
            for s, k in zip(windows["split"].tolist(), windows["kind"].tolist(), strict=False)
        ]
        tokens, activations, peaks = (
            list(compress(windows[c].tolist(), shown))
            for c in ("tokens", "activations", "max_activation")
        )
        examples = [
            ([self.vocab[t] for t in np.asarray(ids).tolist()], list(acts))
            for ids, acts in zip(tokens, activations, strict=False)
        ]
        return examples, float(max(peaks, default=np.nan))

    def reseeded(self) -> LatentRecord:
        """The record as the explainer sees it from the second draw: the `reseed` windows are its `train`
        activating ones, every other window (counter-examples, `valid`) as before."""
        windows = self.windows
        first = (windows["split"] == "train") & (windows["kind"] == "activating")
        second = windows[windows["split"] == RESEED].assign(split="train")
        rest = windows[~first & (windows["split"] != RESEED)]
        return replace(self, windows=pd.concat([second, rest]))

    def examples(self, split: str, rng: np.random.Generator) -> list[Example]:
        """The `split` windows as scorers judge them, in an order drawn from `rng`; non-activating ones get
        random marks (drawn first, in table order), as many tokens as typically fire in activating ones."""
        in_split = [
            s == split for s in self.windows["split"].tolist()
        ]  # lists, not a filtered frame: asked per latent, a frame costs ~1 ms
        kinds, quantiles, tokens, activations, sequences, starts = (
            list(compress(self.windows[c].tolist(), in_split)) for c in EXAMPLE_COLUMNS
        )
        counts = [
            np.count_nonzero(a)
            for a, kind in zip(activations, kinds, strict=False)
            if kind == "activating"
        ]
        typical_marks = max(1, int(np.median(counts))) if counts else 1
        examples = []
        for i, (kind, quantile, ids, acts, sequence, start) in enumerate(
            zip(kinds, quantiles, tokens, activations, sequences, starts, strict=False)
        ):
            acts = np.asarray(acts, np.float32)
            is_activating = kind == "activating"
            marks = acts > 0
            if not is_activating:
                marks = np.zeros(len(acts), bool)
                marks[rng.choice(len(acts), size=min(typical_marks, len(acts)), replace=False)] = (
                    True
                )
            examples.append(
                Example(
                    i,
                    list(ids),
                    [self.vocab[t] for t in np.asarray(ids).tolist()],
                    acts,
                    marks,
                    int(is_activating),
                    int(quantile) if is_activating else 0,
                    int(sequence),
                    int(start),
                    kind,
                )
            )
        return [examples[i] for i in rng.permutation(len(examples))]


def read_records(
    exemplars: pd.DataFrame | Path,
    latents: list[int],
    coder: str,
    vocab: list[str],
    stats: dict[int, dict] | None = None,
) -> dict[int, LatentRecord]:
    """Latent → record for a chunk of latents that all have exemplars, their rows read together
    (`rows_for_latents`); `stats` (latent → statistics row) where the caller read the profiles."""
    windows = dict(tuple(rows_for_latents(exemplars, latents).groupby("latent")))
    stats = stats or {}
    return {
        latent: LatentRecord(coder, latent, windows[latent], stats.get(latent), vocab)
        for latent in latents
    }
