"""Simulation (OpenAI): the judge predicts each token's activation on a 0-10 scale from the
explanation; the expected value over the answer's logprobs for 0..10 (parsed values where the
backend gives none) is correlated with the true activations over all tokens at once."""

import asyncio
import re

import numpy as np
from pydantic import Field

from assets.prompts import simulation_messages
from assets.records import Example
from assets.score_metrics import pearson, rsquared
from assets.scorers.base import (
    Job,
    JobResult,
    Scorer,
    ScorerSettings,
    ask_list,
    example_row,
    list_tokens,
)
from resources.llm import Asked


class SimulationSettings(ScorerSettings):
    top_logprobs: int = Field(
        default=10,
        ge=0,
        le=20,
        description="Alternatives per answer token used for expected values; 0 = parsed values only.",
    )
    calibrate: bool = Field(
        default=False,
        description="Fit a linear map from simulated to true activations on the `valid` windows "
        "and report R² (correlation is unchanged by it).",
    )


_VALUE_TOKEN = re.compile(r'^[\s,\[\]{}:"]*(\d{1,2})[\s,\]}"]*$')


def expected_values(answer, values: list[int]) -> list[float] | None:
    """Per listed value, the expected value over the logprobs of the tokens 0..10 where it was written.

    None (and the caller uses the parsed values) when the answer has no logprobs or they do not align
    with the parsed list: the written list differs, or a value was not written as a token of its own
    (digits fused with other text), so its alternatives are not alternative values. Separators fused
    to a digit ("5,") still count as that digit. Where a tokenizer writes 10 as "1" "0", the "1"
    alternative counts as 10 there; elsewhere "1" is 1.
    """
    if not answer.tokens or len(answer.tokens) != len(answer.top_logprobs):
        return None
    text = "".join(answer.tokens)
    body = re.search(r"\[([^\]]*)\]", text)
    if not body or [int(m) for m in re.findall(r"\d+", body.group(1))] != values:
        return None
    starts = [body.start(1) + m.start() for m in re.finditer(r"\d+", body.group(1))]
    ends = np.cumsum([len(t) for t in answer.tokens])
    out = []
    for start, written in zip(starts, values, strict=False):
        step = int(np.searchsorted(ends, start, side="right"))
        chosen = _VALUE_TOKEN.match(answer.tokens[step])
        split_ten = written == 10 and chosen is not None and chosen.group(1) == "1"
        if chosen is None or (int(chosen.group(1)) != written and not split_ten):
            return None
        weights: dict[int, float] = {}
        for alternative, logprob in answer.top_logprobs[step].items():
            match = _VALUE_TOKEN.match(alternative)
            if match and int(match.group(1)) <= 10:
                value = 10 if split_ten and match.group(1) == "1" else int(match.group(1))
                weights[value] = weights.get(value, 0.0) + float(np.exp(logprob))
        total = sum(weights.values())
        if total <= 0:
            return None
        out.append(sum(v * w for v, w in weights.items()) / total)
    return out


def true_scale(example: Example, top: float) -> np.ndarray:
    """True activations on the simulator's 0-10 scale (relative to the latent's top test activation)."""
    return 10 * example.activations / max(top, 1e-9)


class Simulation(Scorer):
    name = "simulation"
    description = (
        "Simulation (OpenAI): correlation of logprob-expected 0-10 activations with "
        "the true ones, over all tokens."
    )
    Settings = SimulationSettings
    uses = frozenset({"llm"})
    main_metric = "ev_correlation"
    uses_calibration = True
    version = "2"  # 2: R² centred on the true activations' mean

    async def _simulate(
        self, examples: list[Example], explanation: str
    ) -> list[tuple[Example, np.ndarray | None, str, Asked]]:
        client, top_logprobs = self.deps.llm, self.settings.top_logprobs

        async def one(e: Example):
            messages = simulation_messages(explanation, e.token_strs)
            n = len(e.token_strs)
            if not client.fits(messages, list_tokens(n, 10)):
                return e, None, "dropped", Asked(None)
            outcome = await ask_list(client, messages, n, 0, 10, top_logprobs)
            if outcome.value is None:
                return e, None, "", outcome
            expected = expected_values(outcome.answer, outcome.value) if top_logprobs else None
            return (
                e,
                np.asarray(expected if expected is not None else outcome.value, float),
                "logprobs" if expected is not None else "parsed",
                outcome,
            )

        return await asyncio.gather(*(one(e) for e in examples))

    async def score(self, job: Job) -> JobResult:
        simulated = await self._simulate(job.examples, job.explanation)
        top = max((e.activations.max() for e in job.examples), default=1.0)
        result = JobResult([])
        for e, values, source, outcome in simulated:
            result.prompt_tokens += outcome.prompt_tokens
            if source == "dropped":
                result.dropped += 1
            elif values is None:
                result.lost(1, outcome.failure)
            else:
                result.rows.append(
                    example_row(
                        e,
                        score=float(values.max()),
                        simulated=values.tolist(),
                        true_activations=true_scale(e, top).tolist(),
                        values_from=source,
                    )
                )
        if result.rows:
            truth = np.concatenate([r["true_activations"] for r in result.rows])
            guess = np.concatenate([r["simulated"] for r in result.rows])
            # over all tokens of all windows at once; a constant simulation carries no information: 0, not NaN
            result.extra["ev_correlation"] = (
                0.0 if np.ptp(guess) == 0 and np.ptp(truth) > 0 else pearson(guess, truth)
            )
            result.extra["logprob_fraction"] = float(
                np.mean([r["values_from"] == "logprobs" for r in result.rows])
            )
            if self.settings.calibrate and job.calibration:
                fitted = [
                    (e, v)
                    for e, v, _, _ in await self._simulate(job.calibration, job.explanation)
                    if v is not None
                ]
                if fitted:
                    x = np.concatenate([v for _, v in fitted])
                    y = np.concatenate([true_scale(e, top) for e, _ in fitted])
                    slope, intercept = (
                        np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(y.mean()))
                    )
                    calibrated = slope * guess + intercept
                    result.extra["rsquared"] = rsquared(calibrated, truth)
        return result
