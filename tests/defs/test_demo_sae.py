"""The embedded demo coder is trained on this machine by `make demo`: the same seed must give the same coder,
so the demo a user runs picks the latents, windows and explanations that the demo checked here did."""

import torch

from autointerp_defs.demo_sae import train_topk_sae


def test_the_same_seed_trains_the_same_coder():
    activations = torch.randn(8192, 128, generator=torch.Generator().manual_seed(3))
    coders = [
        train_topk_sae(activations, width=1024, k=16, name="t", hookpoint="h", epochs=2)
        for _ in range(3)
    ]
    for other in coders[1:]:
        assert torch.equal(other.decoder_weight, coders[0].decoder_weight) and torch.equal(
            other.encoder_weight, coders[0].encoder_weight
        )
    assert (
        not torch.are_deterministic_algorithms_enabled()
    )  # the setting is the training's own, not left on for the caller
