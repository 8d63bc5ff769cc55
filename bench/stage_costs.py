"""What the platform's own work costs per latent, with the LLM taken out (issue 18, line 3).

Builds what a new user has (once per `--data` folder): the embedded corpus (65,536 tokens), a
random TopK coder (width 16,384, k 32, `model.layers.15`) cached through `cache_activations`, and
the corpus windows embedded in LanceDB. Then, per repeat, one process per code version measures
one shard: `exemplars` (read the shard, negative sources, `build_exemplars`, write the tables, as
the asset does), `explanations` (`explain_all`), `detection` and `fuzzing` (`score_partition`)
against an instant scripted endpoint in its own process (a fresh response cache each time, so
every request is sent), and the `embedding` scorer with the real MiniLM. Per stage: wall ms per
explained latent (median over repeats) and client CPU ms per latent, against the targets
(exemplars 10, each LLM stage 5, embedding 10), and the process's peak RSS.

`--baseline REV` runs the same measurement on the code of commit REV (extracted with `git archive`)
in the same run, alternating with this tree, on the same data, and checks that every table the
two produce is identical, except a scorer's whose settings digest differs between the two (a changed
default, e.g. the embedding scorer's `span_tokens` since 68a0253): its tables are expected to differ,
are still compared, and are reported as "settings differ (old → new digest): " and the verdict.
Prints a JSON object as its last line.

    .venv/bin/python bench/stage_costs.py --data /tmp/stage_costs --baseline 6f1e93b
"""

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("STAGE_COSTS_CODE", ROOT))
"""The code measured: this tree, or a baseline commit's extracted tree."""
sys.path.insert(0, str(CODE))

HOOKPOINT = "model.layers.15"
CODER = f"bench-topk16k/{HOOKPOINT}"
TARGET_MS = {
    "exemplars": 10.0,
    "explanations": 5.0,
    "detection": 5.0,
    "fuzzing": 5.0,
    "embedding": 10.0,
}


def prepare(data: Path, tokens: int, width: int, k: int, coder_key: str = CODER) -> None:
    """Corpus, registered random coder `coder_key`, its activation cache and the contexts table
    (skipped when present)."""
    import torch

    from assets.activations import cache_activations
    from assets.corpus import CorpusConfig, build_corpus
    from assets.exemplars import ExemplarsConfig, context_index
    from resources.embedder import EmbedderResource
    from resources.sparse_coders import SparseCoder, load_registered, save_sparsify
    from resources.subject_model import SubjectModelResource
    from storage.activations import read_cache_meta
    from storage.corpus import load_corpus
    from storage.layout import DataRoot

    root = DataRoot.at(data)
    if read_cache_meta(root.activations_dir(coder_key)) is None:
        subject = SubjectModelResource(batch_size=16)
        build_corpus(CorpusConfig(n_tokens=tokens), subject.tokenizer(), root)
        g = torch.Generator().manual_seed(0)
        decoder = torch.nn.functional.normalize(torch.randn(width, 576, generator=g), dim=1)
        coder = SparseCoder(
            coder_key.split("/")[0],
            HOOKPOINT,
            "topk",
            d_in=576,
            width=width,
            encoder_weight=decoder.clone(),
            encoder_bias=torch.zeros(width),
            decoder_weight=decoder,
            decoder_bias=torch.zeros(576),
            k=k,
        )
        save_sparsify(coder, root.registry_dir / coder.name / HOOKPOINT)
        started = time.perf_counter()
        cache_activations([load_registered(root.registry_dir, coder_key)], subject, root)
        print(f"cached {tokens} tokens in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    context_index(
        root, load_corpus(root), ExemplarsConfig().example_ctx_len, EmbedderResource()
    )  # once per corpus, not per partition


class Meter:
    """Wall and process-CPU seconds of each stage."""

    def __init__(self):
        self.stages = {}

    def __call__(self, name, work):
        wall, cpu = time.perf_counter(), time.process_time()
        out = work()
        self.stages[name] = {
            "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu,
        }
        return out


