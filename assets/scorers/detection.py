"""Detection (delphi): the judge reads the explanation and says which windows the latent fires in."""

from pydantic import Field

from assets.prompts import DETECTION_SYSTEM
from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings, classify


class DetectionSettings(ScorerSettings):
    examples_per_prompt: int = Field(
        default=10,
        ge=1,
        description="Windows judged per request (delphi shows 5; 10 keeps the control within delphi's request count).",
    )


class Detection(Scorer):
    name = "detection"
    description = "Detection (delphi): does the latent fire in this window, given the explanation?"
    Settings = DetectionSettings
    uses = frozenset({"llm"})
    main_metric = "balanced_accuracy"
    scores_senses = True

    async def score(self, job: Job) -> JobResult:
        return await classify(
            self.deps.llm,
            job,
            self.settings.examples_per_prompt,
            DETECTION_SYSTEM,
            lambda e: e.text,
        )
