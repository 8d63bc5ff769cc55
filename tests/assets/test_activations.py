"""The activation cache: one pass for many coders, resumable after a real kill, loud on broken coders."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from dagster import DagsterInstance, materialize

from assets.activations import cache_activations
from assets.corpus import CorpusConfig, build_corpus
from resources.sparse_coders import load_registered, save_sparsify
from resources.unembedding import Unembedding
from storage.activations import (
    DECODER_DIRECTIONS_FILE,
    load_decoder_directions,
    load_latent_stats,
    read_shard,
    shard_keys,
)
from storage.atomic import read_json
from storage.layout import DataRoot
from tests.conftest import (
    TEST_LATENTS_PER_SHARD,
    TINY_CODER,
    TINY_CORPUS_CONFIG,
    add_coders,
    all_assets,
    make_resources,
    save_neurons,
)

ALL_ASSETS = all_assets()

NEURONS = "tiny-neurons/model.layers.2.mlp.down_proj"


def same_cache(a: DataRoot, b: DataRoot, coder: str) -> None:
    for key in shard_keys(8):
        left, right = (
            read_shard(a.activations_dir(coder), key),
            read_shard(b.activations_dir(coder), key),
        )
        assert np.array_equal(left.locations, right.locations)
        assert np.array_equal(left.activations, right.activations)
    sa, sb = (
        load_latent_stats(r.activations_dir(coder) / "latent_stats.safetensors") for r in (a, b)
    )
    assert all(np.array_equal(sa[k], sb[k]) for k in ("count", "max")) and np.allclose(
        sa["sum"], sb["sum"]
    )


def test_one_run_one_pass_for_several_coders(registered, subject):
    save_neurons(
        registered / "registry" / "tiny-neurons" / "model.layers.2.mlp.down_proj", d_in=1536, k=8
    )
    instance = DagsterInstance.ephemeral()
    keys = add_coders(instance, registered, TINY_CODER, NEURONS)
    resources = make_resources(registered)
    materialize(
        ALL_ASSETS,
        selection=["corpus"],
        resources=resources,
        instance=instance,
        run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
    )
    both = materialize(
        ALL_ASSETS,
        selection=["activations"],
        resources=resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )  # Dagster's documented range tags
    assert both.success
    assert set(
        instance.get_materialized_partitions(
            both.asset_materializations_for_node("activations")[0].asset_key
        )
    ) == set(keys)
    root = DataRoot.at(registered)
    for coder in (TINY_CODER, NEURONS):
        assert (
            read_json(root.activations_dir(coder) / "meta.json")["sequences_forwarded_this_run"]
            == 48
        )  # one pass, shared
    neuron_meta = read_json(root.activations_dir(NEURONS) / "meta.json")
    assert neuron_meta["mean_l0"] <= 8 and neuron_meta["fvu"] is None
    # what the latent browser's first page reads, written while the coder and the model are loaded
    sae_meta = read_json(root.activations_dir(TINY_CODER) / "meta.json")
    assert sae_meta["decoder_directions"] is True and neuron_meta["decoder_directions"] is False
    assert np.array_equal(
        load_decoder_directions(root.activations_dir(TINY_CODER)),
        load_registered(root.registry_dir, TINY_CODER).decoder_directions().numpy(),
    )
    assert not (root.activations_dir(NEURONS) / DECODER_DIRECTIONS_FILE).exists()
    lens = Unembedding(
        root.unembedding_path(subject.tokenizer_identity())
    )  # named by the weights it came from
    assert torch.equal(
        lens.get_output_embeddings().weight,
        subject.causal_lm().get_output_embeddings().weight.detach().float(),
    )

    alone = DataRoot.at(registered / "alone")
    shutil.copytree(registered / "registry", alone.registry_dir)
    shutil.copytree(root.corpus_dir, alone.corpus_dir)
    cache_activations(
        [load_registered(alone.registry_dir, TINY_CODER)],
        subject,
        alone,
        latents_per_shard=TEST_LATENTS_PER_SHARD,
    )
    same_cache(root, alone, TINY_CODER)


def test_killed_run_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_run(
    registered, subject
):
    root = DataRoot.at(registered)
    build_corpus(CorpusConfig(ctx_len=64, n_tokens=64 * 240, seed=5), subject.tokenizer(), root)
    # the killed run forwards batches of the size the resumed and the fresh runs use (the fixture's 8): on
    # CPUs with AVX-512 a forward's last float bits depend on the batch size, not only on the tokens
    deployment = registered / "deployment.toml"  # the shard size is a deployment setting
    deployment.write_text(f"[settings]\nlatents_per_shard = {TEST_LATENTS_PER_SHARD}\n")
    command = [
        sys.executable,
        "-m",
        "autointerp_defs.cli",
        "--deployment",
        str(deployment),
        "--data",
        str(registered),
        "cache",
        TINY_CODER,
        "--batch-size",
        "8",
        "--checkpoint-entries",
        "900",
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    progress_path = root.activations_dir(TINY_CODER) / "progress.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if progress_path.exists() and read_json(progress_path)["checkpoints"] >= 5:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert not (root.activations_dir(TINY_CODER) / "meta.json").exists()
    resumed_from = read_json(progress_path)["next_sequence"]
    assert 0 < resumed_from < 240

    resumed = cache_activations(
        [load_registered(root.registry_dir, TINY_CODER)],
        subject,
        root,
        checkpoint_entries=900,
        latents_per_shard=TEST_LATENTS_PER_SHARD,
    )[TINY_CODER]
    assert (
        resumed["sequences_forwarded_this_run"] == 240 - resumed_from
    )  # cached sequences are not re-run

    fresh = DataRoot.at(registered / "fresh")
    shutil.copytree(root.registry_dir, fresh.registry_dir)
    shutil.copytree(root.corpus_dir, fresh.corpus_dir)
    whole = cache_activations(
        [load_registered(fresh.registry_dir, TINY_CODER)],
        subject,
        fresh,
        latents_per_shard=TEST_LATENTS_PER_SHARD,
    )[TINY_CODER]
    assert whole["sequences_forwarded_this_run"] == 240
    same_cache(root, fresh, TINY_CODER)
    assert resumed["tokens"] == whole["tokens"] and resumed["fvu"] == pytest.approx(whole["fvu"])


KILL_BETWEEN_STATS_AND_PROGRESS = """
import os, signal, sys
import assets.activations as activations
from resources.sparse_coders import load_registered
from resources.subject_model import SubjectModelResource
from storage.layout import DataRoot

