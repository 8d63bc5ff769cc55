"""Intervention (Paulo et al. 2024): steer the latent, continue neutral prompts, and measure how much
more likely the explanation makes the steered text than the unsteered text.

The steering strength is searched per latent so that the next-token distributions move `target_kl`
nats from the unsteered ones, starting from the latent's largest cached activation. Main metric:
`intervention_score`, the mean over prompts of gain(steered) - gain(unsteered), where gain is the
change of a continuation's mean log-likelihood per token when the subject model reads it after the
explanation instead of after a neutral description. Rows: each continuation, steered (label 1) or
not (label 0), scored by its gain, so `roc_auc` says how often a steered text gains more.
"""

import asyncio
import functools
import inspect
import threading
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from assets.score_metrics import NAN
from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings
from assets.stage_config import SteeringStrength
from resources.sparse_coders import SparseCoder
from resources.steering import (
    NEUTRAL_PROMPTS,
    Steer,
    Steerer,
    SteeringError,
    logits_to_keep,
    max_activation,
)

DESCRIBED = "Description of the text below: {explanation}\nText:\n"
NOT_DESCRIBED = "Various unrelated sentences."


@dataclass
class Continuations:
    """A latent's unsteered and steered continuations of the same prompts, and the steer that made them."""

    prompts: list[str]
    unsteered: list[list[int]]
    steered: list[list[int]]
    delta: float
    """The value added to the latent, in its own units."""
    kl: float
    """Mean KL divergence of the steered next-token distributions from the unsteered ones, in nats."""


class ContinuationSource:
    """One partition's continuations. The unsteered continuations and next-token distributions are
    made once; the steered ones a batch of up to `batch` latents at a time (each latent a block of
    rows, their strength searches advancing together): the latent asked for and the next latents
    announced with `expect`. A latent's continuations serve its explanation's and its control's jobs."""

    def __init__(
        self,
        steerer: Steerer,
        coder: SparseCoder,
        prompts: list[str],
        n_tokens: int,
        target_kl: float,
        unit_of,
        tolerance: float = 0.05,
        batch: int = 1,
    ):
        self.steerer, self.coder, self.prompts, self.n_tokens = (
            steerer,
            coder,
            list(prompts),
            n_tokens,
        )
        self.target_kl, self.unit_of, self.tolerance, self.batch_size = (
            target_kl,
            unit_of,
            tolerance,
            batch,
        )
        self._lock = threading.RLock()
        self._plain: list[list[int]] | None = None
        self._clean: torch.Tensor | None = None
        self._expected: dict[int, None] = {}
        """Latents announced and not made yet, in order (a dict as an ordered set)."""
        self._made: dict[int, dict[int, Continuations]] = {}

    def expect(self, latents: list[int]) -> None:
        """Announce latents that will be asked for, so that they join the batches of those asked before them."""
        with self._lock:
            self._expected.update((latent, None) for latent in latents if latent not in self._made)

    def batch(self, latent: int) -> dict[int, Continuations]:
        """`latent`'s continuations and those of the latents steered in the same batch, made now if not yet."""
        with self._lock:
            if latent not in self._made:
                self._make(latent)
            return self._made[latent]

    def get(self, latent: int) -> Continuations:
        return self.batch(latent)[latent]

    def unsteered(self) -> list[list[int]]:
        """The unsteered continuations (with the unsteered next-token distributions): made once, for every latent."""
        with self._lock:
            if self._plain is None:
                self._plain = self.steerer.generate(self.prompts, self.n_tokens)
                self._clean = self.steerer.next_token_logprobs(self.prompts)
            return self._plain

    def _make(self, latent: int) -> None:
        units = {latent: self.unit_of(latent)}  # the latent asked for fails here if it has no unit
        for other in self._expected:
            if len(units) == self.batch_size:
                break
            if other not in units and other not in self._made:
                try:
                    units[other] = self.unit_of(other)
                except SteeringError:
                    pass  # it fails with its reason when asked for itself
        plain = self.unsteered()
        latents = list(units)
        found = self.steerer.strengths_for_kl(
            self.prompts,
            self.coder,
            latents,
            self.target_kl,
            list(units.values()),
            self.tolerance,
            clean=self._clean,
        )
        steered = self.steerer.generate(
            self.prompts,
            self.n_tokens,
            [
                Steer(self.coder, each, delta)
                for each, (delta, _) in zip(latents, found, strict=False)
            ],
        )
        n = len(self.prompts)
        made = {
            each: Continuations(list(self.prompts), plain, steered[i * n : (i + 1) * n], delta, kl)
            for i, (each, (delta, kl)) in enumerate(zip(latents, found, strict=False))
        }
        for each in latents:
            self._made[each] = made
            self._expected.pop(each, None)


