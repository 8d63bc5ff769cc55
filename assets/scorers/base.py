"""What every scorer plugin shares: its settings model, the job it judges (a latent's record and
held-out examples, from `assets/records.py`), one job's result, and the ask-a-value-list helper of
the LLM judges.

A scorer is one module in `assets/scorers/` holding one `Scorer` subclass: its name, description,
typed `Settings`, the resources it `uses`, its control kind and main metric, and `score(job)`,
which judges one explanation (or, without one, the latent itself) on a latent's held-out windows
and returns one row per judged example. `assets/score_metrics.py` turns rows into metrics the same
way for every scorer, and `assets/scores.py` makes each scorer an asset, runs every job twice
(with the explanation and with the control) and writes the tables. An instance lives for one
partition, so whatever a scorer caches between jobs (a baseline, a lock) is its own attribute.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from assets.prompts import read_int_list, reask_list_message, scorer_messages
from assets.records import Example, LatentRecord
from assets.score_metrics import NAN
from assets.stage_config import digest_values, short_digest
from resources.llm import Asked, ProductionClient


class ScorerSettings(BaseModel):
    """Settings that define a scorer's results: their hash is part of its asset's code version."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True
    )  # strict: `true` is no number of examples
    seed: int = Field(
        default=0,
        description="Seed of example order, random marks, intruder tasks and the control's ring "
        "(`control_assignment`).",
    )

    def digest(self) -> str:
        """Short hash of every setting: a change makes this scorer's results, and only them, stale."""
        return short_digest(digest_values(self))


@dataclass
class Job:
    """One explanation (None for scorers without one) judged on one latent's held-out windows."""

    record: LatentRecord
    """The latent's evidence, for scorers that read more than the held-out windows."""
    explanation: str | None
    examples: list[Example]
    """The record's `test` windows in the latent's seeded order (`LatentRecord.examples`), shared
    with its control's job."""
    control: bool
    seed: int
    calibration: list[Example] = field(default_factory=list)
    """The record's `valid` windows, for scorers that fit something before judging."""

    @property
    def latent(self) -> int:
        """The latent judged, for scorers that act on the latent itself (steering it)."""
        return self.record.latent


@dataclass
class JobResult:
    rows: list[dict]
    failed: int = 0
    """Examples lost to failed or unreadable answers."""
    dropped: int = 0
    """Examples left out so that a prompt fits the judge's context."""
    failures: list[str] = field(default_factory=list)
    """Why each failed request failed, with the raw answer where there was one."""
    prompt_tokens: int = 0
    requests: int = 0
    """Answers the judge gave, re-asks included (counted by `classify`; a cached answer counts too)."""
    extra: dict = field(default_factory=dict)
    """Metrics only this scorer computes (columns of the scores table, e.g. `ev_correlation`)."""

    def lost(self, examples: int, reason: str) -> None:
        self.failed += examples
        self.failures.append(reason)


def example_row(example: Example, prediction: float = NAN, score: float = NAN, **extra) -> dict:
    return {
        "example": example.index,
        "label": example.label,
        "quantile": example.quantile,
        "activation": float(example.activations.max()),
        "prediction": prediction,
        "score": score,
        **extra,
    }


@dataclass
class ScorerDeps:
    """The resources a scorer may use, each present only if the scorer names it in `uses`."""

    llm: ProductionClient | None = None
    embedder: object | None = None
    """`resources.embedder.EmbedderResource`."""
    subject_model: object | None = None
    """`resources.subject_model.SubjectModelResource`."""
    coder: object | None = None
    """`resources.sparse_coders.SparseCoder` of the partition, loaded only when `uses` names 'coder'."""
    activations_dir: Path | None = None
    """The coder's activation cache (its per-latent maxima), given with the coder."""
    corpus_windows: object | None = None
    """`storage.vector_store.CorpusWindows`: grid windows already embedded, given with the embedder."""
    models: str = ""
    """The models that score, as `role=identity; …` (`Models`): recorded in every row the scorer writes."""


CONTROLS = {
    "shuffled_explanation": "the shuffled-explanation control",
    "no_intruder": "tasks without an intruder",
}
"""Control kinds: what a scorer's control run judges instead of the real thing."""


