"""Fuzzing (delphi): windows come with tokens marked (the latent's own, or random ones in windows
where it is silent); the judge says which marks the explanation describes."""

from pydantic import Field

from assets.prompts import FUZZING_SYSTEM
from assets.records import Example
from assets.scorers.base import ScorerSettings, WindowClassifier


class FuzzingSettings(ScorerSettings):
    examples_per_prompt: int = Field(default=10, ge=1, description="Windows judged per request.")


class Fuzzing(WindowClassifier):
    name = "fuzzing"
    description = "Fuzzing (delphi): are the marked tokens what the explanation describes?"
    Settings = FuzzingSettings
    system = FUZZING_SYSTEM

    def window_text(self, example: Example) -> str:
        return example.marked_text
