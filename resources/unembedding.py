"""What a latent writes: the vocabulary tokens its decoder direction promotes and suppresses when read
straight through the subject model's final norm scale and unembedding (the logit lens applied to
decoder rows; VocabProj in Gur-Arieh et al. 2025). One function, used by the latent browser and by
the `logit_lens` explainer, so both show the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from storage.atomic import atomic_path


@dataclass
class VocabProjection:
    """Per direction, the k token ids with the highest and the lowest logit, and those logits."""

    top_ids: torch.Tensor  # [n, k]
    top_values: torch.Tensor  # [n, k]
    bottom_ids: torch.Tensor  # [n, k], most suppressed first
    bottom_values: torch.Tensor  # [n, k]
    histograms: list[tuple[list[int], list[float]]] | None = (
        None  # per direction (counts, edges) of its logits over the vocabulary
    )


def final_norm_scale(lm: torch.nn.Module) -> torch.Tensor | None:
    """The elementwise weight of the norm right before the unembedding (RMSNorm/LayerNorm), if any.
    Its normalization only rescales a direction, which ranks nothing differently; its weight does."""
    base = getattr(lm, "model", None) or getattr(lm, "transformer", None)
    for name in ("norm", "final_layernorm", "ln_f"):
        norm = getattr(base, name, None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            return norm.weight.detach().float()
    return None


def save_unembedding(lm: torch.nn.Module, path: Path) -> None:
    """`lm`'s unembedding and final norm scale, what `vocab_logits` reads of it, to a safetensors file: the
    browser then never loads the whole model for its logit lens."""
    from safetensors.torch import save_file

    tensors = {"unembedding": lm.get_output_embeddings().weight.detach().float().cpu().contiguous()}
    scale = final_norm_scale(lm)
    if scale is not None:
        tensors["norm_scale"] = scale.cpu().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


class Unembedding:
    """What `save_unembedding` wrote, read back; quacks like a causal LM as far as `vocab_logits` looks:
    `get_output_embeddings().weight` and `model.norm.weight` (plain holders: a `torch.nn.Linear` would first
    fill its 50k x 576 weight with random numbers, 0.7 s)."""

    def __init__(self, path: Path):
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        self._head = SimpleNamespace(weight=tensors["unembedding"])
        norm_scale = tensors.get("norm_scale")
        self.model = (
            SimpleNamespace(norm=SimpleNamespace(weight=norm_scale))
            if norm_scale is not None
            else SimpleNamespace()
        )

    def get_output_embeddings(self):
        return self._head


def vocab_logits(directions: torch.Tensor, lm: torch.nn.Module) -> torch.Tensor:
    """Logits `[n, vocab]` of each `[n, d_model]` direction read through the final norm scale and the unembedding."""
    unembedding = lm.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    scale = final_norm_scale(lm)
    block = directions.detach().float().to(unembedding.device)
    return (block * scale if scale is not None else block) @ unembedding.T


def vocab_projection(
    directions: torch.Tensor, lm: torch.nn.Module, k: int = 10, batch: int = 256, bins: int = 0
) -> VocabProjection:
    """Logits of each `[n, d_model]` direction over the vocabulary, reduced to the top and bottom k, and with
    `bins` the histogram of all its logits (as `np.histogram` bins them: Neuronpedia's logit density)."""
    import numpy as np

    parts, histograms = [], []
    for start in range(0, len(directions), batch):
        logits = vocab_logits(directions[start : start + batch], lm)
        top = logits.topk(k, dim=1)
        bottom = logits.topk(k, dim=1, largest=False)
        parts.append(
            (top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), bottom.values.cpu())
        )
        for row in logits.cpu().numpy() if bins else ():
            counts, edges = np.histogram(row, bins=bins)
            histograms.append((counts.tolist(), edges.round(4).tolist()))
    if not parts:
        empty = torch.zeros((0, k))
        return VocabProjection(empty.long(), empty, empty.long(), empty, [] if bins else None)
    return VocabProjection(
        *(torch.cat([p[i] for p in parts]) for i in range(4)), histograms if bins else None
    )
