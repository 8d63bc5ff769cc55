"""Embedding (delphi): cosine similarity of the explanation to each window in the embedder's space (ROC AUC)."""
import asyncio

import numpy as np
from pydantic import Field

from assets.prompts import plain_text
from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings, example_row


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
        """Unit vector of each text embedded in this partition: a window shared by latents, or by a latent
        and its control, is embedded once."""

    async def _embed(self, texts: list[str]) -> None:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            vectors = await asyncio.to_thread(self.deps.embedder.embed, missing)
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            self._vectors.update(zip(missing, vectors))

    async def prepare(self, jobs: list[Job]) -> None:
        """Every distinct window and explanation of the partition, in one call (full batches)."""
        await self._embed([self.settings.query_prefix + job.explanation for job in jobs] + [plain_text(e.text) for job in jobs for e in job.examples])

    async def score(self, job: Job) -> JobResult:
        query, texts = self.settings.query_prefix + job.explanation, [plain_text(e.text) for e in job.examples]
        await self._embed([query] + texts)
        similarity = np.stack([self._vectors[t] for t in texts]) @ self._vectors[query] if texts else np.zeros(0)
        return JobResult([example_row(e, score=float(s)) for e, s in zip(job.examples, similarity)])
