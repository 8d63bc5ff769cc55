"""Train a small TopK SAE on cached residual activations: the embedded demo coder.

A plain TopK autoencoder (Gao et al. 2024): decoder rows kept at unit norm, encoder initialised as
the decoder's transpose, decoder bias at the data mean, and an AuxK loss on the top dead latents so
that few latents die on small corpora.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from resources.sparse_coders import SparseCoder


@contextmanager
def deterministic_kernels():
    """torch's deterministic kernels while it lasts, then the caller's setting again: with the default ones
    some backward passes add up in a varying order, so one seed trained a different demo coder each run (and
    the demo explained other latents than the run that was checked)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train_topk_sae(
    activations: torch.Tensor,
    *,
    width: int,
    k: int,
    name: str,
    hookpoint: str,
    epochs: int = 4,
    batch_size: int = 1024,
    lr: float = 2e-3,
    seed: int = 0,
    progress=None,
) -> SparseCoder:
    """Fit a TopK SAE to `activations` `[n, d_in]` and return it (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    x_all = activations.float()
    n, d_in = x_all.shape
    decoder = torch.randn(width, d_in, generator=gen)
    decoder /= decoder.norm(dim=1, keepdim=True)
    params = {
        "W_dec": decoder.clone().requires_grad_(),
        "W_enc": decoder.clone().requires_grad_(),
        "b_enc": torch.zeros(width, requires_grad=True),
        "b_dec": x_all.mean(0).clone().requires_grad_(),
    }
    opt = torch.optim.Adam(params.values(), lr=lr)
    variance = (x_all - x_all.mean(0)).pow(2).sum(-1).mean()
    steps_since_fired = torch.zeros(width)
    aux_k = min(d_in // 2, width // 2)
    total = epochs * ((n + batch_size - 1) // batch_size)
    step = 0
    with deterministic_kernels():
        for _ in range(epochs):
            for batch in x_all[torch.randperm(n, generator=gen)].split(batch_size):
                pre = torch.relu((batch - params["b_dec"]) @ params["W_enc"].T + params["b_enc"])
                top = pre.topk(k, dim=-1)
                recon = (
                    torch.einsum("tk,tkd->td", top.values, params["W_dec"][top.indices])
                    + params["b_dec"]
                )
                residual = batch - recon
                loss = residual.pow(2).sum(-1).mean() / variance

                fired = torch.zeros(width, dtype=torch.bool)
                fired[top.indices.flatten()] = True
                steps_since_fired = torch.where(
                    fired, torch.zeros_like(steps_since_fired), steps_since_fired + 1
                )
                dead = steps_since_fired > 50
                if dead.any():
                    dead_pre = pre.masked_fill(~dead, 0.0)
                    aux = dead_pre.topk(min(aux_k, int(dead.sum())), dim=-1)
                    aux_recon = torch.einsum("tk,tkd->td", aux.values, params["W_dec"][aux.indices])
                    loss = (
                        loss + (residual.detach() - aux_recon).pow(2).sum(-1).mean() / variance / 32
                    )

                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
                step += 1
                if progress is not None:
                    progress(step, total, float(loss))
    return SparseCoder(
        name,
        hookpoint,
        "topk",
        d_in=d_in,
        width=width,
        encoder_weight=params["W_enc"].detach().clone(),
        encoder_bias=params["b_enc"].detach().clone(),
        decoder_weight=params["W_dec"].detach().clone(),
        decoder_bias=params["b_dec"].detach().clone(),
        k=k,
        subtract_decoder_bias=True,
    )
