"""What a latent writes, as evidence for an explainer (Gur-Arieh et al. 2025, output-centric descriptions).

- VocabProj (`vocab_proj_evidence`): the tokens the latent's decoder direction promotes and
  suppresses when read through the final norm and the unembedding (`resources/logit_lens.py`).
- TokenChange (`token_change`): the tokens whose probability rises most when the latent is steered,
  averaged over every position of neutral prompts. Unlike VocabProj it goes through the layers
  after the hookpoint, so it sees what the model makes of the direction.

Each has its explainer prompt here; the answer is read with the same strict parser as every
other explanation (`assets/prompts.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from assets.prompts import TOKEN_LEGEND, quoted
from resources.logit_lens import vocab_projection
from resources.sparse_coders import SparseCoder
from resources.steering import Steer, Steerer
from resources.subject_model import resolve_hookpoint

LOGIT_LENS_SYSTEM = (
    "You study single features of a language model. You are given the vocabulary tokens whose "
    "likelihood the feature raises most when it is active, and those whose likelihood it lowers most, "
    "read straight from the feature's direction. Describe in one short phrase what the feature makes "
    "the model write (the raised tokens matter most). Answer with a single line of the form "
    "'Explanation: <phrase>'."
    + TOKEN_LEGEND
)

TOKEN_CHANGE_SYSTEM = (
    "You study single features of a language model. The feature was turned up while the model read "
    "neutral prompts; you are given the tokens whose probability rose most, with how much it rose on "
    "average. Describe in one short phrase what the feature makes the model write. Answer with a "
    "single line of the form 'Explanation: <phrase>'."
    + TOKEN_LEGEND
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
        raise ValueError(f"Coder '{coder.key}' has no decoder, so what its latents write is unknown. Fix: use an SAE, a transcoder or neurons.")
    return coder.decoder_weight[latents].detach().float()


def vocab_proj_evidence(coder: SparseCoder, lm: torch.nn.Module, latents: list[int], k: int = 10) -> dict[int, TokenEvidence]:
    """Per latent, the k tokens its decoder direction promotes most and suppresses most (VocabProj)."""
    projection = vocab_projection(decoder_directions(coder, lm, latents), lm, k=k)
    return {
        latent: TokenEvidence(list(zip(projection.top_ids[i].tolist(), projection.top_values[i].tolist())),
                              list(zip(projection.bottom_ids[i].tolist(), projection.bottom_values[i].tolist())))
        for i, latent in enumerate(latents)
    }


def token_change(steerer: Steerer, steer: Steer, prompts: list[str], k: int = 10) -> TokenEvidence:
    """The k tokens whose probability rises most (and falls most) under the steer, averaged over every
    real (unpadded) position of the prompts (TokenChange)."""
    ids, mask = steerer.encode_prompts(prompts)
    clean = torch.softmax(steerer.logits(ids, mask), dim=-1)
    steered = torch.softmax(steerer.logits(ids, mask, steer), dim=-1)
    real = mask.bool()
    change = (steered - clean)[real].mean(0)
    up, down = change.topk(k), change.topk(k, largest=False)
    return TokenEvidence(list(zip(up.indices.tolist(), up.values.tolist())), list(zip(down.indices.tolist(), down.values.tolist())))


def logit_lens_messages(evidence: TokenEvidence, vocab: list[str]) -> list[dict]:
    promoted = ", ".join(quoted(vocab[t]) for t, _ in evidence.promoted)
    suppressed = ", ".join(quoted(vocab[t]) for t, _ in evidence.suppressed)
    return [{"role": "system", "content": LOGIT_LENS_SYSTEM},
            {"role": "user", "content": f"Raised most: {promoted}\nLowered most: {suppressed}\n\nWhat does the feature make the model write?"}]


def token_change_messages(evidence: TokenEvidence, vocab: list[str]) -> list[dict]:
    listed = "\n".join(f"{quoted(vocab[t])}: +{100 * change:.1f} percentage points" for t, change in evidence.promoted if change > 0)
    return [{"role": "system", "content": TOKEN_CHANGE_SYSTEM},
            {"role": "user", "content": f"Tokens whose probability rose most:\n{listed or '(none rose)'}\n\nWhat does the feature make the model write?"}]
