"""Steering through nnsight on the embedded model: reads equal the cache, a zero edit changes nothing,
the steered write is the Goodfire edit, and the `steer` command shows it (the output-side methods
built on it are tested in tests/assets/test_output_side.py)."""

import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from assets.activations import cache_activations
from assets.corpus import CorpusConfig, build_corpus
from autointerp_defs.cli import main
from resources.sparse_coders import SparseCoder, load_registered, save_sparsify
from resources.steering import Steer, SteeringError, max_activation, steered_value
from resources.subject_model import SubjectModelResource
from storage.activations import load_latent_stats, read_shard, shard_keys
from storage.layout import DataRoot
from tests.conftest import TEST_LATENTS_PER_SHARD, TINY_CODER, TINY_CORPUS_CONFIG, TINY_HOOKPOINT


@pytest.fixture(scope="module")
def steerer(subject):
    return subject.steerer()


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_sae, subject):
    """A data root with the tiny SAE's activations cached by the default (transformers-hook) path."""
    root = DataRoot.at(tmp_path_factory.mktemp("cached"))
    save_sparsify(tiny_sae, root.registry_dir / "tiny-topk" / TINY_HOOKPOINT)
    build_corpus(CorpusConfig(**TINY_CORPUS_CONFIG), subject.tokenizer(), root)
    cache_activations(
        [load_registered(root.registry_dir, TINY_CODER)],
        subject,
        root,
        latents_per_shard=TEST_LATENTS_PER_SHARD,
    )
    return root


