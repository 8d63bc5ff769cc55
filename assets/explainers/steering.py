"""Steering (TokenChange, Gur-Arieh et al. 2025): the tokens whose probability rises most when the
latent is steered over neutral prompts, at the strength that moves the next-token distributions a
fixed KL from the unsteered ones (searched from the latent's largest activation). Unlike the logit
lens it goes through every layer after the hookpoint."""

import torch
from pydantic import Field

from assets.explainers.base import Explainer, ExplainerSettings
from assets.explainers.logit_lens import TokenEvidence
from assets.prompts import TOKEN_LEGEND, chat, quoted
from assets.records import LatentRecord
from assets.stage_config import SteeringStrength
from resources.steering import NEUTRAL_PROMPTS, Steer, Steerer

TOKEN_CHANGE_SYSTEM = (
    "You study single features of a language model. The feature was turned up while the model read "
    "neutral prompts; you are given the tokens whose probability rose most, with how much it rose on "
    "average. Describe in one short phrase what the feature makes the model write. Answer with a "
    "single line of the form 'Explanation: <phrase>'." + TOKEN_LEGEND
)


def token_change(steerer: Steerer, steer: Steer, prompts: list[str], k: int = 10) -> TokenEvidence:
    """The k tokens whose probability rises most (and falls most) under the steer, averaged over every
    real (unpadded) position of the prompts (TokenChange)."""
    ids, mask = steerer.encode_prompts(prompts)
    clean = torch.softmax(steerer.logits(ids, mask), dim=-1)
    steered = torch.softmax(steerer.logits(ids, mask, [steer]), dim=-1)
    real = mask.bool()
    change = (steered - clean)[real].mean(0)
    up, down = change.topk(k), change.topk(k, largest=False)
    return TokenEvidence(
        list(zip(up.indices.tolist(), up.values.tolist(), strict=False)),
        list(zip(down.indices.tolist(), down.values.tolist(), strict=False)),
    )


def token_change_messages(evidence: TokenEvidence, vocab: list[str]) -> list[dict]:
    listed = "\n".join(
        f"{quoted(vocab[t])}: +{100 * change:.1f} percentage points"
        for t, change in evidence.promoted
        if change > 0
    )
    return chat(
        TOKEN_CHANGE_SYSTEM,
        f"Tokens whose probability rose most:\n{listed or '(none rose)'}\n\n"
        "What does the feature make the model write?",
    )


class SteeringSettings(ExplainerSettings, SteeringStrength):
    prompts: list[str] = Field(
        default_factory=lambda: list(NEUTRAL_PROMPTS),
        min_length=1,
        description="Neutral prompts the latent is steered over.",
    )
    k: int = Field(default=10, ge=1, le=100, description="Tokens shown.")


class Steering(Explainer):
    name = "steering"
    description = (
        "TokenChange: the tokens whose probability rises most when the latent is "
        "steered over neutral prompts."
    )
    Settings = SteeringSettings
    uses = frozenset({"subject_model", "coder"})

    def prompt(self, record: LatentRecord, max_tokens: int):
        unit = float((record.stats or {}).get("max_activation") or 0.0)
        if unit <= 0:
            raise ValueError(
                f"latent {record.latent} has no positive max activation in the exemplars' "
                "profiles, so there is no strength to start from"
            )
        s = self.settings
        steerer = self.deps.subject_model.steerer()
        ((delta, _),) = steerer.strengths_for_kl(
            s.prompts,
            self.deps.coder,
            [record.latent],
            s.target_kl,
            [unit],
            tolerance=s.kl_tolerance,
        )
        evidence = token_change(
            steerer, Steer(self.deps.coder, record.latent, delta), s.prompts, s.k
        )
        messages = token_change_messages(evidence, record.vocab)
        return (messages if self.deps.llm.fits(messages, max_tokens) else None), 0
