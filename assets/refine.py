"""Refining an explanation by showing the explainer its mistakes (`[explanations] refine_rounds`).

After the first explanation, the deployment's judge runs the detection scorer on the latent's `valid`
windows. The explainer is shown the windows the explanation wrongly fits (false positives, as plain
text) and those it misses (false negatives, firing tokens marked) and asked for a revision; the
revision is kept only when its balanced accuracy on the same `valid` windows is higher. At most
`rounds` revisions, fewer once nothing is misjudged. Only `valid` windows are ever shown or judged
here, so the `test` windows that every score is reported on stay unseen until scoring. Each round's
text, valid score and requests are a row of the `explanation_rounds` table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from assets.explainers.base import Explainer
from assets.prompts import refine_message
from assets.records import Example, LatentRecord
from assets.score_metrics import binary_metrics
from assets.scorers.base import Job, ScorerDeps
from assets.scorers.detection import Detection, DetectionSettings
from resources.llm import ProductionClient, stopped_by_budget

NAN = float("nan")
VALID_ORDER_SEED = 0
"""Seeds the order of the `valid` windows in the judge's prompts (with the latent id)."""


@dataclass
class Judged:
    """An explanation judged on the `valid` windows."""

    explanation: str
    balanced_accuracy: float
    false_positives: list[Example]
    false_negatives: list[Example]
    requests: int
    failure: str = ""
    """Why some windows were not judged (then the score is NaN: a score of part of them is not comparable)."""


@dataclass
class Refined:
    explanation: str
    rounds: list[dict]
    """Rows of `explanation_rounds`: round 0 is the first explanation."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """The explainer's tokens for the revisions (the judge's are in its ledger)."""
    failure: str = ""
    """A budget stop: the latent is failed and refined again next time."""


def round_row(latent: int, number: int, judged: Judged, kept: bool, asked: int = 0) -> dict:
    return {
        "latent": latent,
        "round": number,
        "explanation": judged.explanation,
        "valid_balanced_accuracy": judged.balanced_accuracy,
        "false_positives": len(judged.false_positives),
        "false_negatives": len(judged.false_negatives),
        "kept": kept,
        "requests": judged.requests + asked,
    }


class Refiner:
    """Refines explanations with `judge` (the deployment's judge client) for at most `rounds` rounds."""

    def __init__(self, judge: ProductionClient, rounds: int, max_tokens: int):
        self.judge, self.rounds, self.max_tokens = judge, rounds, max_tokens
        self.detection = Detection(DetectionSettings(), ScorerDeps(llm=judge))

    async def judged(self, record: LatentRecord, explanation: str, valid: list[Example]) -> Judged:
        result = await self.detection.score(
            Job(record, explanation, valid, control=False, seed=record.latent)
        )
        if result.failures:
            return Judged(explanation, NAN, [], [], result.requests, result.failures[0])
        by_index = {e.index: e for e in valid}
        labels, predictions = (
            [r["label"] for r in result.rows],
            [int(r["prediction"]) for r in result.rows],
        )
        wrong = [
            (by_index[r["example"]], r["label"])
            for r, p in zip(result.rows, predictions, strict=False)
            if p != r["label"]
        ]
        return Judged(
            explanation,
            binary_metrics(labels, predictions)["balanced_accuracy"],
            [e for e, label in wrong if label == 0],
            [e for e, label in wrong if label == 1],
            result.requests,
        )

    async def refine(
        self, explainer: Explainer, record: LatentRecord, messages: list[dict], first: str
    ) -> Refined:
        """The best of `first` and its revisions on the `valid` windows, asked as follow-ups to `messages`
        (the explainer's prompt)."""
        valid = record.examples("valid", np.random.default_rng([VALID_ORDER_SEED, record.latent]))
        best = await self.judged(record, first, valid)
        refined = Refined(first, [round_row(record.latent, 0, best, kept=True)])
        tried, client, failure = [], explainer.deps.llm, best.failure
        for number in range(1, self.rounds + 1):
            if (
                failure
                or math.isnan(best.balanced_accuracy)
                or not (best.false_positives or best.false_negatives)
            ):
                break
            shown = interleaved(
                [(True, e.text) for e in best.false_positives],
                [(False, e.marked_text) for e in best.false_negatives],
            )
            answered = [{"role": "assistant", "content": f"Explanation: {best.explanation}"}]
            prompt, _ = client.fitting(
                lambda kept, answered=answered: messages + answered + [refine_message(kept, tried)],
                shown,
                self.max_tokens,
            )
            if prompt is None:
                break
            asked = await client.ask(
                prompt,
                explainer.parse,
                explainer.reask,
                max_tokens=self.max_tokens,
                temperature=0.0,
            )
            refined.prompt_tokens += asked.prompt_tokens
            refined.completion_tokens += asked.completion_tokens
            judged = (
                await self.judged(record, asked.value, valid)
                if asked.value is not None
                else Judged("", NAN, [], [], 0, asked.failure)
            )
            failure = judged.failure
            better = not failure and judged.balanced_accuracy > best.balanced_accuracy
            refined.rounds.append(
                round_row(record.latent, number, judged, kept=better, asked=len(asked.answers))
            )
            if better:
                best = judged
            elif not failure:
                tried.append(judged.explanation)
        refined.explanation = best.explanation
        refined.failure = failure if stopped_by_budget(failure) else ""
        return refined


def interleaved(first: list, second: list) -> list:
    """Items of both lists taken in turn, so a prompt cut to fit the context drops from both alike."""
    out = []
    for i in range(max(len(first), len(second))):
        out += first[i : i + 1] + second[i : i + 1]
    return out
