"""Kill every stage with SIGKILL at several points, run it again, and compare with an uninterrupted run.

A data root with a small corpus and a random TopK coder is built once. Each stage then runs in its
own process, as a user's run would: `autointerp cache` (the real command line) for the activation
cache, and a Dagster materialization for exemplars, explanations and detection scores (the LLM is a
scripted OpenAI-compatible server on 127.0.0.1, answering deterministically after a short delay, so
LLM stages take long enough to be killed in the middle). For each stage, a reference run on a copy
of the data root gives the expected results; then the stage is started and killed as many times as
asked, at even shares of its work (the cache's checkpoints, the LLM stages' requests; exemplars,
which write once, at shares of the reference's time), and finally run to the end; its results must
equal the reference exactly. Prints a JSON object as its last line.

    .venv/bin/python bench/kill_campaign.py [--kills 3] [--stages cache,exemplars,explanations,scores]
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CODER = (
    "random-topk/model.layers.3"  # trained briefly: a random coder fails the health check (FVU > 1)
)
PARTITION = f"{CODER}|00"
WIDTH = 1152
STAGES = ("cache", "exemplars", "explanations", "scores")
ASSET = {"exemplars": "exemplars", "explanations": "explanations", "scores": "scores/detection"}


def judge(messages):
    """Deterministic answers: an explanation named after the prompt, labels alternating."""
    user = messages[1]["content"]
    if "Description:" not in user:
        return f"Explanation: pattern {sum(map(ord, user)) % 997}"
    return str([i % 2 for i in range(user.count("\nExample "))])


def prepare(data: Path) -> None:
    """A corpus of 96 sequences of 64 tokens and a TopK coder (width 1152, k 16) trained briefly at layer 3."""
    import torch

    from assets.corpus import CorpusConfig, build_corpus
    from autointerp_defs.demo_sae import train_topk_sae
    from resources.sparse_coders import save_sparsify
    from resources.subject_model import SubjectModelResource, capture_hookpoints
    from storage.corpus import load_corpus
    from storage.layout import DataRoot

    root, subject = DataRoot.at(data), SubjectModelResource(batch_size=8)
    build_corpus(CorpusConfig(ctx_len=64, n_tokens=64 * 96, seed=3), subject.tokenizer(), root)
    tokens = torch.from_numpy(load_corpus(root).tokens[:48]).long()
    hidden = capture_hookpoints(subject.causal_lm(), tokens, {("model.layers.3", "output")})[
        ("model.layers.3", "output")
    ]
    coder = train_topk_sae(
        hidden[:, 1:].flatten(0, 1),
        width=WIDTH,
        k=16,
        name="random-topk",
        hookpoint="model.layers.3",
        epochs=2,
        batch_size=256,
    )
    save_sparsify(coder, root.registry_dir / "random-topk" / "model.layers.3")


def materialize_stage(stage: str, data: str, url: str) -> None:
    """One Dagster materialization of `stage` on `data` (this is what each killed process runs)."""
    from dagster import DagsterInstance, materialize

    from assets.partitions import DEFAULT_LATENTS_PER_SHARD, shard_partition_keys
    from autointerp_defs.definitions import build_definitions
    from resources.embedder import EmbedderResource
    from resources.llm import LLMResource
    from resources.settings import AutointerpSettings
    from resources.subject_model import SubjectModelResource

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(
        "shard", shard_partition_keys(CODER, WIDTH, DEFAULT_LATENTS_PER_SHARD)
    )
    resources = {
        "settings": AutointerpSettings(data_dir=data, max_latents_per_shard=24),
        "subject_model": SubjectModelResource(batch_size=8),
        "llm": LLMResource(backend="openai", base_url=url, model="scripted", max_concurrency=4),
        "embedder": EmbedderResource(),
    }
    config = (
        {
            "ops": {
                "exemplars": {
                    "config": {
                        "n_examples_train": 6,
                        "n_examples_test": 5,
                        "n_non_activating": 5,
                        "example_ctx_len": 16,
                        "min_activating_windows": 6,
                        "non_activating_sources": ["random"],
                    }
                }
            }
        }
        if stage == "exemplars"
        else {}
    )
    materialize(
        list(build_definitions("local").assets),
        selection=[ASSET[stage]],
        partition_key=PARTITION,
        resources=resources,
        instance=instance,
        run_config=config,
        raise_on_error=True,
    )


def command(stage: str, data: Path, url: str) -> list[str]:
    if stage == "cache":
        return [
            sys.executable,
            "-m",
            "autointerp_defs.cli",
            "--data",
            str(data),
            "cache",
            CODER,
            "--batch-size",
            "8",
            "--checkpoint-entries",
            "2000",
        ]
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--run-stage",
        stage,
        "--data",
        str(data),
        "--url",
        url,
    ]


def results(stage: str, data: Path) -> dict:
    """What a stage produced, as comparable values."""
    from assets.partitions import DEFAULT_LATENTS_PER_SHARD
    from storage.activations import (
        LATENT_STATS_FILE,
        load_latent_stats,
        read_shard,
        shard_count,
        shard_keys,
    )
    from storage.layout import DataRoot

    root = DataRoot.at(data)
    if stage == "cache":
        acts = root.activations_dir(CODER)
        out = {
            f"shard {k}": (
                read_shard(acts, k).locations.tolist(),
                read_shard(acts, k).activations.tolist(),
            )
            for k in shard_keys(shard_count(WIDTH, DEFAULT_LATENTS_PER_SHARD))
        }
        stats = load_latent_stats(acts / LATENT_STATS_FILE)
        return out | {f"stats {k}": np.asarray(v).tolist() for k, v in stats.items()}
    path = {
        "exemplars": root.exemplars_path(CODER, "00"),
        "explanations": root.explanations_path(CODER, "00"),
        "scores": root.scores_path(CODER, "00", "detection"),
    }[stage]
    return {"table": pd.read_parquet(path).to_json(orient="records", double_precision=15)}


def run_to_end(stage: str, data: Path, url: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        command(stage, data, url), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(f"{stage} failed: {done.stderr[-3000:]}")
    return time.perf_counter() - started


def killed_when(stage: str, data: Path, url: str, ready, timeout_s: float) -> bool:
    """Start the stage and SIGKILL it as soon as `ready()` holds (or after `timeout_s`); False if it
    finished first."""
    proc = subprocess.Popen(
        command(stage, data, url),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def reached(target: float, count, *args):
    """A `ready` for `killed_when`: holds once `count(*args)` is at least `target`, which is fixed
    now, when the kill is planned."""
    return lambda: count(*args) >= target


def checkpoints(data: Path) -> int:
    from storage.atomic import read_json
    from storage.layout import DataRoot

    progress = DataRoot.at(data).activations_dir(CODER) / "progress.json"
    try:
        return read_json(progress)["checkpoints"]
    except (OSError, ValueError, KeyError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kills", type=int, default=3, help="kills per stage, spread over its run time"
    )
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--run-stage", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_stage:
        return materialize_stage(args.run_stage, args.data, args.url)

    from tests.scripted_llm_server import ScriptedLLMServer

    stages = [s for s in args.stages.split(",") if s]
    report = {"stages": {}, "kills": 0}
    with tempfile.TemporaryDirectory() as work, ScriptedLLMServer(judge, delay_s=0.4) as server:
        base = Path(work) / "base"
        prepare(base)
        # every stage up to the last one asked for runs; the asked ones are killed
        for stage in STAGES:
            if stage not in stages and STAGES.index(stage) > max(STAGES.index(s) for s in stages):
                break
            reference = Path(work) / f"reference-{stage}"
            shutil.copytree(base, reference)
            before = len(server.requests)
            seconds = run_to_end(stage, reference, server.base_url)
            requests_of_reference = len(server.requests) - before
            expected = results(stage, reference)
            # Kill points by progress where it can be seen (the k-th checkpoint, the k-th request), so each kill
            # lands in the middle of the work whatever the machine's speed; exemplars write once: by time.
            total = checkpoints(reference) if stage == "cache" else requests_of_reference
            kills, first_request = [], len(server.requests)
            for i in range(args.kills if stage in stages else 0):
                share = (i + 1) / (args.kills + 1)
                if stage == "cache":
                    ready = reached(max(1, int(total * share)), checkpoints, base)
                elif stage == "exemplars":
                    until = time.monotonic() + seconds * (0.5 + 0.45 * share)
                    ready = reached(until, time.monotonic)
                else:
                    ready = reached(
                        first_request + max(1, int(total * share)), len, server.requests
                    )
                if killed_when(stage, base, server.base_url, ready, timeout_s=seconds * 3 + 60):
                    kills.append(
                        f"{seconds * (0.5 + 0.45 * share):.1f} s"
                        if stage == "exemplars"
                        else f"{share:.0%}"
                    )
            run_to_end(stage, base, server.base_url)
            identical = results(stage, base) == expected
            report["stages"][stage] = {
                "reference_s": round(seconds, 1),
                "killed_at": kills,
                "identical": identical,
            }
            report["kills"] += len(kills)
            print(
                f"{stage}: reference {seconds:.1f} s, killed at {kills} of its work, "
                f"then run to the end: {'identical' if identical else 'DIFFERENT'}",
                flush=True,
            )
    report["identical_results"] = all(s["identical"] for s in report["stages"].values())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
