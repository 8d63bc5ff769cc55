"""Every sparse-coder format, written by its own library where it installs on CPU, encodes as that library does."""

import json

import numpy as np
import pytest
import torch

from resources.sparse_coders import load_coder_folder, scan_registry
from tests.conftest import save_neurons

D_IN, WIDTH = 16, 64


def dense(code, n_tokens, width=WIDTH) -> torch.Tensor:
    out = torch.zeros(n_tokens, width)
    out[code.rows, code.latents] = code.values
    return out


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_sae_and_transcoder_match_sparsify(tmp_path, transcode):
    from sparsify import SparseCoder as SparsifyCoder
    from sparsify import SparseCoderConfig

    theirs = SparsifyCoder(
        D_IN, SparseCoderConfig(num_latents=WIDTH, k=4, transcode=transcode), device="cpu"
    )
    randomize(theirs)
    theirs.save_to_disk(tmp_path / "c" / "model.layers.1")
    ours = load_coder_folder(tmp_path / "c" / "model.layers.1", "c", "model.layers.1")
    assert ours.reads == ("input" if transcode else "output") and ours.width == WIDTH
    x = torch.randn(40, D_IN)
    with torch.no_grad():
        out = theirs.encode(x)
    expected = torch.zeros(40, WIDTH).scatter_(1, out.top_indices, out.top_acts)
    assert torch.allclose(dense(ours.encode(x), 40), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_saelens_saes_match_saelens(tmp_path, kind):
    import sae_lens

    cls, cfg_cls, extra = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 5}),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
    }[kind]
    theirs = cls(cfg_cls(d_in=D_IN, d_sae=WIDTH, **extra))
    randomize(theirs)
    if kind == "jumprelu":
        with torch.no_grad():
            theirs.threshold.copy_(torch.rand(WIDTH))
    theirs.save_model(str(tmp_path / "s" / "blocks.1.hook_resid_post"))
    ours = load_coder_folder(
        tmp_path / "s" / "blocks.1.hook_resid_post", "s", "blocks.1.hook_resid_post"
    )
    assert ours.source_format == "saelens" and ours.activation == {"standard": "relu"}.get(
        kind, kind
    )
    x = torch.randn(40, D_IN)
    with torch.no_grad():
        expected = theirs.encode(x)
    assert torch.allclose(dense(ours.encode(x), 40), expected, atol=1e-5)


def test_gemmascope_jumprelu_params_npz(tmp_path):
    """GemmaScope ships params.npz with W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, threshold."""
    rng = np.random.default_rng(0)
    params = {
        "W_enc": rng.normal(size=(D_IN, WIDTH)),
        "W_dec": rng.normal(size=(WIDTH, D_IN)),
        "b_enc": rng.normal(size=WIDTH) * 0.1,
        "b_dec": rng.normal(size=D_IN),
        "threshold": rng.random(WIDTH),
    }
    folder = tmp_path / "gemmascope" / "model.layers.1"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in params.items()})
    ours = load_coder_folder(folder, "gemmascope", "model.layers.1")
    x = rng.normal(size=(40, D_IN)).astype(np.float32)
    pre = x @ params["W_enc"] + params["b_enc"]
    expected = np.where(pre > params["threshold"], pre, 0.0)
    assert np.allclose(dense(ours.encode(torch.from_numpy(x)), 40).numpy(), expected, atol=1e-4)


def test_goodfire_pth_is_loaded_weights_only(tmp_path):
    """Goodfire's SAE: encoder_linear (d_in -> d_hidden) + ReLU, decoder_linear (d_hidden -> d_in)."""
    goodfire = torch.nn.Module()
    goodfire.encoder_linear = torch.nn.Linear(D_IN, WIDTH)
    goodfire.decoder_linear = torch.nn.Linear(WIDTH, D_IN)
    randomize(goodfire)
    folder = tmp_path / "goodfire" / "model.layers.1"
    folder.mkdir(parents=True)
    torch.save(goodfire.state_dict(), folder / "Llama-3.3-70B-Instruct-SAE-l50.pth")
    ours = load_coder_folder(folder, "goodfire", "model.layers.1")
    x = torch.randn(40, D_IN)
    with torch.no_grad():
        acts = torch.relu(goodfire.encoder_linear(x))
        assert torch.allclose(dense(ours.encode(x), 40), acts, atol=1e-5)
        code = ours.encode(x)
        assert torch.allclose(ours.decode(code, 40), goodfire.decoder_linear(acts), atol=1e-4)


def test_mlp_neurons_are_the_gated_mlps_post_nonlinearity_activations(tmp_path, subject):
    from resources.subject_model import capture_hookpoints

    lm = subject.causal_lm()
    folder = tmp_path / "neurons" / "model.layers.2.mlp.down_proj"
    save_neurons(folder, d_in=lm.config.intermediate_size, k=8)
    neurons = load_coder_folder(folder, "neurons", "model.layers.2.mlp.down_proj")
    assert neurons.reads == "input" and neurons.width == 1536
    ids = torch.tensor([[1, 504, 2143, 314, 2209]])
    sites = {
        ("model.layers.2.mlp.down_proj", "input"),
        ("model.layers.2.post_attention_layernorm", "output"),
    }
    got = capture_hookpoints(lm, ids, sites)
    mlp = lm.model.layers[2].mlp
    normed = got[("model.layers.2.post_attention_layernorm", "output")]
    with torch.inference_mode():
        expected = mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed)
    acts = got[("model.layers.2.mlp.down_proj", "input")]
    assert torch.allclose(acts, expected, atol=1e-5)
    code = neurons.encode(acts[0])
    top = expected[0].topk(8, dim=-1)
    assert torch.allclose(
        dense(code, 5, 1536),
        torch.zeros(5, 1536).scatter_(1, top.indices, top.values.clamp(min=0)),
        atol=1e-5,
    )


def test_registry_finds_every_format(tmp_path):
    (tmp_path / "a" / "model.layers.1").mkdir(parents=True)
    (tmp_path / "a" / "model.layers.1" / "params.npz").write_bytes(b"")
    (tmp_path / "b" / "model.layers.2").mkdir(parents=True)
    torch.save({}, tmp_path / "b" / "model.layers.2" / "sae.pth")
    save_neurons(tmp_path / "c" / "model.layers.3.mlp.down_proj", d_in=1536)
    (tmp_path / "d" / "model.layers.4").mkdir(parents=True)
    (tmp_path / "d" / "model.layers.4" / "cfg.json").write_text(
        json.dumps({"k": 4})
    )  # weights missing: not a coder yet
    assert scan_registry(tmp_path) == [
        "a/model.layers.1",
        "b/model.layers.2",
        "c/model.layers.3.mlp.down_proj",
    ]
