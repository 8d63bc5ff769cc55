"""Embedding (delphi): cosine similarity of the explanation to each window in the embedder's space (ROC AUC).

A window scores as its best span of `span_tokens` tokens (the largest cosine over its sliding spans),
by default its best single token: an explanation names what fires, a few tokens, and a whole window's
vector is mostly the text around them. The span rule is the same for every window, activating or not,
so it tells the scorer nothing about labels. On latents whose truth is known (`bench/quality.py`, hard
negatives on) the best token raises the gap over the control that whole windows (delphi's form,
`span_tokens = 0`) give on every planting, doubling its median (bench/README.md). At 0 the whole windows' vectors on the
corpus grid are read from the contexts table instead of embedded; at 1 each token's vector is read
from the tokens table (every distinct token of the corpus embedded alone, once per corpus), since a
partition shows nearly the whole vocabulary; without these tables each distinct text is embedded
once per partition."""

import asyncio

import numpy as np
from pydantic import Field

from assets.prompts import plain_text, token_text, window_text
from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings, example_row
from assets.stage_config import added_later
from resources.embedder import unit_vectors


class EmbeddingSettings(ScorerSettings):
    query_prefix: str = Field(
        default="",
        description="Text put before the explanation; instruction-tuned embedders want e.g. "
        "delphi's 'Instruct: Retrieve sentences that could be related to the explanation.\\nQuery:'.",
    )
    span_tokens: int = added_later(
        0,
        default=1,
        ge=0,
        description="Score a window by its best span of this many tokens "
        "(max cosine over sliding spans); 1 = its best token; "
        "0 = the whole window (delphi's form, the default before 1 was measured better).",
    )


def spans(example, size: int) -> list[str]:
    """The texts a window is scored by: its sliding spans of `size` tokens, or the whole window
    (size 0 or a shorter window)."""
    strs = example.token_strs
    if size == 0 or len(strs) <= size:
        return [plain_text(example.text)]
    if size == 1:
        return list(dict.fromkeys(map(token_text, strs)))
    return list(dict.fromkeys(window_text(strs[i : i + size]) for i in range(len(strs) - size + 1)))


class Embedding(Scorer):
    name = "embedding"
    description = (
        "Embedding (delphi): how well the explanation's embedding ranks activating "
        "over other windows (ROC AUC)."
    )
    Settings = EmbeddingSettings
    uses = frozenset({"embedder"})
    main_metric = "roc_auc"
    scores_senses = True

    def __init__(self, settings, deps):
        super().__init__(settings, deps)
        self._vectors: dict[str, np.ndarray] = {}
        """Unit vector of each text the jobs at hand need: a window shared by latents, or by a latent and
        its control, is embedded (or read) once."""

    async def _vectors_of(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Unit vectors of `texts`, embedding those not at hand (kept for later jobs)."""
        found = {t: self._vectors[t] for t in texts if t in self._vectors}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            new = dict(
                zip(
                    missing,
                    unit_vectors(await asyncio.to_thread(self.deps.embedder.embed, missing)),
                    strict=False,
                )
            )
            self._vectors.update(new)
            found.update(new)
        return found

    async def prepare(self, jobs: list[Job]) -> None:
        """The vectors of these jobs' windows and explanations: a window on the corpus grid is read from
        the contexts table and a single token from the tokens table (embedded there as the same text),
        the rest embedded in one call (full batches). Vectors only earlier jobs needed are let go, so
        memory follows the jobs at hand."""
        windows, size = self.deps.corpus_windows, self.settings.span_tokens
        needed = dict.fromkeys(self.settings.query_prefix + job.explanation for job in jobs)
        examples = list(
            {id(e): e for job in jobs for e in job.examples}.values()
        )  # a latent's own and control jobs share theirs
        for example in examples:
            whole = (
                size == 0 or len(example.token_strs) <= size
            )  # only a whole window's vector is in the contexts table
            for text in spans(example, size):
                if text not in needed:
                    needed[text] = (
                        windows.vector(example.sequence, example.start, example.token_ids)
                        if whole and windows is not None
                        else None
                    )
        if size == 1 and windows is not None:
            needed.update(self._token_vectors(examples, needed))
        at_hand = {
            text: self._vectors.get(text) if vector is None else unit_vectors(vector[None])[0]
            for text, vector in needed.items()
        }
        self._vectors = {text: vector for text, vector in at_hand.items() if vector is not None}
        await self._vectors_of(list(needed))

    def _token_vectors(self, examples, needed: dict) -> dict:
        """The tokens table's vectors of the single tokens of `examples` that `needed` lacks, looked up in
        one call (none when the table is missing)."""
        ids = {}
        for example in (e for e in examples if len(e.token_strs) > 1):
            for text, token in zip(
                map(token_text, example.token_strs), example.token_ids, strict=False
            ):
                if needed.get(text) is None:
                    ids.setdefault(text, token)
        vectors = self.deps.corpus_windows.token_vectors(list(ids.values())) if ids else None
        return dict(zip(ids, vectors, strict=False)) if vectors is not None else {}

    async def score(self, job: Job) -> JobResult:
        query = self.settings.query_prefix + job.explanation
        texts = [spans(e, self.settings.span_tokens) for e in job.examples]
        distinct = list(dict.fromkeys(t for window in texts for t in window))
        vectors = await self._vectors_of(
            [query] + distinct
        )  # at hand after `prepare`; a job scored without it embeds here
        # one product per distinct text: windows whose best token is the same text tie exactly (equal rows
        # of one matrix product can differ in the last bit)
        similarity = (
            dict(
                zip(
                    distinct,
                    (np.stack([vectors[t] for t in distinct]) @ vectors[query]).tolist(),
                    strict=False,
                )
            )
            if distinct
            else {}
        )
        return JobResult(
            [
                example_row(e, score=max(similarity[t] for t in window))
                for e, window in zip(job.examples, texts, strict=False)
            ]
        )
