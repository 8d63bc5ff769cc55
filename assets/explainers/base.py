"""What every explainer plugin shares: its settings model, its resources, and the protocol.

An explainer is one module in `assets/explainers/` holding one `Explainer` subclass: its name,
description, typed `Settings`, the resources it `uses` beyond the LLM, `prompt(record, max_tokens)`
(from the latent's evidence, an `assets.records.LatentRecord`: the messages to send, fitted to the
LLM's context, and how many examples were dropped to fit) and `parse(text)` (the explanation in an
answer, or a `Refusal` saying why it cannot be read: the answer is asked again once, then the latent
is failed with both answers and the reasons). `assets/explanations.py` does the rest for every
explainer: sampling best-of-N candidates, choosing among them, the table and the search index.
An explainer that reads explanations another tool wrote (`delphi_folder.py`) sets `asks_llm = False`
and implements `read(record)` instead of `prompt`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from assets.prompts import REASK_EXPLANATION, parse_explanation
from assets.records import LatentRecord
from assets.stage_config import short_digest
from resources.llm import ProductionClient, Refusal


class ExplainerSettings(BaseModel):
    """An explainer's own settings (none by default); their hash is part of the explanations' code version."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def digest(self) -> str:
        return short_digest(self.model_dump())


@dataclass
class ExplainerDeps:
    """What an explainer may use: the LLM client (for fitting prompts to its context) and, if named in
    `uses`, the subject model and the registered coder of the partition."""

    llm: ProductionClient
    subject_model: object | None = None
    coder: object | None = None
    """`resources.sparse_coders.SparseCoder` of the partition, loaded only when `uses` names 'coder'."""


class Explainer:
    """An explainer plugin. Subclass it in one module of `assets/explainers/` (or of a module the
    deployment lists under `plugins`), set the class attributes, implement `prompt`."""

    name: ClassVar[str]
    description: ClassVar[str]
    Settings: ClassVar[type[ExplainerSettings]] = ExplainerSettings
    uses: ClassVar[frozenset[str]] = frozenset()
    """Besides the LLM: any of 'subject_model', 'coder'."""
    version: ClassVar[str] = "1"
    """Bump when the prompt or parsing changes results: it is part of the explanations' code version."""
    reask: ClassVar[str] = REASK_EXPLANATION
    """The follow-up turn sent once when an answer cannot be read."""
    asks_llm: ClassVar[bool] = True
    """False: it reads each explanation (`read`) instead of asking the LLM; it gets no LLM client, and
    best of N, refining and senses do not apply."""

    def __init__(self, settings: ExplainerSettings, deps: ExplainerDeps):
        self.settings = settings
        self.deps = deps

    def prompt(self, record: LatentRecord, max_tokens: int) -> tuple[list[dict] | None, int]:
        raise NotImplementedError

    def fit_shown(
        self,
        record: LatentRecord,
        max_tokens: int,
        messages: Callable[[list[tuple[list[str], list[float]]], float], list[dict]],
    ) -> tuple[list[dict] | None, int]:
        """`messages` of the latent's shown windows and top activation, dropping windows to fit the
        LLM's context: the one way the window-showing explainers choose and fit what they show."""
        examples, top = record.shown_examples()
        return self.deps.llm.fitting(lambda kept: messages(kept, top), examples, max_tokens)

    def parse(self, text: str) -> str | Refusal:
        return parse_explanation(text)

    @property
    def model(self) -> str:
        """The model its rows and metadata name: the LLM's identity; one that asks none names its own."""
        return self.deps.llm.identity

    def files_digest(self) -> str:
        """A hash of the files it reads besides the latent's evidence (empty: none). It is part of the
        explanations' code version, so that changed files make them, and the scores below, stale."""
        return ""

    def read(self, record: LatentRecord) -> str:
        """The latent's explanation, for an explainer that asks no LLM; `LookupError` says why it has none."""
        raise NotImplementedError
