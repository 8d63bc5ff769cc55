"""Embedding (delphi): cosine similarity of the explanation to each window in the embedder's space (ROC AUC)."""
import asyncio

from pydantic import Field

from assets.prompts import plain_text
from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings, example_row
from resources.embedder import explanation_similarity


class EmbeddingSettings(ScorerSettings):
    query_prefix: str = Field(default="", description="Text put before the explanation; instruction-tuned embedders want e.g. delphi's 'Instruct: Retrieve sentences that could be related to the explanation.\\nQuery:'.")


class Embedding(Scorer):
    name = "embedding"
    description = "Embedding (delphi): how well the explanation's embedding ranks activating over other windows (ROC AUC)."
    Settings = EmbeddingSettings
    uses = frozenset({"embedder"})
    main_metric = "roc_auc"

    async def score(self, job: Job) -> JobResult:
        texts = [plain_text(e.text) for e in job.examples]
        similarity = await asyncio.to_thread(explanation_similarity, self.deps.embedder.embed, [self.settings.query_prefix + job.explanation], texts)
        return JobResult([example_row(e, score=float(s)) for e, s in zip(job.examples, similarity[:, 0])])
