"""A 131,072-latent coder end to end, and what changes with the partition size (issue 18, line 5).

Builds (once per `--data` folder) a random TopK coder of width 131,072 (k 32, `model.layers.15`) on
the embedded model, cached over the whole embedded corpus (about 258K tokens; ~5 min here) with the
default 1,024-latent shards, and the corpus windows embedded in LanceDB. Then, for each partition
size (1K, 8K, 32K latents: a partition of P latents is latents [0, P), read across the cache's
shards as one), one fresh process runs the stages the assets run: exemplars of every latent of the
partition, then explanations and the detection, fuzzing and embedding scorers of its first
`--latents` explained latents, against an instant scripted endpoint in its own process (the LLM
taken out; a fresh response cache per stage, so every request is sent). Per stage: ms per latent,
requests per latent, and the peak RSS of the process while the stage ran (sampled every 20 ms).

The Dagster overhead: `dagster asset materialize` of `explanations` for one 1,024-latent shard (a
cold process: imports, definitions, resources, inputs read; one latent explained), and what each
further shard adds to a run of 4 (a backfill under `[settings] partitions_per_run = 4`; both timed
as a cold `materialize` in Python, since the CLI takes no multi-run range), per shard the run holds,
against the work of a whole default shard's run (explanations, detection, fuzzing, embedding) at the
measured ms per latent (the share with the instant endpoint, the worst case) and with a 1 s endpoint
at concurrency 32 (the measured requests per latent: the share users see). Prints a JSON object as
its last line; `ratio` is the peak RSS of the largest partition over the smallest's (flat
memory: ≤ 1.1).

    .venv/bin/python bench/scale.py --data /tmp/scale
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from stage_costs import HOOKPOINT, prepare  # noqa: E402  (the same random coder and cache, at another width)

CODER = f"bench-topk131k/{HOOKPOINT}"
CACHE_SHARD = 1024


class Stages:
    """Wall and process-CPU seconds and peak RSS of each stage, with the number of latents it handled."""

    def __init__(self):
        self.stages = {}

    def __call__(self, name: str, latents: int, work):
        peak, done = [psutil.Process().memory_info().rss], threading.Event()

        def sample():
            while not done.wait(0.02):
                peak[0] = max(peak[0], psutil.Process().memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started, cpu = time.perf_counter(), time.process_time()
        try:
            return work()
        finally:
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            done.set()
            sampler.join()
            self.stages[name] = {
                "latents": latents,
                "ms_per_latent": round(1000 * wall / max(1, latents), 2),
                "wall_s": round(wall, 1),
                "cpu_ms_per_latent": round(
                    1000 * cpu / max(1, latents), 2
                ),  # this process's CPU: less moved by a loaded machine
                "peak_rss_mb": round(max(peak[0], psutil.Process().memory_info().rss) / 2**20),
            }


def measure(data: Path, partition_latents: int, n_latents: int) -> dict:
    """Every stage on latents [0, partition_latents) of the coder, in this process."""
    import numpy as np

    # openai before the clocks, as bench/stage_costs.py does: importing the SDK (1-4 s) is the process's
    # cost, not a stage's.
    import openai  # noqa: F401 (imported for its import time only)
    import pandas as pd

    from assets.exemplars import ExemplarsConfig, exemplar_batches, negative_sources
    from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings
    from assets.explanations import ExplanationsConfig, explain_all
    from assets.prompts import corpus_prompt_vocab, window_embedding
    from assets.scorers import SCORERS, ScorerDeps, scorer_settings
    from assets.scores import score_partition
    from resources.embedder import EmbedderResource
    from resources.llm import LLMResource
    from storage.activations import (
        LATENT_STATS_FILE,
        load_latent_stats,
        read_cache_meta,
        read_latents,
    )
    from storage.corpus import load_corpus
    from storage.layout import DataRoot
    from storage.tables import write_table_batches
    from storage.vector_store import CorpusWindows

    root = DataRoot.at(data)
    corpus = load_corpus(root)
    vocab = corpus_prompt_vocab(corpus)
    embedder = EmbedderResource()
    embedder.embed(["warm up"])
    acts_dir = root.activations_dir(CODER)
    meta = read_cache_meta(acts_dir)
    config = ExemplarsConfig()
    stages = Stages()

    table = Path(tempfile.mkdtemp()) / "exemplars.parquet"

    def exemplars():  # as the asset does: batches of latents built and written as row groups
        acts = read_latents(
            acts_dir, np.arange(partition_latents), meta["width"], meta["latents_per_shard"]
        )
        stats = load_latent_stats(acts_dir / LATENT_STATS_FILE)
        latents = sorted(int(x) for x in np.unique(acts.locations[:, 2]))
        sources = negative_sources(root, CODER, corpus, config, latents, embedder, meta)
        parts = []

        def frames():
            for frame, profiles in exemplar_batches(
                acts, corpus.tokens, config, sources, stats, meta["tokens"]
            ):
                parts.append(profiles)
                yield frame

        write_table_batches(frames(), table, "exemplars")
        return pd.concat(parts, ignore_index=True)

    profiles = stages("exemplars", partition_latents, exemplars)
    explained = sorted(int(x) for x in profiles["latent"])
    chosen = explained[:n_latents]
    windows = CorpusWindows(
        root.lancedb_dir, corpus.meta["hash"], corpus.tokens, window_embedding(embedder.model)
    )
    requests = {}
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.scripted_llm_server", "--delay", "0", "--by-prompt"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        base_url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as caches:

            def client(name):
                return LLMResource(
                    backend="openai", base_url=base_url, model="scripted", max_concurrency=32
                ).client(DataRoot(Path(caches) / name))

            llm = client("explanations")
            explainer = EXPLAINERS["highlighted"](ExplainerSettings(), ExplainerDeps(llm=llm))
            explanations = stages(
                "explanations",
                len(chosen),
                lambda: asyncio.run(
                    explain_all(
                        explainer,
                        ExplanationsConfig(),
                        table,
                        profiles,
                        chosen,
                        vocab,
                        embedder.embed,
                        None,
                        CODER,
                    )
                ),
            )
            requests["explanations"] = llm.ledger.requests
            settings = scorer_settings()
            for name in ("detection", "fuzzing", "embedding"):
                deps = (
                    ScorerDeps(llm=client(name))
                    if name != "embedding"
                    else ScorerDeps(embedder=embedder, corpus_windows=windows)
                )
                scorer = SCORERS[name](settings[name], deps)
                stages(
                    name,
                    len(chosen),
                    lambda scorer=scorer: asyncio.run(
                        score_partition(scorer, table, explanations, vocab)
                    ),
                )
                requests[name] = deps.llm.ledger.requests if deps.llm is not None else 0
    finally:
        server.kill()
        server.wait()
    for name, n in requests.items():
        stages.stages[name]["requests_per_latent"] = round(n / max(1, len(chosen)), 2)
    stages.stages["exemplars"]["ms_per_explainable_latent"] = round(
        1000 * stages.stages["exemplars"]["wall_s"] / max(1, len(explained)), 2
    )
    return {
        "partition_latents": partition_latents,
        "explainable_latents": len(explained),
        "latents_explained_and_scored": len(chosen),
        "stages": stages.stages,
        "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.stages.values()),
    }


RANGED_SHARDS = 4
"""Shards in the ranged run measured (`[settings] partitions_per_run`)."""


def shard_partitions(data: Path) -> list[str]:
    """The coder's partition keys (`|000` for 128 shards: keys are zero-padded to the count)."""
    from assets.partitions import shard_partition_keys
    from storage.activations import read_cache_meta
    from storage.layout import DataRoot

    return shard_partition_keys(
        CODER, read_cache_meta(DataRoot.at(data).activations_dir(CODER))["width"], CACHE_SHARD
    )


