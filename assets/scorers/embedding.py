"""Embedding (delphi): cosine similarity of the explanation to each window in the embedder's space (ROC AUC)."""
import asyncio

import numpy as np
from pydantic import Field

from assets.prompts import plain_text
from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings, example_row
from resources.embedder import unit_vectors


class EmbeddingSettings(ScorerSettings):
    query_prefix: str = Field(default="", description="Text put before the explanation; instruction-tuned embedders want e.g. delphi's 'Instruct: Retrieve sentences that could be related to the explanation.\\nQuery:'.")


class Embedding(Scorer):
    name = "embedding"
    description = "Embedding (delphi): how well the explanation's embedding ranks activating over other windows (ROC AUC)."
    Settings = EmbeddingSettings
    uses = frozenset({"embedder"})
    main_metric = "roc_auc"

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
            new = dict(zip(missing, unit_vectors(await asyncio.to_thread(self.deps.embedder.embed, missing))))
            self._vectors.update(new)
            found.update(new)
        return found

    async def prepare(self, jobs: list[Job]) -> None:
        """The vectors of these jobs' windows and explanations: a window on the corpus grid is read from
        the contexts table (embedded there as the same text), the rest embedded in one call (full
        batches). Vectors only earlier jobs needed are let go, so memory follows the jobs at hand."""
        windows = self.deps.corpus_windows
        needed = dict.fromkeys(self.settings.query_prefix + job.explanation for job in jobs)
        for example in (e for job in jobs for e in job.examples):
            text = plain_text(example.text)
            if text not in needed:
                needed[text] = windows.vector(example.sequence, example.start, example.token_ids) if windows is not None else None
        at_hand = {text: self._vectors.get(text) if vector is None else unit_vectors(vector[None])[0] for text, vector in needed.items()}
        self._vectors = {text: vector for text, vector in at_hand.items() if vector is not None}
        await self._vectors_of(list(needed))

    async def score(self, job: Job) -> JobResult:
        query, texts = self.settings.query_prefix + job.explanation, [plain_text(e.text) for e in job.examples]
        vectors = await self._vectors_of([query] + texts)  # at hand after `prepare`; a job scored without it embeds here
        similarity = np.stack([vectors[t] for t in texts]) @ vectors[query] if texts else np.zeros(0)
        return JobResult([example_row(e, score=float(s)) for e, s in zip(job.examples, similarity)])
