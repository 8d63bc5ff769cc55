"""SAEBench's autointerp protocol (Karvonen et al. 2025, `sae_bench/evals/autointerp/main.py`), for a number
to put beside its published ones: one prompt per latent shows 14 windows in random order (2 of the
strongest, 2 importance-sampled, 10 random), and the judge lists those where the explanation says the latent
fires, or answers None. The score is the share of windows classified right, so an answer of None already
scores the share of non-activating windows (10/14 ≈ 0.71): each row keeps that floor (`none_floor`) beside
the score and the shuffled control's.

Where our windows differ from SAEBench's (see the README's scorer table):
- the windows are the latent's held-out `test` windows, not fresh draws from the corpus: the strongest are
  the strongest held-out ones (SAEBench: 2 of the corpus's top 12, the other 10 shown to its explainer);
  the importance-sampled ones are drawn from the other held-out activating windows with probability
  proportional to their peak activation squared (SAEBench: from every token below its top windows' floor);
- the random windows are the exemplars' `random` non-activating windows, in which the latent is zero
  (SAEBench labels its random windows inactive whether or not the latent fires in them); when there are
  fewer than asked, other non-activating sources (decoder neighbours, embedding hard negatives) fill in,
  and with fewer still, fewer windows are shown; the floor is always that of the windows shown;
- windows are the exemplars' length and placement (SAEBench: 21 tokens centred on the token; set
  `[exemplars] example_ctx_len = 21` and `window_placement = "centered"` to match).
"""

import re

import numpy as np
from pydantic import Field

from assets.prompts import TOKEN_LEGEND, chat
from assets.records import Example
from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings, example_row, list_tokens
from resources.llm import Refusal


class SAEBenchSettings(ScorerSettings):
    n_top_windows: int = Field(
        default=2, ge=0, description="Strongest held-out activating windows shown (SAEBench: 2)."
    )
    n_importance_windows: int = Field(
        default=2,
        ge=0,
        description="Activating windows drawn with probability ∝ peak activation² from the other "
        "held-out ones (SAEBench: 2).",
    )
    n_random_windows: int = Field(
        default=10,
        ge=0,
        description="Non-activating windows shown, `random` ones first (SAEBench: 10).",
    )


def saebench_windows(
    examples: list[Example], s: SAEBenchSettings, rng: np.random.Generator
) -> list[Example]:
    """The windows one prompt shows, in a random order: the strongest activating ones, importance-sampled
    ones from the rest, and non-activating ones (`random` first, then other sources, each in the given order)."""
    activating = sorted((e for e in examples if e.label), key=lambda e: -float(e.activations.max()))
    top, rest = activating[: s.n_top_windows], activating[s.n_top_windows :]
    weights = np.array([float(e.activations.max()) ** 2 for e in rest])
    n_sampled = min(s.n_importance_windows, int(np.count_nonzero(weights)))
    sampled = (
        [
            rest[i]
            for i in rng.choice(len(rest), size=n_sampled, replace=False, p=weights / weights.sum())
        ]
        if n_sampled
        else []
    )
    silent = sorted((e for e in examples if not e.label), key=lambda e: e.kind != "random")[
        : s.n_random_windows
    ]
    shown = top + sampled + silent
    return [shown[i] for i in rng.permutation(len(shown))]


def none_floor(examples: list[Example]) -> float:
    """The score of the answer None on these windows: the share that are non-activating."""
    return float(np.mean([not e.label for e in examples])) if examples else float("nan")


SAEBENCH_SYSTEM = (
    "We are studying features of a language model. A feature fires on particular words, parts of words or "
    "ideas in short texts. You get a short explanation of what one feature fires on, then {n} numbered texts "
    "in random order. Reply with a comma-separated list of the numbers of the texts in which you think the "
    'feature fires at least once, on any of their words; your reply might look like "{example}". Do not read '
    "the explanation too narrowly. If you think it fires in none of the texts, reply with the single word None. "
    "Your reply must hold nothing but the comma-separated numbers or the word None." + TOKEN_LEGEND
)