class Scorer:
    """A scorer plugin. Subclass it in one module of `assets/scorers/` (or of a module the
    deployment lists under `plugins`), set the class attributes, implement `score`."""

    name: ClassVar[str]
    description: ClassVar[str]
    Settings: ClassVar[type[ScorerSettings]] = ScorerSettings
    uses: ClassVar[frozenset[str]] = frozenset()
    """Resources it needs: any of 'llm', 'embedder', 'subject_model'; and 'coder' for the partition's coder."""
    control: ClassVar[Literal["shuffled_explanation", "no_intruder"]] = "shuffled_explanation"
    main_metric: ClassVar[str]
    scores_senses: ClassVar[bool] = False
    """Whether each sense of a latent explained as several is scored too (`assets/scores.py::score_senses`): set
    by scorers that judge only which held-out windows fire (their labels; the other senses' windows are silent
    ones) and by those that judge what the latent's steer writes (they read no window: the sense scores say
    which sense the latent writes). Not for scorers that read the windows' activation values (simulation)."""
    uses_calibration: ClassVar[bool] = False
    """Whether `score` reads `job.calibration` (the latent's `valid` windows); built only for scorers that do."""
    version: ClassVar[str] = "1"
    """Bump when the scoring code changes results: it is part of the asset's code version."""

    def __init__(self, settings: ScorerSettings, deps: ScorerDeps):
        self.settings = settings
        self.deps = deps

    @property
    def uses_explanation(self) -> bool:
        return self.control == "shuffled_explanation"

    @classmethod
    def control_description(cls) -> str:
        return CONTROLS[cls.control]

    async def prepare(self, jobs: list[Job]) -> None:
        """Called once with every job of the partition (the controls' too) before any is scored, for
        work the jobs share: the embedding scorer embeds each distinct text (a token, a span or a
        window) once here. Default: nothing."""

    async def score(self, job: Job) -> JobResult:
        raise NotImplementedError


# ---- the value-list question every LLM judge asks -------------------------------------------------


def list_tokens(n: int, hi: int) -> int:
    """Room for an answer of n values up to `hi`, with separators and a JSON wrapper."""
    return 8 + (3 + len(str(hi))) * n


async def ask_list(
    client: ProductionClient, messages: list[dict], n: int, lo: int, hi: int, top_logprobs: int = 0
) -> Asked[list[int]]:
    """One request whose answer must be a list of n integers in [lo, hi], asked (and asked again once if
    unreadable) by `ProductionClient.ask`; a lost question carries its failure, never a guess."""
    params = {
        "max_tokens": list_tokens(n, hi),
        "int_list": (n, lo, hi),
        "top_logprobs": top_logprobs,
    }
    return await client.ask(
        messages, read_int_list(n, lo, hi), reask_list_message(n, lo, hi), **params
    )


async def classify(
    client: ProductionClient,
    job: Job,
    per_prompt: int,
    system: str,
    text_of: Callable[[Example], str],
) -> JobResult:
    """Judge windows `per_prompt` at a time as fires (1) or not (0) given the explanation; each prompt
    keeps as many of its windows as fit the judge's context."""
    batches = [job.examples[i : i + per_prompt] for i in range(0, len(job.examples), per_prompt)]
    result = JobResult([])
    prompts = []  # (the examples a prompt kept, the prompt), for prompts that kept any
    for batch in batches:
        messages, dropped = client.fitting(
            lambda kept: scorer_messages(system, job.explanation, [text_of(e) for e in kept]),
            batch,
            list_tokens(len(batch), 1),
        )
        result.dropped += dropped
        if messages is not None:
            prompts.append((batch[: len(batch) - dropped], messages))
    asked = await asyncio.gather(
        *(ask_list(client, messages, len(kept), 0, 1) for kept, messages in prompts)
    )
    for (kept, _), outcome in zip(prompts, asked, strict=False):
        result.prompt_tokens += outcome.prompt_tokens
        result.requests += len(outcome.answers)
        if outcome.value is None:
            result.lost(len(kept), outcome.failure)
            continue
        result.rows += [
            example_row(e, prediction=p) for e, p in zip(kept, outcome.value, strict=False)
        ]
    return result


class WindowClassifier(Scorer):
    """A delphi scorer whose judge says which windows the explanation fits (`classify`); detection and
    fuzzing differ only in the system prompt and the text shown for each window."""

    uses = frozenset({"llm"})
    main_metric = "balanced_accuracy"
    scores_senses = True
    system: ClassVar[str]

    def window_text(self, example: Example) -> str:
        raise NotImplementedError

    async def score(self, job: Job) -> JobResult:
        return await classify(
            self.deps.llm, job, self.settings.examples_per_prompt, self.system, self.window_text
        )
