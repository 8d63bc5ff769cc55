"""Surprisal (delphi): how much the explanation, as a prefix, lowers the subject model's loss on a
window; activating windows should gain more than the others (ROC AUC)."""

import asyncio
import threading

import numpy as np
import torch
from pydantic import Field

from assets.prompts import SURPRISAL_DESCRIPTION, SURPRISAL_NO_DESCRIPTION
from assets.records import Example
from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings, example_row


class SurprisalSettings(ScorerSettings):
    batch_size: int = Field(
        default=16, ge=1, description="Windows per forward pass of the subject model."
    )


class Surprisal(Scorer):
    name = "surprisal"
    description = (
        "Surprisal (delphi): how much more the explanation lowers the subject model's "
        "loss on activating windows (ROC AUC)."
    )
    Settings = SurprisalSettings
    uses = frozenset({"subject_model"})
    main_metric = "roc_auc"
    scores_senses = True

    def __init__(self, settings, deps):
        super().__init__(settings, deps)
        # One job at a time: the other job of this latent may be computing the same baselines, torch
        # already uses every core, and loading the model from two threads breaks its lazy initialization.
        self._lock = threading.Lock()
        self._baseline: dict[tuple[int, ...], float] = {}
        """Loss without an explanation, per window: shared by a latent's own and control jobs."""

    def _losses(self, prefix: str, examples: list[Example]) -> np.ndarray:
        """Mean next-token loss of each window's tokens after `prefix`, from the subject model."""
        tokenizer, lm = self.deps.subject_model.tokenizer(), self.deps.subject_model.causal_lm()
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        out = []
        for i in range(0, len(examples), self.settings.batch_size):
            batch = examples[i : i + self.settings.batch_size]
            length = len(prefix_ids) + max(len(e.token_ids) for e in batch)
            ids = torch.zeros((len(batch), length), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, e in enumerate(batch):
                sequence = prefix_ids + e.token_ids
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            with torch.inference_mode():
                logits = (
                    lm(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
                    .logits.float()
                    .cpu()
                )
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
            )
            scored = mask[:, 1:].bool()
            scored[:, : len(prefix_ids) - 1] = False  # only the window's own tokens count
            out += [float(nll[r][scored[r]].mean()) for r in range(len(batch))]
        return np.asarray(out)

    async def score(self, job: Job) -> JobResult:
        def compute():
            with self._lock:
                missing = [e for e in job.examples if tuple(e.token_ids) not in self._baseline]
                if missing:
                    without = SURPRISAL_DESCRIPTION.format(explanation=SURPRISAL_NO_DESCRIPTION)
                    self._baseline.update(
                        zip(
                            (tuple(e.token_ids) for e in missing),
                            self._losses(without, missing),
                            strict=False,
                        )
                    )
                return self._losses(
                    SURPRISAL_DESCRIPTION.format(explanation=job.explanation), job.examples
                )

        informed = await asyncio.to_thread(compute)
        return JobResult(
            [
                example_row(e, score=self._baseline[tuple(e.token_ids)] - float(i))
                for e, i in zip(job.examples, informed, strict=False)
            ]
        )
