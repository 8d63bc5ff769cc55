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
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field

from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings
from assets.score_metrics import NAN
from resources.sparse_coders import SparseCoder
from resources.steering import NEUTRAL_PROMPTS, Steer, Steerer, max_activation

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


def steered_continuations(steerer: Steerer, coder: SparseCoder, latent: int, prompts: list[str], n_tokens: int, target_kl: float, unit: float,
                          unsteered: list[list[int]] | None = None, tolerance: float = 0.05) -> Continuations:
    """Continue each prompt `n_tokens` tokens without and with the latent steered to `target_kl`. The
    unsteered continuations are the same for every latent: pass them in to generate them once."""
    delta, kl = steerer.strength_for_kl(prompts, coder, latent, target_kl, unit, tolerance=tolerance)
    unsteered = steerer.generate(prompts, n_tokens) if unsteered is None else unsteered
    steered = steerer.generate(prompts, n_tokens, Steer(coder, latent, delta))
    return Continuations(list(prompts), unsteered, steered, delta, kl)


class ContinuationSource:
    """One partition's continuations: the unsteered ones made once, each latent's steered ones once
    and shared by its explanation and control jobs. One latent at a time (torch uses every core)."""

    def __init__(self, steerer: Steerer, coder: SparseCoder, prompts: list[str], n_tokens: int, target_kl: float, unit_of, tolerance: float = 0.05):
        self.steerer, self.coder, self.prompts, self.n_tokens = steerer, coder, list(prompts), n_tokens
        self.target_kl, self.unit_of, self.tolerance = target_kl, unit_of, tolerance
        self._lock = threading.Lock()
        self._plain: list[list[int]] | None = None
        self._made: dict[int, Continuations] = {}

    def get(self, latent: int) -> Continuations:
        with self._lock:
            if latent not in self._made:
                if self._plain is None:
                    self._plain = self.steerer.generate(self.prompts, self.n_tokens)
                self._made[latent] = steered_continuations(self.steerer, self.coder, latent, self.prompts, self.n_tokens, self.target_kl,
                                                           self.unit_of(latent), unsteered=self._plain, tolerance=self.tolerance)
            return self._made[latent]


def continuation_logprobs(lm: torch.nn.Module, tokenizer, prefix: str, prompts: list[str], continuations: list[list[int]]) -> np.ndarray:
    """Mean log-likelihood per token of each continuation after `prefix` + its prompt, one forward pass."""
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    sequences, starts = [], []
    for prompt, continuation in zip(prompts, continuations):
        head = prefix_ids + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sequences.append(head + list(continuation))
        starts.append(len(head))
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    device = next(lm.parameters()).device
    with torch.inference_mode():
        logits = lm(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float().cpu()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    out = []
    for row, (sequence, start) in enumerate(zip(sequences, starts)):
        out.append(float(logprobs[row, start - 1 : len(sequence) - 1].mean()))  # the continuation's own tokens
    return np.asarray(out)


@dataclass
class InterventionScore:
    score: float
    """gain(steered) - gain(unsteered), mean over prompts, nats per token."""
    steered_gain: np.ndarray
    unsteered_gain: np.ndarray


@dataclass
class LikelihoodScorer:
    """Scores explanations against one latent's continuations; the likelihoods without an explanation
    are computed once and shared by the explanation and its control."""

    lm: torch.nn.Module
    tokenizer: object
    continuations: Continuations
    _baseline: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False)

    def _likelihoods(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        """(steered, unsteered) mean log-likelihoods after `prefix`, in one forward pass."""
        c = self.continuations
        both = continuation_logprobs(self.lm, self.tokenizer, prefix, c.prompts * 2, c.steered + c.unsteered)
        return both[: len(c.prompts)], both[len(c.prompts) :]

    def score(self, explanation: str) -> InterventionScore:
        if self._baseline is None:
            self._baseline = self._likelihoods(DESCRIBED.format(explanation=NOT_DESCRIBED))
        steered, unsteered = self._likelihoods(DESCRIBED.format(explanation=explanation))
        steered_gain, unsteered_gain = steered - self._baseline[0], unsteered - self._baseline[1]
        return InterventionScore(float(np.mean(steered_gain - unsteered_gain)), steered_gain, unsteered_gain)


class InterventionSettings(ScorerSettings):
    prompts: list[str] = Field(default_factory=lambda: list(NEUTRAL_PROMPTS), min_length=2, description="Neutral prompts continued with and without the latent steered.")
    tokens: int = Field(default=24, ge=1, description="Tokens generated per continuation.")
    target_kl: float = Field(default=1.0, gt=0, description="KL divergence (nats) of the steered next-token distributions from the unsteered ones that the strength search aims at.")
    kl_tolerance: float = Field(default=0.05, gt=0, lt=1, description="Relative tolerance of the strength search.")


def continuation_source(scorer: Scorer) -> ContinuationSource:
    """The partition's continuations, for the intervention and output-judge scorers."""
    s, deps = scorer.settings, scorer.deps
    return ContinuationSource(deps.subject_model.steerer(), deps.coder, s.prompts, s.tokens, s.target_kl,
                              lambda latent: max_activation(deps.activations_dir, latent), s.kl_tolerance)


class Intervention(Scorer):
    name = "intervention"
    description = "Intervention (Paulo et al.): how much more likely the explanation makes the latent's steered continuations than unsteered ones (nats/token), at a fixed KL."
    Settings = InterventionSettings
    uses = frozenset({"subject_model", "coder"})
    main_metric = "intervention_score"

    def __init__(self, settings, deps):
        super().__init__(settings, deps)
        self._lock = threading.Lock()
        self._source: ContinuationSource | None = None
        self._scorers: dict[int, LikelihoodScorer] = {}

    def _score(self, latent: int, explanation: str):
        with self._lock:  # one latent at a time; its explanation and control share continuations and baselines
            if self._source is None:
                self._source = continuation_source(self)
            if latent not in self._scorers:
                model = self.deps.subject_model
                self._scorers[latent] = LikelihoodScorer(model.causal_lm(), model.tokenizer(), self._source.get(latent))
            return self._scorers[latent].continuations, self._scorers[latent].score(explanation)

    async def score(self, job: Job) -> JobResult:
        made, scored = await asyncio.to_thread(self._score, job.latent, job.explanation)
        rows = []
        for i, (steered, plain) in enumerate(zip(scored.steered_gain, scored.unsteered_gain)):
            rows.append({"example": 2 * i, "label": 1, "quantile": 1, "activation": made.delta, "prediction": NAN, "score": float(steered)})
            rows.append({"example": 2 * i + 1, "label": 0, "quantile": 0, "activation": 0.0, "prediction": NAN, "score": float(plain)})
        return JobResult(rows, extra={"intervention_score": scored.score, "steering_kl": made.kl})