real_write_progress, commits = activations.write_progress, []

def write_progress(directory, progress):
    commits.append(directory)
    # checkpoint 3's chunks and statistics are on disk; its progress.json never will be
    if len(commits) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    real_write_progress(directory, progress)

activations.write_progress = write_progress
root = DataRoot.at(sys.argv[1])
activations.cache_activations(
    [load_registered(root.registry_dir, sys.argv[2])],
    SubjectModelResource(batch_size=8),
    root,
    checkpoint_entries=900,
    latents_per_shard=144,
)
"""


def test_a_kill_between_the_statistics_and_progress_writes_does_not_count_sequences_twice(
    registered, subject
):
    root = DataRoot.at(registered)
    build_corpus(CorpusConfig(ctx_len=64, n_tokens=64 * 64, seed=5), subject.tokenizer(), root)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_BETWEEN_STATS_AND_PROGRESS, str(registered), TINY_CODER],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    progress = read_json(root.activations_dir(TINY_CODER) / "progress.json")
    assert progress["checkpoints"] == 2  # the third checkpoint was written but never committed

    cache_activations(
        [load_registered(root.registry_dir, TINY_CODER)],
        subject,
        root,
        checkpoint_entries=900,
        latents_per_shard=TEST_LATENTS_PER_SHARD,
    )
    fresh = DataRoot.at(registered / "fresh")
    shutil.copytree(root.registry_dir, fresh.registry_dir)
    shutil.copytree(root.corpus_dir, fresh.corpus_dir)
    cache_activations(
        [load_registered(fresh.registry_dir, TINY_CODER)],
        subject,
        fresh,
        latents_per_shard=TEST_LATENTS_PER_SHARD,
    )
    same_cache(root, fresh, TINY_CODER)
    resumed, whole = (
        load_latent_stats(r.activations_dir(TINY_CODER) / "latent_stats.safetensors")
        for r in (root, fresh)
    )
    assert int(resumed["tokens"][0]) == int(whole["tokens"][0]) == 64 * 63


@pytest.mark.parametrize("breakage, problem", [("dead", "all latents are dead"), ("fvu", "FVU")])
def test_broken_coder_fails_the_health_check(registered, tiny_sae, breakage, problem):
    broken = dataclasses.replace(tiny_sae, name="broken")
    if breakage == "dead":
        broken.encoder_bias = torch.full_like(tiny_sae.encoder_bias, -1e6)
    else:
        broken.decoder_bias = tiny_sae.decoder_bias + 1e3
    save_sparsify(broken, registered / "registry" / "broken" / "model.layers.3")
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, "broken/model.layers.3")
    resources = make_resources(registered)
    materialize(
        ALL_ASSETS,
        selection=["corpus"],
        resources=resources,
        instance=instance,
        run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
    )
    result = materialize(
        ALL_ASSETS,
        selection=["activations"],
        partition_key="broken/model.layers.3|00",
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )
    check = result.get_asset_check_evaluations()[0]
    assert (
        not check.passed and check.severity.value == "ERROR" and not result.success
    )  # the check blocks the run
    assert problem in check.metadata["broken/model.layers.3"].value
    # and nothing is built on the broken coder, whoever asks
    with pytest.raises(
        Exception,
        match=rf"Coder broken/model.layers.3 is broken \({problem}.*Fix: replace the coder",
    ):
        materialize(
            ALL_ASSETS,
            selection=["exemplars"],
            partition_key="broken/model.layers.3|00",
            resources=resources,
            instance=instance,
        )


def test_a_second_cache_of_the_same_coder_stops_at_once_with_the_holder(registered, subject):
    root = DataRoot.at(registered)
    # work enough for the first to be still caching when the second, starting on a busy machine (other tests
    # beside it under pytest-xdist), asks for the lock: the first is killed as soon as the second has stopped
    build_corpus(CorpusConfig(ctx_len=64, n_tokens=64 * 960, seed=5), subject.tokenizer(), root)
    deployment = registered / "deployment.toml"  # the shard size is a deployment setting
    deployment.write_text(f"[settings]\nlatents_per_shard = {TEST_LATENTS_PER_SHARD}\n")
    command = [
        sys.executable,
        "-m",
        "autointerp_defs.cli",
        "--deployment",
        str(deployment),
        "--data",
        str(registered),
        "cache",
        TINY_CODER,
        "--batch-size",
        "8",
        "--checkpoint-entries",
        "900",
    ]
    first = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        progress_path = root.activations_dir(TINY_CODER) / "progress.json"
        deadline = time.time() + 240
        while not progress_path.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-2000:]
        started = time.time()
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and time.time() - started < 60
        last_line = second.stderr.strip().splitlines()[-1]
        assert (
            f"Caching the activations of {TINY_CODER} is already running in process {first.pid}. Fix: wait"
            in last_line
        )
        assert "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)


def test_another_subject_model_never_reuses_the_cached_activations(registered, subject):
    """The cache names the model that made it: a model with the same tokenizer (here the same weights in
    another dtype) re-caches instead of silently reusing another model's activations."""
    from resources.subject_model import SubjectModelResource

    root = DataRoot.at(registered)
    build_corpus(CorpusConfig(**TINY_CORPUS_CONFIG), subject.tokenizer(), root)
    coder = load_registered(root.registry_dir, TINY_CODER)
    first = cache_activations([coder], subject, root, latents_per_shard=TEST_LATENTS_PER_SHARD)[
        TINY_CODER
    ]
    assert first["subject_model"] == subject.identity()
    said = []
    again = cache_activations(
        [coder], subject, root, latents_per_shard=TEST_LATENTS_PER_SHARD, log=said.append
    )[TINY_CODER]
    assert any("reusing it" in line for line in said) and again == first  # the same model: reused
    other = SubjectModelResource(batch_size=8, dtype="bfloat16")
    said.clear()
    second = cache_activations(
        [coder], other, root, latents_per_shard=TEST_LATENTS_PER_SHARD, log=said.append
    )[TINY_CODER]
    assert not any("reusing it" in line for line in said)
    assert (
        second["subject_model"] == other.identity() != first["subject_model"]
        and second["sequences_forwarded_this_run"] == 48
    )
