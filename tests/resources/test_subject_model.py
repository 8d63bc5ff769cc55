import pytest
import torch

from resources.hookpoints import UnknownHookpointError, resolve_hookpoint
from resources.subject_model import capture_hookpoints


def test_unknown_hookpoint_lists_close_names_and_fix(subject):
    with pytest.raises(UnknownHookpointError, match=r"'model.layer.15'.*model\.layers\.15.*Fix"):
        resolve_hookpoint(subject.causal_lm(), "model.layer.15")


def test_sparsify_style_names_resolve(subject):
    lm = subject.causal_lm()
    assert resolve_hookpoint(lm, "layers.3") is resolve_hookpoint(lm, "model.layers.3")


def test_forward_stops_after_the_deepest_hookpoint(subject):
    lm = subject.causal_lm()
    ran = []
    handle = lm.model.layers[4].register_forward_hook(lambda *a: ran.append(4))
    head = lm.lm_head.register_forward_hook(lambda *a: ran.append("head"))
    try:
        ids = torch.tensor([[1, 504, 2143, 314]])
        out = capture_hookpoints(
            lm,
            ids,
            {
                ("model.layers.2", "output"),
                ("model.layers.3", "input"),
                ("model.layers.3", "output"),
            },
        )
    finally:
        handle.remove()
        head.remove()
    assert ran == []
    assert out[("model.layers.2", "output")].shape == (1, 4, 576)
    assert torch.equal(
        out[("model.layers.3", "input")], out[("model.layers.2", "output")]
    )  # layer 3 reads layer 2's output
    hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.allclose(out[("model.layers.2", "output")], hidden[3], atol=1e-4)
    assert torch.allclose(out[("model.layers.3", "output")], hidden[4], atol=1e-4)


def test_sparsify_style_names_resolve_in_gpt_neox_too():
    """sparsify names Pythia's layers `layers.N`; GPT-NeoX keeps them under `gpt_neox`, not `model`."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    lm = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
    )
    assert resolve_hookpoint(lm, "layers.1") is lm.gpt_neox.layers[1]
