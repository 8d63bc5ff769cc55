"""Shared fixtures: a tiny but real pipeline on the embedded model (layer 3, a freshly trained TopK SAE)."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_CODER = "tiny-topk/model.layers.3"
TINY_HOOKPOINT = "model.layers.3"


@pytest.fixture(scope="session")
def subject():
    from resources.subject_model import SubjectModelResource

    return SubjectModelResource(batch_size=8)


@pytest.fixture(scope="session")
def tiny_sae(subject):
    """A TopK SAE (width 1152, k 16) trained for one epoch on real layer-3 activations of the embedded corpus."""
    from assets.corpus import embedded_documents, tokenize_documents
    from resources.sae_training import train_topk_sae
    from resources.subject_model import capture_hookpoints

    tokens = tokenize_documents(embedded_documents(), subject.tokenizer(), ctx_len=64, n_tokens=64 * 64, add_bos=True, seed=7)
    hidden = capture_hookpoints(subject.causal_lm(), torch.from_numpy(tokens).long(), {(TINY_HOOKPOINT, "output")})[(TINY_HOOKPOINT, "output")]
    return train_topk_sae(hidden[:, 1:].flatten(0, 1), width=1152, k=16, name="tiny-topk", hookpoint=TINY_HOOKPOINT, epochs=2, batch_size=256)


def make_resources(data_dir: Path, max_latents: int = 2, llm=None):
    from resources.embedder import EmbedderResource
    from resources.llm import LLMResource
    from resources.settings import AutointerpSettings
    from resources.subject_model import SubjectModelResource

    return {
        "settings": AutointerpSettings(data_dir=str(data_dir), max_latents_per_shard=max_latents),
        "subject_model": SubjectModelResource(batch_size=8),
        "llm": llm or LLMResource(max_concurrency=2),
        "embedder": EmbedderResource(),
    }


TINY_CORPUS_CONFIG = {"ctx_len": 64, "n_tokens": 64 * 48, "seed": 0}
TINY_EXEMPLARS_CONFIG = {"n_examples_train": 6, "n_examples_test": 5, "n_non_activating": 5, "example_ctx_len": 16, "min_activating_windows": 6}


@pytest.fixture()
def registered(tmp_path, tiny_sae):
    """A data root whose registry holds the tiny SAE."""
    from resources.sparse_coders import save_sparsify

    save_sparsify(tiny_sae, tmp_path / "registry" / "tiny-topk" / TINY_HOOKPOINT)
    return tmp_path


def in_session(client, job):
    """Run `job()` as the assets do: inside the client's session, so its HTTP connections close on this loop."""
    async def main():
        async with client.session():
            return await job()

    return asyncio.run(main())
