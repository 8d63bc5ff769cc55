"""A subject model the user brings, by local path or by hub id: a tiny random-weight Llama written by
transformers' own `save_pretrained`, an SAE of its width registered with `autointerp register`, and the
deployment's stages run on it, corpus → activations → exemplars → explanations → a scorer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from dagster import DagsterInstance, materialize

from autointerp_defs.cli import main
from autointerp_defs.definitions import definitions_for
from autointerp_defs.deployments import load_deployment
from storage.activations import load_latent_stats
from storage.layout import DataRoot
from tests.conftest import (
    TEST_LATENTS_PER_SHARD,
    TINY_CORPUS_CONFIG,
    TINY_EXEMPLARS_CONFIG,
    add_coders,
)
from tests.scripted_hub_server import ScriptedHub, hub_environment
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt

HIDDEN, WIDTH = 64, 128
CODER = "tiny-llama-topk/layers.1"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama of width 64 with random weights, and a 1,024-token byte-level BPE tokenizer trained by the
    `tokenizers` library on the embedded corpus, both saved as transformers saves any model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from assets.corpus import embedded_documents

    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    bpe.train_from_iterator(
        embedded_documents()[:3000],
        trainers.BpeTrainer(
            vocab_size=1024,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sae_folder(tiny_llama, tmp_path_factory):
    """A TopK SAE trained on the tiny model's layer-1 output (random coders fail the coder_health check), saved in
    sparsify's layout at the sparsify-style hookpoint `layers.1`."""
    from assets.corpus import embedded_documents, tokenize_documents
    from autointerp_defs.demo_sae import train_topk_sae
    from resources.sparse_coders import save_sparsify
    from resources.subject_model import SubjectModelResource, capture_hookpoints

    subject = SubjectModelResource(model=str(tiny_llama))
    tokens = tokenize_documents(
        embedded_documents(),
        subject.tokenizer(),
        ctx_len=64,
        n_tokens=64 * 64,
        add_bos=True,
        seed=7,
    )
    site = ("model.layers.1", "output")
    hidden = capture_hookpoints(subject.causal_lm(), torch.from_numpy(tokens).long(), {site})[site]
    sae = train_topk_sae(
        hidden[:, 1:].flatten(0, 1),
        width=WIDTH,
        k=8,
        name="tiny-llama-topk",
        hookpoint="layers.1",
        epochs=2,
        batch_size=256,
    )
    folder = tmp_path_factory.mktemp("sae")
    save_sparsify(sae, folder / "layers.1")
    return folder


def deployment_on(
    root, model: str, revision: str | None = None, llm_url: str = "http://127.0.0.1:9/v1"
):
    """The local deployment with its subject model set to `model`, as a user's TOML would set it."""
    subject = {"model": model, "batch_size": 8} | ({"revision": revision} if revision else {})
    return load_deployment(
        "local",
        {
            "settings": {
                "data_dir": str(root),
                "max_latents_per_shard": 2,
                "latents_per_shard": TEST_LATENTS_PER_SHARD,
            },
            "subject_model": subject,
            "llm": {"backend": "openai", "base_url": llm_url, "model": "scripted"},
            "corpus": TINY_CORPUS_CONFIG,
            "exemplars": TINY_EXEMPLARS_CONFIG,
            "automated_scorers": ["detection"],
        },
    )


def registered_root(root, sae_folder):
    main(
        [
            "--deployment",
            "local",
            "--data",
            str(root),
            "register",
            str(sae_folder),
            "--hookpoints",
            "layers.1",
            "--name",
            "tiny-llama-topk",
        ]
    )
    return root


def run(deployment, selection, partition=None):
    defs = definitions_for(deployment)
    instance = run.instances.setdefault(deployment.data_dir, DagsterInstance.ephemeral())
    if partition:
        add_coders(instance, deployment.data_dir, CODER)
    return materialize(
        list(defs.assets),
        selection=selection,
        partition_key=partition,
        resources=defs.resources,
        instance=instance,
    )


run.instances = {}


def test_a_local_model_folder_runs_corpus_to_scores(tiny_llama, sae_folder, tmp_path):
    root = registered_root(tmp_path / "data", sae_folder)
    with ScriptedLLMServer(answer_by_prompt) as server:
        deployment = deployment_on(root, str(tiny_llama), llm_url=server.base_url)
        run(deployment, ["corpus"])
        cached = (
            run(deployment, ["activations"], f"{CODER}|00")
            .asset_materializations_for_node("activations")[0]
            .metadata
        )
        done = run(deployment, ["exemplars", "explanations", "scores/detection"], f"{CODER}|00")
    assert done.success
    assert cached["tokens_cached"].value == 48 * 63 and cached["live_latents"].value > 20
    layout = DataRoot.at(root)
    explained = pd.read_parquet(layout.explanations_path(CODER, "00"))
    scored = pd.read_parquet(layout.scores_path(CODER, "00", "detection"))
    assert len(explained) == 2 and set(explained.status) == {"ok"} and len(scored) == 2
    assert scored["accuracy"].between(0, 1).all() and scored["n_failed"].eq(0).all()
    identity = deployment.resources()["subject_model"].identity()
    assert identity.startswith(f"{tiny_llama}@") and identity.endswith(
        "|float32"
    )  # a path is named by its content


def test_a_hub_id_at_a_revision_gives_the_same_activations_as_its_files(
    tiny_llama, sae_folder, tmp_path
):
    with ScriptedHub() as hub, hub_environment(hub.url, tmp_path / "hf_home"):
        commit = hub.add_folder("scripted/tiny-llama", tiny_llama, refs=("main", "v1"))
        by_id = deployment_on(
            registered_root(tmp_path / "by_id", sae_folder), "scripted/tiny-llama", revision="v1"
        )
        for selection, partition in ((["corpus"], None), (["activations"], f"{CODER}|00")):
            run(by_id, selection, partition)
        assert any(
            "/resolve/" in path and path.endswith("model.safetensors")
            for _, path, _ in hub.requests
        )
    by_path = deployment_on(registered_root(tmp_path / "by_path", sae_folder), str(tiny_llama))
    for selection, partition in ((["corpus"], None), (["activations"], f"{CODER}|00")):
        run(by_path, selection, partition)
    assert by_id.resources()["subject_model"].identity() == "scripted/tiny-llama@v1|float32"
    stats = [
        load_latent_stats(
            DataRoot.at(d.data_dir).activations_dir(CODER) / "latent_stats.safetensors"
        )
        for d in (by_id, by_path)
    ]
    assert np.array_equal(stats[0]["count"], stats[1]["count"]) and stats[0]["count"].sum() > 0
    assert commit in {
        p.name
        for p in (
            tmp_path / "hf_home" / "hub" / "models--scripted--tiny-llama" / "snapshots"
        ).iterdir()
    }
