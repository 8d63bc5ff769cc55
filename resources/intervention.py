"""Scoring an explanation by what the latent does: the intervention score and the output-side judge.

Both start from the same continuations: each neutral prompt continued greedily without and with the
latent steered, at the strength whose next-token distributions are `target_kl` nats from the
unsteered ones (so latents of any scale are pushed equally hard).

- Intervention score (Paulo et al. 2024, arXiv 2410.13928): how much more likely the explanation
  makes the steered text than the unsteered text. A scoring model (the subject model) reads each
  continuation after "Description of the text below: <explanation>" and after a neutral
  description; the explanation's gain is the change of the continuation's mean log-likelihood per
  token. score = gain(steered) - gain(unsteered), averaged over prompts, in nats per token.
- Output-side judge: shown the explanation and, per prompt, the two continuations in a seeded
  order, an LLM says which one was written with the feature turned up. Accuracy; chance is 0.5.

Both are run again with the control (another latent's explanation) on the same continuations, so
the control costs no generation.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from assets.prompts import TOKEN_LEGEND, highlight, read_int_list, reask_list_message
from resources.sparse_coders import SparseCoder
from resources.steering import Steer, Steerer

DESCRIBED = "Description of the text below: {explanation}\nText:\n"
NOT_DESCRIBED = "Various unrelated sentences."

JUDGE_SYSTEM = (
    "You check descriptions of a language-model feature against what the model writes. For each "
    "numbered pair, the model continued the same prompt twice: once as usual and once with the "
    "feature turned up. Given the feature's description, say which continuation was written with the "
    "feature turned up: 1 or 2. Answer with only a list of numbers, one per pair, e.g. [2, 1]."
    + TOKEN_LEGEND
)


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


# ---- the output-side judge ----------------------------------------------------------------------


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
    for prompt, plain, steered in zip(continuations.prompts, continuations.unsteered, continuations.steered):
        if rng.random() < 0.5:
            pairs.append(Pair(prompt, steered, plain, 1))
        else:
            pairs.append(Pair(prompt, plain, steered, 2))
    return pairs


def judge_messages(explanation: str, pairs: list[Pair], vocab: list[str]) -> list[dict]:
    shown = lambda ids: highlight([vocab[t] for t in ids], [False] * len(ids))
    blocks = [f"Pair {i}: prompt: {highlight([p.prompt], [False])}\n  Continuation 1: {shown(p.first)}\n  Continuation 2: {shown(p.second)}"
              for i, p in enumerate(pairs, start=1)]
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Description: {explanation}\n\n" + "\n".join(blocks) + f"\n\nAnswer with {len(pairs)} numbers, each 1 or 2, in a list."}]


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
    asked = await client.ask(judge_messages(explanation, pairs, vocab), read_int_list(n, 1, 2), reask_list_message(n, 1, 2), max_tokens=8 + 4 * n, int_list=(n, 1, 2))
    if asked.value is None:
        return Judged(None, asked.failure, asked.prompt_tokens)
    return Judged([int(v == p.steered) for v, p in zip(asked.value, pairs)], "", asked.prompt_tokens)
