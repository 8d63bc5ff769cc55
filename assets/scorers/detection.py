"""Detection (delphi): the judge reads the explanation and says which windows the latent fires in."""

from pydantic import Field

from assets.prompts import DETECTION_SYSTEM
from assets.records import Example
from assets.scorers.base import ScorerSettings, WindowClassifier


class DetectionSettings(ScorerSettings):
    examples_per_prompt: int = Field(
        default=10,
        ge=1,
        description="Windows judged per request (delphi shows 5; 10 keeps the control within delphi's request count).",
    )


class Detection(WindowClassifier):
    name = "detection"
    description = "Detection (delphi): does the latent fire in this window, given the explanation?"
    Settings = DetectionSettings
    system = DETECTION_SYSTEM

    def window_text(self, example: Example) -> str:
        return example.text
