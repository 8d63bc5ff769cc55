"""Fuzzing (delphi): windows come with tokens marked (the latent's own, or random ones in windows
where it is silent); the judge says which marks the explanation describes."""

from pydantic import Field

from assets.prompts import FUZZING_SYSTEM
from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings, classify


class FuzzingSettings(ScorerSettings):
    examples_per_prompt: int = Field(default=10, ge=1, description="Windows judged per request.")


class Fuzzing(Scorer):
    name = "fuzzing"
    description = "Fuzzing (delphi): are the marked tokens what the explanation describes?"
    Settings = FuzzingSettings
    uses = frozenset({"llm"})
    main_metric = "balanced_accuracy"
    scores_senses = True

    async def score(self, job: Job) -> JobResult:
        return await classify(
            self.deps.llm,
            job,
            self.settings.examples_per_prompt,
            FUZZING_SYSTEM,
            lambda e: e.marked_text,
        )