def measure(data: Path, shard: str, n_latents: int, out: Path) -> dict:
    """One repeat of every stage on one shard, with the code on `sys.path`; tables are written to `out`."""
    import asyncio

    importlib.import_module("openai")  # imported before the clock starts, as in a warm code server

    from assets.exemplars import ExemplarsConfig, negative_sources

    try:  # a baseline's code from before it moved into the tests' helpers
        from assets.exemplars import build_exemplars
    except ImportError:
        from tests.conftest import build_exemplars
    from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings
    from assets.explanations import ExplanationsConfig, explain_all
    from assets.prompts import corpus_prompt_vocab
    from assets.scorers import SCORERS, ScorerDeps, scorer_settings
    from assets.scores import score_partition
    from resources.embedder import EmbedderResource
    from resources.llm import LLMResource
    from storage.activations import (
        LATENT_STATS_FILE,
        load_latent_stats,
        read_cache_meta,
        read_shard,
    )
    from storage.corpus import load_corpus
    from storage.layout import DataRoot
    from storage.tables import write_table

    root = DataRoot.at(data)
    corpus = load_corpus(root)
    vocab = corpus_prompt_vocab(corpus)
    embedder = EmbedderResource()
    embedder.embed(["warm up"])  # the model loads once per process
    acts_dir = root.activations_dir(CODER)
    meta = read_cache_meta(acts_dir)
    config = ExemplarsConfig()
    meter = Meter()
    out.mkdir(parents=True, exist_ok=True)

    def exemplars():
        shard_acts = read_shard(acts_dir, shard)
        stats = load_latent_stats(acts_dir / LATENT_STATS_FILE)
        latents = sorted({int(x) for x in set(shard_acts.locations[:, 2].tolist())})
        sources = negative_sources(root, CODER, corpus, config, latents, embedder, meta)
        frame, profiles = build_exemplars(
            shard_acts, corpus.tokens, config, sources, stats, meta["tokens"]
        )
        write_table(frame, out / "exemplars.parquet", "exemplars")
        write_table(profiles, out / "profiles.parquet", "latent_profiles")
        return frame, profiles

    frame, profiles = meter("exemplars", exemplars)
    explained = sorted(int(x) for x in profiles["latent"])
    chosen = explained[:n_latents] if n_latents else explained
    frame = frame[frame["latent"].isin(chosen)].reset_index(drop=True)
    windows = None
    if (
        "corpus_windows" in ScorerDeps.__dataclass_fields__
    ):  # as the assets do since: the exemplars file, read a chunk at a time, and the corpus window vectors
        from assets.prompts import window_embedding
        from storage.vector_store import CorpusWindows

        frame = out / "exemplars.parquet"
        windows = CorpusWindows(
            root.lancedb_dir, corpus.meta["hash"], corpus.tokens, window_embedding(embedder.model)
        )

    server = subprocess.Popen(
        [sys.executable, "-m", "tests.scripted_llm_server", "--delay", "0", "--by-prompt"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        base_url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as caches:

            def client(name):  # a fresh response cache per stage: every request is sent
                return LLMResource(backend="openai", base_url=base_url, model="scripted").client(
                    DataRoot(Path(caches) / name)
                )

            explainer = EXPLAINERS["highlighted"](
                ExplainerSettings(), ExplainerDeps(llm=client("explanations"))
            )
            explanations = meter(
                "explanations",
                lambda: asyncio.run(
                    explain_all(
                        explainer,
                        ExplanationsConfig(),
                        frame,
                        profiles,
                        chosen,
                        vocab,
                        embedder.embed,
                        None,
                        CODER,
                    )
                ),
            )
            explanations.to_parquet(out / "explanations.parquet")
            settings = scorer_settings()
            digests = {}
            for name in ("detection", "fuzzing", "embedding"):
                deps = (
                    ScorerDeps(llm=client(name))
                    if name != "embedding"
                    else ScorerDeps(
                        embedder=embedder, **({"corpus_windows": windows} if windows else {})
                    )
                )
                scorer = SCORERS[name](settings[name], deps)
                digests[name] = scorer.settings.digest()
                scores, examples = meter(
                    name,
                    lambda scorer=scorer: asyncio.run(
                        score_partition(scorer, frame, explanations, vocab)
                    ),
                )
                scores.to_parquet(out / f"{name}.parquet")
                examples.to_parquet(out / f"{name}.examples.parquet")
    finally:
        server.kill()
        server.wait()
    return {
        "explained_latents_in_shard": len(explained),
        "latents_scored": len(chosen),
        "stages": meter.stages,
        "settings_digests": digests,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def per_latent(result: dict) -> dict:
    """ms per latent: exemplars over the shard's explained latents, the other stages over those they handled."""
    out = {}
    for stage, t in result["stages"].items():
        n = (
            result["explained_latents_in_shard"]
            if stage == "exemplars"
            else result["latents_scored"]
        )
        out[stage] = {"wall_ms": 1000 * t["wall_s"] / n, "cpu_ms": 1000 * t["cpu_s"] / n}
    return out


def same_tables(a: Path, b: Path, digests_a: dict, digests_b: dict) -> dict:
    """Per table written by both runs: "identical" (NaN equal to NaN), else "within 1e-5" with the
    largest difference and the columns it is in (MiniLM's vectors move by ~1e-7 with the batch a
    text is embedded in, which moves a Pearson correlation by ~1e-6: the old code's own and control
    vectors of one window differ so), else "different". A scorer's tables (`<scorer>.parquet`,
    `<scorer>.examples.parquet`) whose settings digests differ get that said first."""
    import pandas as pd

    verdicts = {}
    for path in sorted(a.glob("*.parquet")):
        other = b / path.name
        if not other.exists():
            continue
        verdicts[path.stem] = compare(pd.read_parquet(path), pd.read_parquet(other))
        scorer = path.stem.split(".")[0]
        if digests_a.get(scorer) != digests_b.get(scorer):
            verdicts[path.stem] = (
                f"settings differ ({digests_b.get(scorer)} → {digests_a.get(scorer)}): {verdicts[path.stem]}"
            )
    return verdicts


def compare(left, right) -> str:
    """The verdict on two tables (`same_tables`)."""
    import numpy as np
    import pandas as pd

    try:
        pd.testing.assert_frame_equal(left, right, check_exact=True)
        return "identical"
    except AssertionError:
        pass
    try:
        pd.testing.assert_frame_equal(left, right, check_exact=False, rtol=0, atol=1e-5)
    except AssertionError:
        return "different"
    numeric = left.select_dtypes("number").columns
    gap = np.nanmax(np.abs(left[numeric].to_numpy(float) - right[numeric].to_numpy(float)))
    differing = [c for c in numeric if not left[c].equals(right[c])]
    return f"within 1e-5 (largest difference {gap:.1e}, in {', '.join(differing)})"


def run_child(code: Path, args, out: Path) -> dict:
    env = {
        **os.environ,
        "STAGE_COSTS_CODE": str(code),
        "PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--measure",
            str(out),
            "--data",
            str(args.data),
            "--shard",
            args.shard,
            "--latents",
            str(args.latents),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"measuring {code} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(results: list[dict]) -> dict:
    stages = {}
    for stage in TARGET_MS:
        walls = [per_latent(r)[stage]["wall_ms"] for r in results]
        cpus = [per_latent(r)[stage]["cpu_ms"] for r in results]
        stages[stage] = {
            "wall_ms": round(statistics.median(walls), 2),
            "cpu_ms": round(statistics.median(cpus), 2),
            "wall_ms_repeats": [round(w, 2) for w in walls],
            "target_ms": TARGET_MS[stage],
            "over_target": round(statistics.median(walls) / TARGET_MS[stage], 3),
        }
    return {
        "stages": stages,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "explained_latents_in_shard": results[0]["explained_latents_in_shard"],
        "latents_scored": results[0]["latents_scored"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data root to build or reuse (default: a temporary one)",
    )
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--width", type=int, default=16_384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--shard", default="00")
    parser.add_argument(
        "--latents",
        type=int,
        default=0,
        help="explain and score only the first N explained latents (0 = all)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--baseline",
        default=None,
        help="a commit to measure in the same run, e.g. the one before the change",
    )
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.data, args.shard, args.latents, args.measure)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        args.data = (args.data or Path(tmp) / "data").resolve()
        prepare(args.data, args.tokens, args.width, args.k)
        codes = {"current": ROOT}
        if args.baseline:
            codes["baseline"] = Path(tmp) / "baseline"
            codes["baseline"].mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(codes["baseline"])], input=archive, check=True)
        results = {name: [] for name in codes}
        for repeat in range(
            args.repeats
        ):  # alternating, so a noisy machine's drifts hit both alike
            for name, code in codes.items():
                results[name].append(run_child(code, args, Path(tmp) / name))
                print(
                    f"repeat {repeat + 1} {name}: "
                    + ", ".join(
                        f"{s} {v['wall_ms']:.1f}" for s, v in per_latent(results[name][-1]).items()
                    ),
                    file=sys.stderr,
                )
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        report = {
            "commit": commit,
            "coder": CODER,
            "tokens": args.tokens,
            "width": args.width,
            "k": args.k,
            "shard": args.shard,
            "repeats": args.repeats,
            "current": summarize(results["current"]),
        }
        if args.baseline:
            report["baseline_commit"] = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                capture_output=True,
                text=True,
            ).stdout.strip()
            report["baseline"] = summarize(results["baseline"])
            report["speedup"] = {
                s: round(
                    report["baseline"]["stages"][s]["wall_ms"]
                    / report["current"]["stages"][s]["wall_ms"],
                    2,
                )
                for s in TARGET_MS
            }
            report["identical_tables"] = same_tables(
                Path(tmp) / "current",
                Path(tmp) / "baseline",
                *(results[name][-1]["settings_digests"] for name in ("current", "baseline")),
            )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