CACHE_OUTPUT_INDEX = 1
"""A causal LM's output, indexed: (logits, cache, ...)."""


@functools.lru_cache(maxsize=4)
def _cache_name(lm: torch.nn.Module) -> str:
    return (
        "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    )  # transformers 5 renamed it


def cache_argument(lm: torch.nn.Module, cache) -> dict:
    """The forward argument that passes a key/value cache, under the name this transformers takes."""
    return {_cache_name(lm): cache} if cache is not None else {}


def continuation_logprobs(
    lm: torch.nn.Module,
    tokenizer,
    prefixes: list[str],
    prompts: list[str],
    continuations: list[list[int]],
) -> np.ndarray:
    """Mean log-likelihood per token of each continuation after its prefix + its prompt. The texts
    after one prefix read it once: its keys and values are computed in one row and repeated for each
    text, and only the rest (the prefix's last token, the prompt and the continuation, right-padded)
    runs per text, one forward pass per prefix (logits only from the first continuation on where the
    model allows)."""
    ids_of = functools.lru_cache(maxsize=None)(
        lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    )
    device = next(lm.parameters()).device
    means = np.empty(len(prefixes))
    after: dict[str, list[int]] = {}
    for row, prefix in enumerate(prefixes):
        after.setdefault(prefix, []).append(row)
    for prefix, rows in after.items():
        shared, last = (
            list(ids_of(prefix)[:-1]),
            list(ids_of(prefix)[-1:]),
        )  # the last token is read per text, so its logits predict the prompt
        cache = None
        with torch.inference_mode():
            if shared:
                cache = lm(input_ids=torch.tensor([shared], device=device), use_cache=True)[
                    CACHE_OUTPUT_INDEX
                ]
                cache.batch_repeat_interleave(len(rows))
        sequences = [last + list(ids_of(prompts[row])) + list(continuations[row]) for row in rows]
        starts = [len(last) + len(ids_of(prompts[row])) for row in rows]
        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), len(shared) + width), dtype=torch.long)
        mask[:, : len(shared)] = 1
        for i, sequence in enumerate(sequences):
            ids[i, : len(sequence)] = torch.tensor(sequence)
            mask[i, len(shared) : len(shared) + len(sequence)] = 1
        with torch.inference_mode():
            logits = (
                lm(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    **cache_argument(lm, cache),
                    use_cache=cache is not None,
                    **logits_to_keep(lm, width - min(starts) + 1),
                )
                .logits.float()
                .cpu()
            )
        first = width - logits.shape[1]  # the position of the first logits kept
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, first + 1 :, None])[
            ..., 0
        ]
        for i, (row, sequence, start) in enumerate(zip(rows, sequences, starts, strict=False)):
            means[row] = float(
                logprobs[i, start - first - 1 : len(sequence) - first - 1].mean()
            )  # the continuation's own tokens
    return means


class Likelihoods:
    """Mean log-likelihoods per token of continuations read after a description and their prompt, each
    distinct text computed once (the unsteered continuations after the neutral description serve every
    latent; after an explanation, the latent it explains and the one whose control it is), up to
    `rows` texts at a time, those after one description in one forward pass."""

    def __init__(self, lm: torch.nn.Module, tokenizer, rows: int):
        self.lm, self.tokenizer, self.rows = lm, tokenizer, rows
        self._known: dict[tuple[str, str, tuple[int, ...]], float] = {}

    def of(self, texts: list[tuple[str, str, list[int]]]) -> np.ndarray:
        """The likelihood of each (description prefix, prompt, continuation), computing those not known yet."""
        keys = [(prefix, prompt, tuple(continuation)) for prefix, prompt, continuation in texts]
        missing = sorted(
            dict.fromkeys(k for k in keys if k not in self._known), key=lambda k: k[0]
        )  # one description's texts together: little padding
        for i in range(0, len(missing), self.rows):
            chunk = missing[i : i + self.rows]
            self._known.update(
                zip(
                    chunk,
                    continuation_logprobs(
                        self.lm, self.tokenizer, *map(list, zip(*chunk, strict=False))
                    ),
                    strict=False,
                )
            )
        return np.asarray([self._known[k] for k in keys])


def likelihood_texts(made: Continuations, explanation: str) -> list[tuple[str, str, list[int]]]:
    """What an intervention score reads: the steered, then the unsteered continuations, after the
    neutral description, then after the explanation."""
    return [
        (DESCRIBED.format(explanation=described), prompt, continuation)
        for described in (NOT_DESCRIBED, explanation)
        for continuations in (made.steered, made.unsteered)
        for prompt, continuation in zip(made.prompts, continuations, strict=False)
    ]


