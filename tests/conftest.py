"""Shared fixtures: a tiny but real pipeline on the embedded model (layer 3, a freshly trained TopK SAE)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_CODER = "tiny-topk/model.layers.3"
TEST_LATENTS_PER_SHARD = 144
"""The tiny coder's 1152 latents in 8 shards, as tests have always cut it."""
TINY_HOOKPOINT = "model.layers.3"


def root_network() -> dict[str, list[str]]:
    """This machine's own addresses, routes and links (`ip -o`), to show the tests left them as they were."""

    def listed(*what: str) -> list[str]:
        """The lines `ip -o` prints, less the lifetimes that count down on their own."""
        lines = subprocess.run(
            ["ip", "-o", *what], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        return sorted(
            re.sub(r"\s+(valid_lft|preferred_lft|expires)\s+\S+", "", line) for line in lines
        )

    return {
        "addresses": listed("addr"),
        "routes": listed("route", "show", "table", "all"),
        "links": [line.split("\\")[0] for line in listed("link")],
    }


def pytest_configure(config):
    """Under pytest-xdist, torch computes on one thread in each worker and in the processes its tests start
    (OMP_NUM_THREADS): with several workers on two cores, threads of one matrix product wait for each other while
    the other core is busy (test_output_side.py on a busy machine: 81 s of CPU on one thread, 178 s on two)."""
    if hasattr(config, "workerinput"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: whole modules to each worker, in collection order), the modules that hold a
    test marked `slow(seconds)` come first, the longest first, so that no minutes-long test starts last."""
    if not hasattr(config, "workerinput"):
        return
    longest = {}
    for item in items:
        marker = item.get_closest_marker("slow")
        longest[item.path] = max(longest.get(item.path, 0), marker.args[0] if marker else 0)
    items.sort(key=lambda item: -longest[item.path])


@pytest.fixture(scope="session", autouse=True)
def this_machine_s_network_as_it_was():
    """Fails the session (an error at the last test's teardown) where any test left an address, route or link on
    this machine's own network: the cluster tests' services and nodes live in namespaces of their own. Under
    pytest-xdist each worker checks from its own start to its own end; no test may change that network at any
    time, so another worker's tests running meanwhile leave the comparison as true as in one process."""
    before = root_network() if shutil.which("ip") else None
    yield
    if before is not None:
        assert root_network() == before, (
            "a test changed this machine's own network (ip -o addr / route / link)"
        )


@pytest.fixture(scope="session")
def subject():
    from resources.subject_model import SubjectModelResource

    return SubjectModelResource(batch_size=8)


@pytest.fixture(scope="session")
def tiny_sae(request, tmp_path_factory, subject):
    return made_once(request.config, tmp_path_factory, "tiny_sae", lambda: train_tiny_sae(subject))


def made_once(config, tmp_path_factory, name: str, make):
    """`make()` once per test session, even when pytest-xdist's workers (`make test`) each run the session's
    fixtures: the first worker saves it (torch.save) in the folder the workers' temporary folders share, the
    others load it from there."""
    if not hasattr(config, "workerinput"):  # one process
        return make()
    path = tmp_path_factory.getbasetemp().parent / f"{name}.pt"
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.exists():
            torch.save(make(), f"{path}.part")
            os.replace(f"{path}.part", path)
        return torch.load(path, weights_only=False)


def train_tiny_sae(subject, width: int = 1152, n_tokens: int = 64 * 64):
    """A TopK SAE (width 1152, k 16) trained for two epochs on real layer-3 activations of the embedded corpus
    (`bench/cluster.py` trains a wider one on more tokens)."""
    from assets.corpus import embedded_documents, tokenize_documents
    from autointerp_defs.demo_sae import train_topk_sae
    from resources.subject_model import capture_hookpoints

    tokens = tokenize_documents(
        embedded_documents(),
        subject.tokenizer(),
        ctx_len=64,
        n_tokens=n_tokens,
        add_bos=True,
        seed=7,
    )
    hidden = torch.cat(
        [
            capture_hookpoints(
                subject.causal_lm(),
                torch.from_numpy(tokens[i : i + 64]).long(),
                {(TINY_HOOKPOINT, "output")},
            )[(TINY_HOOKPOINT, "output")]
            for i in range(0, len(tokens), 64)
        ]
    )
    return train_topk_sae(
        hidden[:, 1:].flatten(0, 1),
        width=width,
        k=16,
        name="tiny-topk",
        hookpoint=TINY_HOOKPOINT,
        epochs=2,
        batch_size=256,
    )


def make_resources(data_dir: Path, max_latents: int = 2, llm=None):
    from resources.embedder import EmbedderResource
    from resources.llm import LLMResource
    from resources.settings import AutointerpSettings
    from resources.subject_model import SubjectModelResource

    return {
        "settings": AutointerpSettings(
            data_dir=str(data_dir),
            max_latents_per_shard=max_latents,
            latents_per_shard=TEST_LATENTS_PER_SHARD,
        ),
        "subject_model": SubjectModelResource(batch_size=8),
        "llm": llm or LLMResource(max_concurrency=2),
        "embedder": EmbedderResource(),
    }


TINY_CORPUS_CONFIG = {"ctx_len": 64, "n_tokens": 64 * 48, "seed": 0}
TINY_EXEMPLARS_CONFIG = {
    "n_examples_train": 6,
    "n_examples_test": 5,
    "n_non_activating": 5,
    "example_ctx_len": 16,
    "min_activating_windows": 6,
}


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


# ---- helpers shared by test modules (imported as `from tests.conftest import ...`) ----------------


def all_assets():
    """The local deployment's assets, built once."""
    global _ALL_ASSETS
    if _ALL_ASSETS is None:
        from autointerp_defs.definitions import build_definitions

        _ALL_ASSETS = list(build_definitions("local").assets)
    return _ALL_ASSETS


_ALL_ASSETS = None


def run(selection, partition, resources, instance, run_config=None):
    from dagster import materialize

    return materialize(
        all_assets(),
        selection=selection,
        partition_key=partition,
        resources=resources,
        instance=instance,
        run_config=run_config or {},
        raise_on_error=True,
    )


def llm_resource(server, **kwargs):
    """An `openai`-backend LLM resource pointed at a scripted server."""
    from resources.llm import LLMResource

    return LLMResource(backend="openai", base_url=server.base_url, model="m", **kwargs)


def two_shards_of_scores(folder):
    """Scores of coder `c/h`: shard 00 has two latents with a control, shard 01 one latent without (alone in its shard).
    Latent 2 is explained as two senses ("e2a or e2b"), each scored by detection (0.7, 0.3) and only the first by
    embedding; latent 1 keeps the senses of an explanation since replaced."""
    import numpy as np
    import pandas as pd

    from assets.scorers import SCORERS
    from storage.layout import DataRoot

    root = DataRoot.at(folder)

    def text(latent):
        return "e2a or e2b" if latent == 2 else f"e{latent}"

    frames = {
        ("00", "detection"): ([1, 2], [0.9, 0.6], [0.5, 0.5]),
        ("01", "detection"): ([700], [0.8], [np.nan]),
        ("00", "embedding"): ([1, 2], [0.7, 0.4], [0.6, 0.5]),
    }
    for (shard, name), (latents, score, control) in frames.items():
        main = SCORERS[name].main_metric
        path = root.scores_path("c/h", shard, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(
            {
                "latent": latents,
                "explanation": [text(latent) for latent in latents],
                main: score,
                f"control_{main}": control,
                "gap": np.subtract(score, control),
            }
        ).to_parquet(path)
        explanations = root.explanations_path(
            "c/h", shard
        )  # the texts the scores were made with: none is stale
        explanations.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(
            {"latent": latents, "explanation": [text(latent) for latent in latents], "status": "ok"}
        ).to_parquet(explanations)
    pd.DataFrame(
        {
            "latent": [2, 2, 1, 1],
            "sense": [0, 1, 0, 1],
            "explanation": ["e2a", "e2b", "an older sense", "another"],
        }
    ).to_parquet(root.explanation_senses_path("c/h", "00"))
    for name, scores in (("detection", [0.7, 0.3]), ("embedding", [0.8])):
        main = SCORERS[name].main_metric
        pd.DataFrame(
            {
                "latent": 2,
                "sense": [0, 1][: len(scores)],
                "explanation": ["e2a", "e2b"][: len(scores)],
                main: scores,
            }
        ).to_parquet(root.sense_scores_path("c/h", "00", name))
    return root


def pipeline_until_exemplars(root: Path, instance):
    from dagster import materialize

    resources = make_resources(root, max_latents=3)
    materialize(
        all_assets(),
        selection=["corpus"],
        resources=resources,
        instance=instance,
        run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
    )
    materialize(
        all_assets(),
        selection=["activations"],
        partition_key=f"{TINY_CODER}|00",
        resources=resources,
        instance=instance,
    )
    materialize(
        all_assets(),
        selection=["exemplars"],
        partition_key=f"{TINY_CODER}|00",
        resources=resources,
        instance=instance,
        run_config={"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}},
    )


def random_coder(width=64, d_in=16, k=4, seed=0):
    from resources.sparse_coders import SparseCoder

    g = torch.Generator().manual_seed(seed)
    return SparseCoder(
        "rand",
        "model.layers.1",
        "topk",
        d_in=d_in,
        width=width,
        encoder_weight=torch.randn(width, d_in, generator=g),
        encoder_bias=torch.randn(width, generator=g) * 0.1,
        decoder_weight=torch.randn(width, d_in, generator=g),
        decoder_bias=torch.randn(d_in, generator=g),
        k=k,
        subtract_decoder_bias=True,
    )


def add_coders(instance, root, *coders: str) -> list[str]:
    """Add the shard partitions of registered coders, as the registry sensor does; a coder whose
    width cannot be read (a broken one, on purpose) gets one shard. Returns the keys added."""
    from assets.partitions import shard_partition_keys
    from resources.sparse_coders import registered_width

    keys = []
    for coder in coders:
        try:
            width = registered_width(Path(root) / "registry", coder)
        except Exception:
            width = TEST_LATENTS_PER_SHARD
        keys += shard_partition_keys(coder, width, TEST_LATENTS_PER_SHARD)
    instance.add_dynamic_partitions("shard", keys)
    return keys


def save_neurons(folder: Path, d_in: int, k: int = 32) -> None:
    """Register the MLP neurons read at `folder`'s hookpoint (a gated MLP's `down_proj`) as a coder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(
        json.dumps({"format": "neurons", "d_in": d_in, "k": k}, indent=2)
    )


def open_engines() -> list[tuple]:
    """The keys of the engines this process holds now (`resources/engines.py`)."""
    from resources import engines

    with engines._LOCK:
        return list(engines._ENGINES)


def build_exemplars(shard_acts, tokens, config, sources, stats, n_tokens):
    """(exemplar windows, per-latent statistics) of every latent of a shard, in memory: the exemplars
    stage's batches (`assets.exemplars.exemplar_batches`) joined."""
    import pandas as pd

    from assets.exemplars import exemplar_batches
    from storage.tables import TABLES

    batches = list(exemplar_batches(shard_acts, tokens, config, sources, stats, n_tokens))
    frames, profiles = [b[0] for b in batches], [b[1] for b in batches]
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=TABLES["exemplars"].columns),
        pd.concat(profiles, ignore_index=True) if profiles else pd.DataFrame(),
    )