def saebench_messages(explanation: str, texts: list[str], example: list[int]) -> list[dict]:
    """SAEBench's question: its structure and answer format; `example` is the sample reply the system prompt shows."""
    numbered = "\n".join(f"{i}. {t}" for i, t in enumerate(texts, start=1))
    system = SAEBENCH_SYSTEM.format(n=len(texts), example=", ".join(map(str, example)))
    return chat(
        system,
        "The explanation: this feature fires on "
        f"{explanation.strip().rstrip('.')}.\n\nThe texts:\n\n{numbered}",
    )


_INDEX_LIST = re.compile(r"\d+(?:\s*(?:,\s*and\b|,|\band\b)\s*\d+)*")


def read_window_numbers(n: int):
    """A reader for `ProductionClient.ask`: the window numbers (1..n) of an answer that is only a list of them
    (separated by commas or `and`, optionally in brackets, a final full stop allowed) or None; anything
    else, or a number outside 1..n, is refused."""

    def read(text: str) -> list[int] | Refusal:
        body = text.strip().strip('".').strip()
        if body.casefold() == "none" or body == "[]":
            return []
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1].strip()
        if not _INDEX_LIST.fullmatch(body):
            return Refusal(f"not a comma-separated list of window numbers from 1 to {n}, nor None")
        numbers = sorted({int(v) for v in re.findall(r"\d+", body)})
        if numbers[0] < 1 or numbers[-1] > n:
            return Refusal(
                f"window number(s) outside 1 to {n}: {[v for v in numbers if not 1 <= v <= n]}"
            )
        return numbers

    return read


def reask_numbers_message(n: int) -> dict:
    return {
        "role": "user",
        "content": f"Your reply could not be read. Reply with only the numbers (1 to {n}) "
        "of the texts in which the feature fires, separated by commas, like 2, 5, 11, "
        "or the single word None, and nothing else.",
    }


class SAEBench(Scorer):
    name = "saebench"
    description = (
        "SAEBench autointerp: which of 14 windows (2 top, 2 importance-sampled, "
        "10 random) does the explanation say the latent fires in? Accuracy, "
        "beside the answer-None floor."
    )
    Settings = SAEBenchSettings
    uses = frozenset({"llm"})
    main_metric = "accuracy"
    scores_senses = True

    async def score(self, job: Job) -> JobResult:
        client, s = self.deps.llm, self.settings
        rng = np.random.default_rng(
            [s.seed, job.latent]
        )  # not `job.seed`: the control sees the same windows and sample reply
        windows = saebench_windows(job.examples, s, rng)

        def build(kept: list[Example]) -> list[dict]:
            """The sample reply lists as many numbers as activating windows are asked for, as SAEBench's does."""
            size = min(s.n_top_windows + s.n_importance_windows, len(kept))
            example = sorted(
                np.random.default_rng([s.seed, job.latent, len(kept)]).choice(
                    len(kept), size=size, replace=False
                )
                + 1
            )
            return saebench_messages(
                job.explanation, [e.text for e in kept], [int(i) for i in example]
            )

        messages, dropped = client.fitting(build, windows, list_tokens(len(windows), len(windows)))
        kept = windows[: len(windows) - dropped]
        result = JobResult([], dropped=dropped, extra={"none_floor": none_floor(kept)})
        if messages is None:
            return result
        outcome = await client.ask(
            messages,
            read_window_numbers(len(kept)),
            reask_numbers_message(len(kept)),
            max_tokens=list_tokens(len(kept), len(kept)),
        )
        result.prompt_tokens, result.requests = outcome.prompt_tokens, len(outcome.answers)
        if outcome.value is None:
            result.lost(len(kept), outcome.failure)
            return result
        result.rows = [
            example_row(e, prediction=int(i in outcome.value)) for i, e in enumerate(kept, start=1)
        ]
        return result
