"""Intervention (Paulo et al. 2024): steer the latent, continue neutral prompts, and measure how much
more likely the explanation makes the steered text than the unsteered text (`resources/intervention.py`).

The steering strength is searched per latent so that the next-token distributions move `target_kl`
nats from the unsteered ones, starting from the latent's largest cached activation. Main metric:
`intervention_score`, the mean over prompts of gain(steered) - gain(unsteered), where gain is the
change of a continuation's mean log-likelihood per token when the subject model reads it after the
explanation instead of after a neutral description. Rows: each continuation, steered (label 1) or
not (label 0), scored by its gain, so `roc_auc` says how often a steered text gains more.
"""
import asyncio
import threading

from pydantic import Field

from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings
from assets.score_metrics import NAN
from resources.intervention import ContinuationSource, LikelihoodScorer
from resources.steering import NEUTRAL_PROMPTS, max_activation


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