def test_reading_through_nnsight_gives_the_cached_activations(cached, steerer, tiny_sae, tmp_path):
    """The nnsight driver caches exactly what the hook path cached; a direct nnsight read, encoded,
    is the cache's pairs."""
    other = DataRoot.at(tmp_path)
    shutil.copytree(cached.registry_dir, other.registry_dir)
    shutil.copytree(cached.corpus_dir, other.corpus_dir)
    cache_activations(
        [load_registered(other.registry_dir, TINY_CODER)],
        SubjectModelResource(batch_size=8, driver="nnsight"),
        other,
        latents_per_shard=TEST_LATENTS_PER_SHARD,
    )
    for shard in shard_keys(8):
        hooks, traced = (
            read_shard(cached.activations_dir(TINY_CODER), shard),
            read_shard(other.activations_dir(TINY_CODER), shard),
        )
        assert np.array_equal(hooks.locations, traced.locations) and np.array_equal(
            hooks.activations, traced.activations
        )

    tokens = load_file(str(cached.corpus_dir / "tokens.safetensors"))["tokens"].long()[:4]
    hidden = steerer.read(tokens, {(TINY_HOOKPOINT, "output")})[(TINY_HOOKPOINT, "output")][
        :, 1:
    ]  # BOS is not cached
    code = tiny_sae.encode(hidden.reshape(-1, hidden.shape[-1]).float())
    read = {
        (int(r) // 63, int(r) % 63 + 1, int(latent)): float(v)
        for r, latent, v in zip(code.rows, code.latents, code.values, strict=False)
    }
    pairs = [read_shard(cached.activations_dir(TINY_CODER), s) for s in shard_keys(8)]
    stored = {
        tuple(map(int, loc)): float(v)
        for p in pairs
        for loc, v in zip(p.locations, p.activations, strict=False)
        if loc[0] < 4
    }
    assert read.keys() == stored.keys() and len(stored) == 4 * 63 * 16
    assert max(abs(read[k] - stored[k]) for k in stored) < 1e-5

    stats = load_latent_stats(cached.activations_dir(TINY_CODER) / "latent_stats.safetensors")
    live = int(np.argmax(stats["max"]))
    assert max_activation(cached.activations_dir(TINY_CODER), live) == pytest.approx(
        float(stats["max"][live])
    )
    dead = np.flatnonzero(stats["count"] == 0)
    if len(dead):
        with pytest.raises(SteeringError, match="never fired"):
            max_activation(cached.activations_dir(TINY_CODER), int(dead[0]))


def coders_at_layer_3(tiny_sae):
    transcoder = SparseCoder(
        "tiny-tc",
        "model.layers.3.mlp",
        "topk",
        576,
        tiny_sae.width,
        tiny_sae.encoder_weight,
        tiny_sae.encoder_bias,
        tiny_sae.decoder_weight,
        torch.zeros(576),
        k=16,
        transcode=True,
    )
    neurons = SparseCoder(
        "tiny-neurons", "model.layers.3.mlp.down_proj", "neurons", 1536, 1536, k=16
    )
    return {"sae": tiny_sae, "transcoder": transcoder, "neurons": neurons}


@pytest.mark.parametrize("kind", ["sae", "transcoder", "neurons"])
def test_a_zero_edit_leaves_the_logits_unchanged(steerer, subject, tiny_sae, kind):
    """decode(f + 0) + (x - decode(f)) is x: the error term goes back in, as the Goodfire card says."""
    coder = coders_at_layer_3(tiny_sae)[kind]
    ids, mask = steerer.encode_prompts(["The cat sat on the mat and looked", "Hello"])
    with torch.inference_mode():
        bare = subject.causal_lm()(input_ids=ids, attention_mask=mask).logits.float()
    zero = steerer.logits(ids, mask, [Steer(coder, 7, 0.0)])
    assert torch.allclose(zero, bare, rtol=1e-5, atol=1e-3), (zero - bare).abs().max()
    moved = steerer.logits(ids, mask, [Steer(coder, 7, 20.0)])
    assert (moved - bare).abs().max() > 1.0  # the same path with an edit does steer


@pytest.mark.parametrize("kind", ["sae", "transcoder", "neurons"])
def test_skipping_the_layers_below_the_steered_one_changes_no_logit(steerer, tiny_sae, kind):
    """The strength search runs the layers below the steered one once (`Steerer.below`) and each try
    from there up: the logits are those of the full pass, for every steer of the batch."""
    coder = coders_at_layer_3(tiny_sae)[kind]
    ids, mask = steerer.encode_prompts(["The cat sat on the mat and looked", "Hello"])
    steers = [Steer(coder, 7, 20.0), Steer(coder, 9, -5.0), Steer(coder, 7, 0.0)]
    below = steerer.below(ids, mask, coder)
    assert below is not None and below[0] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    full = steerer.logits(ids.repeat(3, 1), mask.repeat(3, 1), steers)
    skipped = steerer.logits(ids.repeat(3, 1), mask.repeat(3, 1), steers, below=below)
    assert torch.allclose(skipped, full, rtol=1e-5, atol=1e-4), (skipped - full).abs().max()
    assert (full[:2] - full[4:]).abs().max() > 1.0  # the blocks do differ


@pytest.mark.parametrize("transcode", [False, True])
def test_the_steered_write_is_the_goodfire_edit_without_encoding(transcode):
    """write + delta W_dec[latent] is decode(f + delta e) + (write - decode(f)), f = encode(read), for
    any read (a transcoder reads its module's input); here the edit written out densely by hand."""
    gen = torch.Generator().manual_seed(0)
    d_in, width, latent, delta = 16, 32, 5, 3.5
    coder = SparseCoder(
        "random",
        "model.layers.3",
        "topk",
        d_in,
        width,
        torch.randn(width, d_in, generator=gen),
        torch.randn(width, generator=gen),
        torch.randn(width, d_in, generator=gen),
        torch.randn(d_in, generator=gen),
        k=4,
        transcode=transcode,
    )
    read, write = torch.randn(2, 7, d_in, generator=gen), torch.randn(2, 7, d_in, generator=gen)
    code = coder.encode((read if transcode else write).reshape(-1, d_in))
    f = torch.zeros(14, width)
    f[code.rows, code.latents] = code.values
    edited = f.clone()
    edited[:, latent] += delta
    goodfire = (edited @ coder.decoder_weight + coder.decoder_bias) + (
        write.reshape(-1, d_in) - (f @ coder.decoder_weight + coder.decoder_bias)
    )
    assert torch.allclose(
        steered_value(coder, latent, delta, write), goodfire.reshape(write.shape), atol=1e-5
    )
    assert steered_value(coder, latent, delta, write.bfloat16()).dtype == torch.bfloat16
    per_row = steered_value(
        coder, torch.tensor([latent, 9]), torch.tensor([delta, -1.5]), write
    )  # a batch of steers: one per row
    assert torch.equal(per_row[0], steered_value(coder, latent, delta, write)[0]) and torch.equal(
        per_row[1], steered_value(coder, 9, -1.5, write)[1]
    )


def test_the_steer_command_prints_both_continuations(cached, capsys):
    stats = load_latent_stats(cached.activations_dir(TINY_CODER) / "latent_stats.safetensors")
    latent = int(np.argmax(stats["count"]))
    main(
        [
            "--data",
            str(cached.root),
            "steer",
            TINY_CODER,
            str(latent),
            "The weather today is",
            "--strength",
            "3",
            "--tokens",
            "6",
        ]
    )
    out = capsys.readouterr().out
    assert f"+3 × max cached activation {float(stats['max'][latent]):.4g}" in out
    assert re.search(r"^unsteered +\| steered$", out, re.MULTILINE)
    with pytest.raises(SystemExit, match="is not a latent of coder"):
        main(["--data", str(cached.root), "steer", TINY_CODER, "99999", "x", "--absolute"])
