"""Output-side judge: given the explanation, can an LLM tell which of two continuations of the same
neutral prompt was written with the latent steered? The continuations are the intervention scorer's
(strength set to a fixed KL from the unsteered output); all of a latent's pairs go in one request,
each pair's order seeded. Main metric: accuracy (chance 0.5); an unreadable answer is asked again
once, then the latent's question fails with both raw answers."""

import asyncio
from dataclasses import dataclass

import numpy as np

from assets.prompts import TOKEN_LEGEND, chat, highlight, read_int_list, reask_list_message
from assets.score_metrics import NAN
from assets.scorers.base import Job, JobResult
from assets.scorers.intervention import Continuations, ContinuationScorer

JUDGE_SYSTEM = (
    "You check descriptions of a language-model feature against what the model writes. For each "
    "numbered pair, the model continued the same prompt twice: once as usual and once with the "
    "feature turned up. Given the feature's description, say which continuation was written with the "
    "feature turned up: 1 or 2. Answer with only a list of numbers, one per pair, e.g. [2, 1]."
    + TOKEN_LEGEND
)


@dataclass
class Pair:
    prompt: str
    first: list[int]
    second: list[int]
    steered: int
    """1 or 2: which continuation was steered."""


def judge_pairs(continuations: Continuations, seed: int) -> list[Pair]:
    """One pair per prompt, the steered continuation first or second by a seeded coin."""
    rng = np.random.default_rng(seed)
    pairs = []
    for prompt, plain, steered in zip(
        continuations.prompts, continuations.unsteered, continuations.steered, strict=False
    ):
        if rng.random() < 0.5:
            pairs.append(Pair(prompt, steered, plain, 1))
        else:
            pairs.append(Pair(prompt, plain, steered, 2))
    return pairs


def judge_messages(explanation: str, pairs: list[Pair], vocab: list[str]) -> list[dict]:
    def shown(ids: list[int]) -> str:
        return highlight([vocab[t] for t in ids], [False] * len(ids))

    blocks = [
        f"Pair {i}: prompt: {highlight([p.prompt], [False])}\n"
        f"  Continuation 1: {shown(p.first)}\n"
        f"  Continuation 2: {shown(p.second)}"
        for i, p in enumerate(pairs, start=1)
    ]
    return chat(
        JUDGE_SYSTEM,
        f"Description: {explanation}\n\n"
        + "\n".join(blocks)
        + f"\n\nAnswer with {len(pairs)} numbers, each 1 or 2, in a list.",
    )


@dataclass
class Judged:
    """Per pair 1 = the judge named the steered continuation, or the failure with the raw answers."""

    correct: list[int] | None
    failure: str = ""
    prompt_tokens: int = 0

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else float("nan")


async def judge(client, explanation: str, pairs: list[Pair], vocab: list[str]) -> Judged:
    """Ask which continuation of each pair was steered; an answer that is not exactly one 1 or 2 per pair
    is asked again once, then the question fails with both raw answers (never a guess)."""
    n = len(pairs)
    asked = await client.ask(
        judge_messages(explanation, pairs, vocab),
        read_int_list(n, 1, 2),
        reask_list_message(n, 1, 2),
        max_tokens=8 + 4 * n,
        int_list=(n, 1, 2),
    )
    if asked.value is None:
        return Judged(None, asked.failure, asked.prompt_tokens)
    return Judged(
        [int(v == p.steered) for v, p in zip(asked.value, pairs, strict=False)],
        "",
        asked.prompt_tokens,
    )


class OutputJudge(ContinuationScorer):
    name = "output_judge"
    description = (
        "Output-side judge: given the explanation, tell the latent's steered "
        "continuation of a prompt from the unsteered one (accuracy)."
    )
    uses = frozenset({"llm", "subject_model", "coder"})
    main_metric = "accuracy"

    def __init__(self, settings, deps):
        super().__init__(settings, deps)
        self._vocab: list[str] | None = None

    def _pairs(self, latent: int, seed: int):
        with self._lock:
            if self._vocab is None:
                tokenizer = self.deps.subject_model.tokenizer()
                self._vocab = [tokenizer.decode([i]) for i in range(len(tokenizer))]
            made = self.source().get(latent)
        return made, judge_pairs(made, seed)

    async def score(self, job: Job) -> JobResult:
        made, pairs = await asyncio.to_thread(
            self._pairs, job.latent, self.settings.seed + job.latent
        )  # the same order for explanation and control
        judged = await judge(self.deps.llm, job.explanation, pairs, self._vocab)
        result = JobResult([], prompt_tokens=judged.prompt_tokens, extra={"steering_kl": made.kl})
        if judged.correct is None:
            result.lost(len(pairs), judged.failure)
            return result
        result.rows = [
            {
                "example": i,
                "label": 1,
                "quantile": 1,
                "activation": made.delta,
                "prediction": correct,
                "score": NAN,
            }
            for i, correct in enumerate(judged.correct)
        ]
        return result
