"""Benchmark the activation cache against the bare truncated forward pass, in the same run.

Runs `cache_activations` on the embedded SmolLM2-135M at `model.layers.15` with a TopK SAE
(width 4608, k 32; random weights: speed does not depend on training), and the bare transformers
forward cut after layer 15 on the same tokens and batch size, interleaved `--repeats` times so
that a noisy machine's drifts hit both alike. Prints a JSON object as its last line: tok_s and
bare_tok_s (medians), ratio (the median over repeats of cache speed / bare speed, each repeat's
pair measured back to back), the per-repeat ratios, and peak_rss_mb. Each repeat caches from
scratch: the previous repeat's cache is deleted, untimed, first.
Compare peak RSS across token counts with two runs, e.g. --tokens 16384 and --tokens 131072.

    .venv/bin/python bench/cache.py --tokens 16384
"""

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assets.activations import cache_activations  # noqa: E402
from assets.corpus import CorpusConfig, build_corpus  # noqa: E402
from resources.sparse_coders import SparseCoder, save_sparsify  # noqa: E402
from resources.subject_model import SubjectModelResource, capture_hookpoints  # noqa: E402
from storage.corpus import load_corpus  # noqa: E402
from storage.layout import DataRoot  # noqa: E402

HOOKPOINT = "model.layers.15"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved cache/bare passes; medians are reported"
    )
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    parser.add_argument("--dtype", default="float32", help="e.g. bfloat16 on a GPU")
    args = parser.parse_args()

    torch.manual_seed(0)
    subject = SubjectModelResource(batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        root = DataRoot.at(tmp)
        meta = build_corpus(
            CorpusConfig(ctx_len=args.ctx_len, n_tokens=args.tokens), subject.tokenizer(), root
        )
        width, d_in = 4608, 576
        decoder = torch.nn.functional.normalize(torch.randn(width, d_in), dim=1)
        coder = SparseCoder(
            "bench-topk",
            HOOKPOINT,
            "topk",
            d_in=d_in,
            width=width,
            encoder_weight=decoder.clone(),
            encoder_bias=torch.zeros(width),
            decoder_weight=decoder,
            decoder_bias=torch.zeros(d_in),
            k=32,
        )
        save_sparsify(coder, root.registry_dir / coder.name / HOOKPOINT)
        lm = subject.causal_lm()
        tokens = torch.from_numpy(load_corpus(root).tokens).long().to(args.device)
        capture_hookpoints(lm, tokens[: args.batch_size], {(HOOKPOINT, "output")})  # warm-up

        cache_s, bare_s = [], []
        for _ in range(args.repeats):  # interleaved, so drifts of a noisy machine hit both alike
            shutil.rmtree(
                root.activations_dir(coder.key), ignore_errors=True
            )  # else the repeat finds the last one's cache and reuses it
            started = time.perf_counter()
            cache_activations([coder], subject, root, skip_bos=False)
            cache_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            for i in range(0, len(tokens), args.batch_size):
                capture_hookpoints(lm, tokens[i : i + args.batch_size], {(HOOKPOINT, "output")})
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            bare_s.append(time.perf_counter() - started)

    n = meta["n_tokens"]
    result = {
        "tokens": n,
        "batch_size": args.batch_size,
        "device": args.device,
        "repeats": args.repeats,
        "tok_s": round(n / statistics.median(cache_s), 1),
        "bare_tok_s": round(n / statistics.median(bare_s), 1),
        "ratio": round(statistics.median(b / c for b, c in zip(bare_s, cache_s, strict=False)), 3),
        "ratios": [round(b / c, 3) for b, c in zip(bare_s, cache_s, strict=False)],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