RUN = """
import sys
from dagster import DagsterInstance, materialize
from autointerp_defs.definitions import defs
keys = sys.argv[1:]
tags = (
    {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
    if len(keys) > 1
    else {}
)
assert materialize(
    list(defs.assets),
    selection=["explanations"],
    resources=defs.resources,
    instance=DagsterInstance.get(),
    partition_key=None if tags else keys[0],
    tags=tags,
).success
"""


def dagster_run_seconds(data: Path, scripted_url: str, shards: int, cli: bool = False) -> float:
    """Wall time of a cold process materializing `explanations` for the coder's first `shards`
    shards in one run (one latent explained per shard), as a backfill under
    `partitions_per_run = shards` runs them; with `cli`, of `dagster asset materialize` of the first
    shard (what a user types; it takes no multi-run range)."""
    from dagster import DagsterInstance

    home = data / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions(
        "shard",
        [k for k in shard_partitions(data) if not instance.has_dynamic_partition("shard", k)],
    )
    deployment = data / "scale.toml"
    deployment.write_text(
        f'[settings]\ndata_dir = "{data}"\nlatents_per_shard = {CACHE_SHARD}\n'
        f"max_latents_per_shard = 1\npartitions_per_run = {shards}\n"
        f'[llm]\nbackend = "openai"\nbase_url = "{scripted_url}"\nmodel = "scripted"\n'
        '[explanations]\nexplainer = "highlighted"\n'
    )
    env = {**os.environ, "DAGSTER_HOME": str(home), "AUTOINTERP_DEPLOYMENT": str(deployment)}
    command = (
        [
            str(Path(sys.executable).parent / "dagster"),
            "asset",
            "materialize",
            "-m",
            "autointerp_defs",
            "--select",
            "explanations",
            "--partition",
            shard_partitions(data)[0],
        ]
        if cli
        else [sys.executable, "-c", RUN, *shard_partitions(data)[:shards]]
    )
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def write_shard_inputs(data: Path) -> None:
    """The exemplars of the coder's first `RANGED_SHARDS` shards, where the `explanations` asset reads them."""
    from dagster import DagsterInstance, materialize

    from autointerp_defs.definitions import build_definitions
    from resources.embedder import EmbedderResource
    from resources.llm import LLMResource
    from resources.settings import AutointerpSettings
    from resources.subject_model import SubjectModelResource

    keys = shard_partitions(data)[:RANGED_SHARDS]
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shard", keys)
    resources = {
        "settings": AutointerpSettings(data_dir=str(data), latents_per_shard=CACHE_SHARD),
        "subject_model": SubjectModelResource(),
        "embedder": EmbedderResource(),
        "llm": LLMResource(),
    }
    materialize(
        list(build_definitions("local").assets),
        selection=["exemplars"],
        resources=resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data root to build or reuse (default: a temporary one)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=262_144,
        help="corpus tokens (the embedded corpus holds about 258K: all of it)",
    )
    parser.add_argument("--width", type=int, default=131_072)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument(
        "--partitions", default="1024,8192,32768", help="partition sizes in latents"
    )
    parser.add_argument(
        "--latents", type=int, default=2000, help="latents explained and scored per partition size"
    )
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.data, args.measure, args.latents)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        args.data = (args.data or Path(tmp) / "data").resolve()
        started = time.perf_counter()
        prepare(args.data, args.tokens, args.width, args.k, CODER)
        print(f"prepared in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        results = []
        for size in (int(s) for s in args.partitions.split(",")):
            done = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--measure",
                    str(size),
                    "--data",
                    str(args.data),
                    "--latents",
                    str(args.latents),
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise RuntimeError(f"partition of {size} latents failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(
                f"{size} latents: "
                + ", ".join(
                    f"{k} {v['ms_per_latent']} ms ({v['peak_rss_mb']} MB)"
                    for k, v in results[-1]["stages"].items()
                ),
                file=sys.stderr,
            )

        from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt

        write_shard_inputs(args.data)
        with ScriptedLLMServer(answer_by_prompt) as server:
            cli_s = dagster_run_seconds(args.data, server.base_url, 1, cli=True)
            run_s = {
                n: dagster_run_seconds(args.data, server.base_url, n) for n in (1, RANGED_SHARDS)
            }
        default = next((r for r in results if r["partition_latents"] == CACHE_SHARD), results[0])
        llm_stages = (
            "explanations",
            "detection",
            "fuzzing",
        )  # one run per shard runs them all (and exemplars, embedding)
        work_instant_s = (
            sum(default["stages"][s]["ms_per_latent"] for s in (*llm_stages, "embedding"))
            * CACHE_SHARD
            / 1000
        )
        work_endpoint_s = (
            CACHE_SHARD
            * sum(default["stages"][s]["requests_per_latent"] for s in llm_stages)
            * 1.0
            / 32
        )
        # a run's cost per shard it holds: the CLI's cold run, plus what each further shard of a
        # range adds (its one latent's work included: an upper bound)
        per_shard = {n: (cli_s + (run_s[n] - run_s[1])) / n for n in run_s}
        from storage.activations import read_cache_meta
        from storage.layout import DataRoot

        meta = read_cache_meta(DataRoot.at(args.data).activations_dir(CODER))
    rss = [r["peak_rss_mb"] for r in results]
    report = {
        "coder": CODER,
        "width": meta["width"],
        "k": args.k,
        "tokens": meta["tokens"],
        "cache_tokens_per_second": round(meta["tokens_per_second"], 1),
        "live_latents": meta["live_latents"],
        "by_partition_size": results,
        "dagster_cli_run_s": round(cli_s, 1),
        "dagster_run_s": round(run_s[1], 1),
        f"dagster_run_s_{RANGED_SHARDS}_shards": round(run_s[RANGED_SHARDS], 1),
        **{
            f"dagster_overhead_share_{n}_per_run_{where}": round(
                per_shard[n] / (per_shard[n] + work), 3
            )
            for n in run_s
            for where, work in (
                ("instant_endpoint", work_instant_s),
                ("1s_endpoint_32_concurrent", work_endpoint_s),
            )
        },
        "peak_rss_mb_smallest_partition": rss[0],
        "peak_rss_mb_largest_partition": rss[-1],
        "ratio": round(rss[-1] / rss[0], 3),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
