"""Output-side judge: given the explanation, can an LLM tell which of two continuations of the same
neutral prompt was written with the latent steered? The continuations are the intervention scorer's
(strength set to a fixed KL from the unsteered output); all of a latent's pairs go in one request,
each pair's order seeded. Main metric: accuracy (chance 0.5); an unreadable answer is asked again
once, then the latent's question fails with both raw answers."""
import asyncio
import threading

from assets.scorers.base import Job, JobResult, Scorer
from assets.scorers.intervention import InterventionSettings, continuation_source
from assets.score_metrics import NAN
from resources.intervention import ContinuationSource, judge, judge_pairs


class OutputJudge(Scorer):
    name = "output_judge"
    description = "Output-side judge: given the explanation, tell the latent's steered continuation of a prompt from the unsteered one (accuracy)."
    Settings = InterventionSettings
    uses = frozenset({"llm", "subject_model", "coder"})
    main_metric = "accuracy"

    def __init__(self, settings, deps):
        super().__init__(settings, deps)
        self._lock = threading.Lock()
        self._source: ContinuationSource | None = None
        self._vocab: list[str] | None = None

    def _pairs(self, latent: int, seed: int):
        with self._lock:
            if self._source is None:
                self._source = continuation_source(self)
                tokenizer = self.deps.subject_model.tokenizer()
                self._vocab = [tokenizer.decode([i]) for i in range(len(tokenizer))]
            made = self._source.get(latent)
        return made, judge_pairs(made, seed)

    async def score(self, job: Job) -> JobResult:
        made, pairs = await asyncio.to_thread(self._pairs, job.latent, self.settings.seed + job.latent)  # the same order for explanation and control
        judged = await judge(self.deps.llm, job.explanation, pairs, self._vocab)
        result = JobResult([], prompt_tokens=judged.prompt_tokens, extra={"steering_kl": made.kl})
        if judged.correct is None:
            result.lost(len(pairs), judged.failure)
            return result
        result.rows = [{"example": i, "label": 1, "quantile": 1, "activation": made.delta, "prediction": correct, "score": NAN}
                       for i, correct in enumerate(judged.correct)]
        return result