@dataclass
class InterventionScore:
    score: float
    """gain(steered) - gain(unsteered), mean over prompts, nats per token."""
    steered_gain: np.ndarray
    unsteered_gain: np.ndarray


def intervention_score(
    likelihoods: Likelihoods, made: Continuations, explanation: str
) -> InterventionScore:
    neutral_steered, neutral_plain, steered, plain = likelihoods.of(
        likelihood_texts(made, explanation)
    ).reshape(4, len(made.prompts))
    steered_gain, unsteered_gain = steered - neutral_steered, plain - neutral_plain
    return InterventionScore(
        float(np.mean(steered_gain - unsteered_gain)), steered_gain, unsteered_gain
    )


def score_in_batch(
    source: ContinuationSource,
    likelihoods: Likelihoods,
    explanations: dict[int, list[str]],
    latent: int,
    explanation: str,
) -> tuple[Continuations, InterventionScore]:
    """`latent`'s continuations and intervention score. Its batch is steered if it was not, and its
    batch's continuations are read after every explanation announced for them (`explanations`, taken
    out as they are read) in few forward passes, so their later scores only look them up."""
    batch = source.batch(latent)
    wanted = [
        text
        for other, made in batch.items()
        for said in explanations.pop(other, [])
        for text in likelihood_texts(made, said)
    ]
    likelihoods.of(wanted + likelihood_texts(batch[latent], explanation))
    return batch[latent], intervention_score(likelihoods, batch[latent], explanation)


class InterventionSettings(ScorerSettings, SteeringStrength):
    prompts: list[str] = Field(
        default_factory=lambda: list(NEUTRAL_PROMPTS),
        min_length=2,
        description="Neutral prompts continued with and without the latent steered.",
    )
    tokens: int = Field(default=24, ge=1, description="Tokens generated per continuation.")


class ContinuationScorer(Scorer):
    """A scorer of latents' steered continuations (intervention, output_judge): one `ContinuationSource`
    per partition, told each chunk's latents in `prepare` so that they are steered
    `[subject_model] steering_batch` at a time. One batch at a time (torch uses every core)."""

    Settings = InterventionSettings
    scores_senses = True

    def __init__(self, settings, deps):
        super().__init__(settings, deps)
        self._lock = threading.RLock()
        self._source: ContinuationSource | None = None

    def source(self) -> ContinuationSource:
        with self._lock:
            if self._source is None:
                s, deps = self.settings, self.deps
                self._source = ContinuationSource(
                    deps.subject_model.steerer(),
                    deps.coder,
                    s.prompts,
                    s.tokens,
                    s.target_kl,
                    lambda latent: max_activation(deps.activations_dir, latent),
                    s.kl_tolerance,
                    deps.subject_model.steering_batch,
                )
            return self._source

    async def prepare(self, jobs: list[Job]) -> None:
        source = await asyncio.to_thread(self.source)
        source.expect(list(dict.fromkeys(job.latent for job in jobs)))


class Intervention(ContinuationScorer):
    name = "intervention"
    description = (
        "Intervention (Paulo et al.): how much more likely the explanation makes the "
        "latent's steered continuations than unsteered ones (nats/token), at a fixed KL."
    )
    uses = frozenset({"subject_model", "coder"})
    main_metric = "intervention_score"

    def __init__(self, settings, deps):
        super().__init__(settings, deps)
        self._likelihoods: Likelihoods | None = None
        self._explanations: dict[int, list[str]] = {}
        """The explanations each announced latent will be scored with (its own and its control's)."""

    async def prepare(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._explanations.setdefault(job.latent, []).append(job.explanation)
        await super().prepare(jobs)

    def _score(self, latent: int, explanation: str):
        with self._lock:
            if self._likelihoods is None:
                model = self.deps.subject_model
                self._likelihoods = Likelihoods(
                    model.causal_lm(),
                    model.tokenizer(),
                    model.steering_batch * len(self.settings.prompts),
                )
            return score_in_batch(
                self.source(), self._likelihoods, self._explanations, latent, explanation
            )

    async def score(self, job: Job) -> JobResult:
        made, scored = await asyncio.to_thread(self._score, job.latent, job.explanation)
        rows = []
        for i, (steered, plain) in enumerate(
            zip(scored.steered_gain, scored.unsteered_gain, strict=False)
        ):
            rows.append(
                {
                    "example": 2 * i,
                    "label": 1,
                    "quantile": 1,
                    "activation": made.delta,
                    "prediction": NAN,
                    "score": float(steered),
                }
            )
            rows.append(
                {
                    "example": 2 * i + 1,
                    "label": 0,
                    "quantile": 0,
                    "activation": 0.0,
                    "prediction": NAN,
                    "score": float(plain),
                }
            )
        return JobResult(rows, extra={"intervention_score": scored.score, "steering_kl": made.kl})
