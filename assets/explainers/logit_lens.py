"""Logit lens (VocabProj, Gur-Arieh et al. 2025): the tokens the latent's decoder direction promotes and
suppresses through the final norm and the unembedding (`resources/unembedding.py`). Describes what the
latent writes, not what it reads; no exemplar is shown."""

from dataclasses import dataclass

import torch
from pydantic import Field

from assets.explainers.base import Explainer, ExplainerSettings
from assets.prompts import TOKEN_LEGEND, chat, quoted
from assets.records import LatentRecord
from resources.hookpoints import resolve_hookpoint
from resources.sparse_coders import SparseCoder
from resources.unembedding import vocab_projection

LOGIT_LENS_SYSTEM = (
    "You study single features of a language model. You are given the vocabulary tokens whose "
    "likelihood the feature raises most when it is active, and those whose likelihood it lowers most, "
    "read straight from the feature's direction. Describe in one short phrase what the feature makes "
    "the model write (the raised tokens matter most). Answer with a single line of the form "
    "'Explanation: <phrase>'." + TOKEN_LEGEND
)


@dataclass
class TokenEvidence:
    """Token ids with a value each (logit, or change of probability), strongest first."""

    promoted: list[tuple[int, float]]
    suppressed: list[tuple[int, float]]


def decoder_directions(coder: SparseCoder, lm: torch.nn.Module, latents: list[int]) -> torch.Tensor:
    """What each latent adds to the residual stream per unit of activation: its decoder row, or for
    MLP neurons the matching column of `down_proj`."""
    if coder.activation == "neurons":
        weight = resolve_hookpoint(lm, coder.hookpoint).weight  # [d_model, d_mlp]
        return weight[:, latents].T.detach().float()
    if coder.decoder_weight is None:
        raise ValueError(
            f"Coder '{coder.key}' has no decoder, so what its latents write is unknown. "
            "Fix: use an SAE, a transcoder or neurons."
        )
    return coder.decoder_weight[latents].detach().float()


def vocab_proj_evidence(
    coder: SparseCoder, lm: torch.nn.Module, latents: list[int], k: int = 10
) -> dict[int, TokenEvidence]:
    """Per latent, the k tokens its decoder direction promotes most and suppresses most (VocabProj)."""
    projection = vocab_projection(decoder_directions(coder, lm, latents), lm, k=k)
    return {
        latent: TokenEvidence(
            list(
                zip(projection.top_ids[i].tolist(), projection.top_values[i].tolist(), strict=False)
            ),
            list(
                zip(
                    projection.bottom_ids[i].tolist(),
                    projection.bottom_values[i].tolist(),
                    strict=False,
                )
            ),
        )
        for i, latent in enumerate(latents)
    }


def logit_lens_messages(evidence: TokenEvidence, vocab: list[str]) -> list[dict]:
    promoted = ", ".join(quoted(vocab[t]) for t, _ in evidence.promoted)
    suppressed = ", ".join(quoted(vocab[t]) for t, _ in evidence.suppressed)
    return chat(
        LOGIT_LENS_SYSTEM,
        f"Raised most: {promoted}\nLowered most: {suppressed}\n\n"
        "What does the feature make the model write?",
    )


class LogitLensSettings(ExplainerSettings):
    k: int = Field(
        default=10, ge=1, le=100, description="Tokens shown on each side (promoted, suppressed)."
    )


class LogitLens(Explainer):
    name = "logit_lens"
    description = (
        "VocabProj: the tokens the latent's decoder direction promotes and suppresses "
        "through the unembedding."
    )
    Settings = LogitLensSettings
    uses = frozenset({"subject_model", "coder"})

    def prompt(self, record: LatentRecord, max_tokens: int):
        evidence = vocab_proj_evidence(
            self.deps.coder, self.deps.subject_model.causal_lm(), [record.latent], self.settings.k
        )[record.latent]
        messages = logit_lens_messages(evidence, record.vocab)
        return (messages if self.deps.llm.fits(messages, max_tokens) else None), 0
