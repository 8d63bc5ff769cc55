import json

import pytest
import torch

from resources.sparse_coders import (
    CoderShapeError,
    RegistryError,
    load_registered,
    save_sparsify,
    scan_registry,
)
from tests.conftest import random_coder


def test_sparsify_layout_round_trip(tmp_path):
    coder = random_coder()
    save_sparsify(coder, tmp_path / "rand" / "model.layers.1")
    cfg = json.loads((tmp_path / "rand" / "model.layers.1" / "cfg.json").read_text())
    assert (
        cfg["k"] == 4
        and cfg["num_latents"] == 64
        and cfg["d_in"] == 16
        and cfg["activation"] == "topk"
    )
    assert scan_registry(tmp_path) == ["rand/model.layers.1"]
    loaded = load_registered(tmp_path, "rand/model.layers.1")
    assert torch.equal(loaded.encoder_weight, coder.encoder_weight) and loaded.k == 4


def test_topk_encode_matches_dense_reference_across_chunks(monkeypatch):
    import resources.sparse_coders as sc

    monkeypatch.setattr(sc, "ENCODE_CHUNK_TOKENS", 7)
    coder = random_coder()
    x = torch.randn(50, 16)
    code = coder.encode(x)
    dense = torch.relu((x - coder.decoder_bias) @ coder.encoder_weight.T + coder.encoder_bias)
    ref = dense.topk(4, dim=-1)
    expected = torch.zeros_like(dense).scatter_(1, ref.indices, ref.values)
    got = torch.zeros_like(dense)
    got[code.rows, code.latents] = code.values
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(
        coder.decode(code, 50), expected @ coder.decoder_weight + coder.decoder_bias, atol=1e-4
    )


def test_width_mismatch_names_coder_hookpoint_and_fix():
    with pytest.raises(
        CoderShapeError,
        match=r"'rand/model.layers.1' expects inputs of width 16.*gives width 576.*Fix",
    ):
        random_coder().check_input_width(576, "embedded")


def test_missing_registry_names_directory_and_fix(tmp_path):
    with pytest.raises(
        RegistryError, match=r"nowhere does not exist\. Fix: run `autointerp register-embedded`"
    ):
        scan_registry(tmp_path / "nowhere")
