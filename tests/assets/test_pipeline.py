"""Every asset materialized for one partition on the embedded defaults, and the bad inputs that must stop it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance

from autointerp_defs.deployments import load_deployment
from storage.activations import load_latent_stats, read_shard, shard_keys
from storage.layout import DataRoot
from tests.conftest import (
    TINY_CODER,
    TINY_CORPUS_CONFIG,
    TINY_EXEMPLARS_CONFIG,
    add_coders,
    all_assets,
    make_resources,
    run,
)

ALL_ASSETS = all_assets()
E2E_SCORERS = (
    *load_deployment("local").automated_scorers,
    "surprisal",
)  # the local deployment's automated scorers, and surprisal (cheap on tiny data)
CPU_SCORER_KEYS = [f"scores/{name}" for name in E2E_SCORERS]


def corpus_config():
    return {"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}}


@pytest.mark.slow(70)
def test_every_asset_for_one_partition_end_to_end(registered):
    """Over a minute: the one test on the embedded defaults end to end, the explainer and judge included, which
    generate on the CPU through llama.cpp; the other stage tests ask a scripted endpoint."""
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    resources = make_resources(registered, max_latents=2)
    root = DataRoot.at(registered)

    run(["corpus"], None, resources, instance, corpus_config())
    cached = run(["activations"], f"{TINY_CODER}|00", resources, instance)
    meta = cached.asset_materializations_for_node("activations")[0].metadata
    assert meta["tokens_cached"].value == 48 * 63  # BOS positions are not cached
    assert meta["live_latents"].value > 100
    assert 0 < meta["fvu"].value < 1
    assert cached.get_asset_check_evaluations()[0].passed

    stats = load_latent_stats(root.activations_dir(TINY_CODER) / "latent_stats.safetensors")
    pairs = [read_shard(root.activations_dir(TINY_CODER), key) for key in shard_keys(8)]
    latents = np.concatenate([p.locations[:, 2] for p in pairs])
    assert np.array_equal(np.bincount(latents, minlength=1152), stats["count"])
    assert len(latents) <= 48 * 63 * 16

    partition = f"{TINY_CODER}|00"
    result = run(
        ["exemplars", "explanations", *CPU_SCORER_KEYS],
        partition,
        resources,
        instance,
        {"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}},
    )
    ex = pd.read_parquet(root.exemplars_path(TINY_CODER, "00"))
    assert set(ex.kind) == {"activating", "random", "neighbour", "embedding"}
    stats = pd.read_parquet(root.latent_profiles_path(TINY_CODER, "00"))
    assert set(stats.latent) == set(ex.latent) and len(stats.neighbours.iloc[0]) == 10
    for _, group in ex.groupby("latent"):
        train = set(
            zip(
                group[group.split == "train"].sequence,
                group[group.split == "train"].start,
                strict=False,
            )
        )
        test = set(
            zip(
                group[group.split == "test"].sequence,
                group[group.split == "test"].start,
                strict=False,
            )
        )
        assert train and test and not train & test  # disjoint
        assert (group[group.kind != "activating"]["max_activation"] == 0).all()
        assert (group[group.kind == "activating"]["max_activation"] > 0).all()

    explained = pd.read_parquet(root.explanations_path(TINY_CODER, "00"))
    assert len(explained) == 2 and set(explained.status) <= {"ok", "failed"}
    n_ok = int((explained.status == "ok").sum())
    assert n_ok >= 1  # the embedded explainer answers in a parseable form at temperature 0
    for name in E2E_SCORERS:
        scored = pd.read_parquet(root.scores_path(TINY_CODER, "00", name))
        examples = pd.read_parquet(root.scored_examples_path(TINY_CODER, "00", name))
        meta = result.asset_materializations_for_node(f"scores__{name}")[0].metadata
        assert len(scored) == n_ok and meta["latents_scored"].value == n_ok
        # a control needs another latent with a different explanation: how many have one depends
        # on what the model answered
        with_control = int((scored.control_note == "").sum())
        distinct = (
            explained[explained.status == "ok"]
            .explanation.map(lambda text: " ".join(text.casefold().split()))
            .nunique()
        )
        assert with_control == (n_ok if distinct == 2 else 0)
        assert meta["verdict"].value.startswith("cannot tell: "), (
            name
        )  # 2 latents at most: an interval too wide to tell
        if n_ok:
            assert {
                "accuracy",
                "balanced_accuracy",
                "precision",
                "recall",
                "f1",
                "roc_auc",
                "pearson",
                "tp",
                "fp",
                "tn",
                "fn",
                "gap",
            } <= set(scored.columns)
            assert {f"control_{m}" for m in ("accuracy", "balanced_accuracy", "roc_auc")} <= set(
                scored.columns
            )
            assert (
                "data:image/png;base64," in meta["histogram"].value
                and "data:image/png;base64," in meta["quantile_accuracy"].value
            )
            assert "Best" in meta["best_and_worst"].value
            # each latent judged on all 10 held-out windows with its explanation, and again with
            # the control's where it has one
            assert len(examples) + scored.n_failed.sum() == 10 * (n_ok + with_control)
            if not scored.n_failed.sum():
                assert set(examples.source) == (
                    {"explanation", "control"} if with_control else {"explanation"}
                )
    if n_ok:
        for name in ("surprisal", "embedding"):  # scores without an LLM answer: always an AUC
            assert (
                pd.read_parquet(root.scores_path(TINY_CODER, "00", name))
                .roc_auc.between(0, 1)
                .all()
            )

    summary = run(["score_summary"], None, resources, instance)
    table = pd.read_parquet(root.score_summary_path(TINY_CODER))
    assert len(table) == n_ok
    if n_ok:
        assert set(E2E_SCORERS) <= set(table.columns) and {
            f"{n}_control" for n in E2E_SCORERS
        } <= set(table.columns)
        summary_meta = summary.asset_materializations_for_node("score_summary")[0].metadata
        assert set(summary_meta["scorers"].value.split(", ")) == set(E2E_SCORERS)
        assert "data:image/png;base64," in summary_meta["histograms"].value


def test_unknown_hookpoint_stops_activations_with_the_fix(registered, tiny_sae):
    from resources.sparse_coders import save_sparsify

    save_sparsify(tiny_sae, registered / "registry" / "tiny-topk" / "model.layer.3")
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, "tiny-topk/model.layer.3")
    resources = make_resources(registered)
    run(["corpus"], None, resources, instance, corpus_config())
    with pytest.raises(Exception, match=r"Unknown hookpoint 'model.layer.3'.*Fix"):
        run(["activations"], "tiny-topk/model.layer.3|00", resources, instance)


def test_coder_of_the_wrong_width_stops_activations(registered, tiny_sae):
    from resources.sparse_coders import SparseCoder, save_sparsify

    narrow = SparseCoder(
        "narrow",
        "model.layers.3",
        "topk",
        d_in=512,
        width=tiny_sae.width,
        encoder_weight=tiny_sae.encoder_weight[:, :512],
        encoder_bias=tiny_sae.encoder_bias,
        decoder_weight=tiny_sae.decoder_weight[:, :512],
        decoder_bias=tiny_sae.decoder_bias[:512],
        k=8,
    )
    save_sparsify(narrow, registered / "registry" / "narrow" / "model.layers.3")
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, "narrow/model.layers.3")
    resources = make_resources(registered)
    run(["corpus"], None, resources, instance, corpus_config())
    with pytest.raises(Exception, match=r"expects inputs of width 512.*gives width 576"):
        run(["activations"], "narrow/model.layers.3|00", resources, instance)


def test_missing_registry_stops_activations(tmp_path):
    instance = DagsterInstance.ephemeral()
    add_coders(instance, tmp_path, TINY_CODER)
    with pytest.raises(Exception, match=r"registry directory .* does not exist\. Fix"):
        run(["activations"], f"{TINY_CODER}|00", make_resources(tmp_path), instance)


def test_unreachable_llm_endpoint_stops_explanations(registered):
    from autointerp_defs.ui import free_port
    from resources.llm import LLMResource

    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    resources = make_resources(registered)
    run(["corpus"], None, resources, instance, corpus_config())
    run(["activations"], f"{TINY_CODER}|00", resources, instance)
    run(
        ["exemplars"],
        f"{TINY_CODER}|00",
        resources,
        instance,
        {"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}},
    )
    dead = LLMResource(backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1", model="m")
    with pytest.raises(
        Exception, match=r"Cannot reach the LLM endpoint at http://127\.0\.0\.1.*Fix"
    ):
        run(["explanations"], f"{TINY_CODER}|00", make_resources(registered, llm=dead), instance)
