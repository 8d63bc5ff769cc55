"""Intruder (delphi): no explanation; in each task one marked window of k is not the latent's, and the
judge must find it. Is the latent itself coherent? Its control is the same tasks without an intruder."""

import asyncio

import numpy as np
from pydantic import Field

from assets.prompts import intruder_messages
from assets.records import Example
from assets.score_metrics import NAN
from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings, ask_list, list_tokens


class IntruderSettings(ScorerSettings):
    examples_per_task: int = Field(
        default=5, ge=2, description="Windows per task, one of them the intruder."
    )
    max_tasks: int = Field(
        default=10, ge=1, description="Tasks per latent (delphi: one per non-activating window)."
    )


def intruder_tasks(
    examples: list[Example], k: int, max_tasks: int, rng: np.random.Generator, control: bool
) -> list[tuple[list[Example], int, int]]:
    """(windows, intruder position, quantile) per task: k-1 activating windows of neighbouring quantiles
    (a sliding run over the windows sorted by quantile, so each task is as homogeneous as the test set
    allows) and one non-activating intruder. The control task has no intruder: its last window is the
    next activating one, and a random position is called the intruder, so its accuracy is what a judge
    with no signal gets (chance, plus any position bias). Real and control tasks show the same number
    of windows (fewer than k when the latent has fewer activating windows), so chance is the same."""
    activating = sorted((e for e in examples if e.label), key=lambda e: e.quantile)
    negatives = [e for e in examples if not e.label]
    size = min(k, len(activating))  # windows per task; the control needs them all activating
    if size < 2:
        return []
    needed = size if control else size - 1
    tasks = []
    for t in range(
        min(max_tasks, len(negatives))
    ):  # the control asks as many tasks as the real run
        start = t % (len(activating) - needed + 1)
        chosen = activating[start : start + needed]
        quantile = chosen[len(chosen) // 2].quantile
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
        position = int(rng.integers(0, size))
        if not control:
            chosen.insert(position, negatives[t])
        tasks.append((chosen, position, quantile))
    return tasks


class Intruder(Scorer):
    name = "intruder"
    description = "Intruder (delphi): can the judge find the one window that is not the latent's? No explanation used."
    Settings = IntruderSettings
    uses = frozenset({"llm"})
    control = "no_intruder"
    main_metric = "accuracy"

    async def score(self, job: Job) -> JobResult:
        s, client = self.settings, self.deps.llm
        tasks = intruder_tasks(
            job.examples,
            s.examples_per_task,
            s.max_tasks,
            np.random.default_rng(job.seed),
            job.control,
        )
        result = JobResult([])
        prompts = [intruder_messages([e.marked_text for e in windows]) for windows, _, _ in tasks]
        fits = [
            client.fits(m, list_tokens(1, len(w)))
            for m, (w, _, _) in zip(prompts, tasks, strict=False)
        ]
        result.dropped = sum(
            len(w) for (w, _, _), ok in zip(tasks, fits, strict=False) if not ok
        )  # a task cannot lose windows: it goes whole
        asked = await asyncio.gather(
            *(
                ask_list(client, m, 1, 1, len(w))
                for m, (w, _, _), ok in zip(prompts, tasks, fits, strict=False)
                if ok
            )
        )
        kept = [(i, task) for i, (task, ok) in enumerate(zip(tasks, fits, strict=False)) if ok]
        for (i, (windows, position, quantile)), outcome in zip(kept, asked, strict=False):
            result.prompt_tokens += outcome.prompt_tokens
            if outcome.value is None:
                result.lost(1, outcome.failure)
                continue
            mean_activation = float(np.mean([e.activations.max() for e in windows if e.label]))
            result.rows.append(
                {
                    "example": i,
                    "label": 1,
                    "quantile": quantile,
                    "activation": mean_activation,
                    "prediction": int(outcome.value[0] - 1 == position),
                    "score": NAN,
                }
            )
        return result
