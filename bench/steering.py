"""Benchmark steered generation against bare generation, and the intervention scorer's cost per latent.

Throughput: greedy generation of `--tokens` tokens for each of `--prompts` neutral prompts (one
batch), bare (transformers' `generate`) and steered (nnsight, one latent of a TopK SAE of width
8 × d_model, k 32, random weights, edited at every position with the error term kept), interleaved
`--repeats` times so a noisy machine's drifts hit both alike; the ratio is the median of the
per-repeat ratios of steered to bare tokens/s (target >= 0.8).

Intervention cost: latents of a coder whose latents write one token's unembedding direction (so the
KL target is reachable), each explained as "the word '<its token>'" with the next latent's
explanation as its control, scored as the scorer does (`score_in_batch`): the KL-targeted strength
search, the steered continuations and the likelihoods of the steered and unsteered texts under no
description, the explanation and the control. The seconds per latent of that subject-model work,
one latent at a time (batch of 1: `--baseline-latents` latents) and `--batch` latents at a time
(`--latents` latents), in the same run; the work done once per partition (the unsteered
continuations and next-token distributions) is timed apart (`shared_s`). The batched latents that
were also scored alone must get the same continuations, strengths and scores (`same_as_alone`).
The output-side judge adds 2 LLM requests per latent (explanation and control; all prompts of a
latent in one request). `--repeats 0` skips the throughput part.

The arithmetic floor (`arithmetic_floor_s_per_latent`): the tokens a latent's score must run through
the subject model at the rate of one large forward pass; with `--before`, `ceiling_speedup_over_before`
says how much faster than that commit any code doing the same arithmetic could be on this machine.

The last line is a JSON object. `--architecture llama` runs on a random-weight Llama of the given
size instead of the embedded SmolLM2-135M (for a GPU: `--device cuda --dtype bfloat16`).

    .venv/bin/python bench/steering.py
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from assets.scorers.intervention import ContinuationSource, Likelihoods, score_in_batch  # noqa: E402
from resources.sparse_coders import SparseCoder  # noqa: E402
from resources.steering import NEUTRAL_PROMPTS, Steer, Steerer, logits_to_keep  # noqa: E402
from resources.subject_model import SubjectModelResource  # noqa: E402


def random_llama(hidden: int, layers: int, device: str, dtype: str, tokenizer) -> torch.nn.Module:
    """A Llama of the given size with random weights (no download): speed does not depend on training."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(hidden * 3.5) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device(device):
        lm = LlamaForCausalLM(config).to(getattr(torch, dtype))
    return lm.eval()


def time_before(args) -> float:
    """The --before commit's intervention seconds per latent on the same workload (its bench: the same coder,
    prompts, tokens and KL target, the shared unsteered work divided among its latents)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as old:
        subprocess.run(
            f"git -C {REPO} archive {args.before} | tar -x -C {old}", shell=True, check=True
        )
        ran = subprocess.run(
            [
                sys.executable,
                "bench/steering.py",
                "--repeats",
                "1",
                "--latents",
                str(args.before_latents),
                "--tokens",
                str(args.tokens),
                "--prompts",
                str(args.prompts),
                "--target-kl",
                str(args.target_kl),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
            ],
            cwd=old,
            capture_output=True,
            text=True,
        )
        if ran.returncode:
            raise SystemExit(f"the --before commit's bench failed:\n{ran.stderr[-3000:]}")
        return json.loads(ran.stdout.strip().splitlines()[-1])["intervention_s_per_latent"]


def arithmetic_floor(
    lm, tokenizer, prompts: list[str], tokens: int, likelihoods, latents: int, rows: int
) -> dict:
    """What a latent's score cannot go below on this machine without doing less arithmetic: the tokens
    its subject model must run (each prompt and its steered continuation once, generated with a key/value
    cache; each distinct likelihood text the batched run read, its description's last token, prompt and
    continuation, the description's shared keys and values not counted), at the rate of one large
    unsteered forward pass (`rows` rows of the longest such text, logits kept for the continuation;
    fastest of 3). It leaves out the strength search and the shared unsteered work, so it is a floor."""
    length = {prompt: len(tokenizer(prompt)["input_ids"]) for prompt in prompts}
    generated = sum(length[prompt] + tokens for prompt in prompts)
    read = sum(
        1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + len(continuation)
        for _, prompt, continuation in likelihoods._known
    )
    width = 1 + max(length.values()) + tokens
    ids = torch.randint(1000, 20000, (rows, width), device=next(lm.parameters()).device)
    with torch.inference_mode():
        seconds = min(
            timed(lambda: lm(input_ids=ids, **logits_to_keep(lm, tokens + 1))) for _ in range(3)
        )
    per_token = seconds / ids.numel()
    return {
        "tokens_per_latent": round(generated + read / latents),
        "s_per_token": float(f"{per_token:.3g}"),
        "s_per_latent": (generated + read / latents) * per_token,
    }


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latents", type=int, default=16, help="latents scored in batches")
    parser.add_argument(
        "--batch", type=int, default=16, help="latents per batch ([subject_model] steering_batch)"
    )
    parser.add_argument(
        "--baseline-latents",
        type=int,
        default=2,
        help="of them, the first scored one at a time as well",
    )
    parser.add_argument("--target-kl", type=float, default=1.0)
    parser.add_argument(
        "--before",
        metavar="COMMIT",
        help="also time the intervention scorer of this commit in the same run (83a6ce0: one latent "
        "at a time, nothing shared but the unsteered continuations): its own bench/steering.py "
        "on a `git archive` of it",
    )
    parser.add_argument(
        "--before-latents", type=int, default=2, help="latents the --before commit scores"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--architecture", choices=["embedded", "llama"], default="embedded")
    parser.add_argument("--hidden", type=int, default=2048, help="d_model of the random Llama")
    parser.add_argument("--layers", type=int, default=16, help="layers of the random Llama")
    args = parser.parse_args()

    torch.manual_seed(0)
    subject = SubjectModelResource(device=args.device, dtype=args.dtype)
    tokenizer = subject.tokenizer()
    lm = (
        subject.causal_lm()
        if args.architecture == "embedded"
        else random_llama(args.hidden, args.layers, args.device, args.dtype, tokenizer)
    )
    steerer = Steerer(lm, tokenizer)
    d_model, n_layers = lm.config.hidden_size, lm.config.num_hidden_layers
    prompts = [NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)] for i in range(args.prompts)]

    middle = f"model.layers.{n_layers // 2}"
    width = 8 * d_model
    decoder = torch.nn.functional.normalize(torch.randn(width, d_model), dim=1)
    sae = SparseCoder(
        "bench-topk",
        middle,
        "topk",
        d_model,
        width,
        decoder.clone(),
        torch.zeros(width),
        decoder,
        torch.zeros(d_model),
        k=32,
    )
    hidden = steerer.read(steerer.encode_prompts(prompts)[0], {(middle, "output")})[
        (middle, "output")
    ]
    steer = Steer(
        sae, 7, float(hidden[:, 1:].norm(dim=-1).median())
    )  # a push the size of the residual stream
    steerer.generate(prompts[:1], 2)
    steerer.generate(
        prompts[:1], 2, [steer]
    )  # warm-up (nnsight's first trace compiles its machinery)

    bare_s, steered_s = [], []
    for _ in range(args.repeats):
        bare_s.append(timed(lambda: steerer.generate(prompts, args.tokens)))
        steered_s.append(timed(lambda: steerer.generate(prompts, args.tokens, [steer])))
    generated = args.prompts * args.tokens
    ratios = [b / s for b, s in zip(bare_s, steered_s, strict=False)]

    # the intervention scorer's subject-model work per latent, one latent at a time and in batches
    late = f"model.layers.{n_layers - 3}"
    token_ids = list(range(1000, 1000 + args.latents * 37, 37))
    rows = torch.nn.functional.normalize(
        lm.get_output_embeddings().weight.detach().float()[token_ids].cpu(), dim=1
    )
    writer = SparseCoder(
        "bench-unembed",
        late,
        "relu",
        d_model,
        len(token_ids),
        rows.clone(),
        torch.zeros(len(token_ids)),
        rows.clone(),
        torch.zeros(d_model),
    )
    late_hidden = steerer.read(steerer.encode_prompts(prompts)[0], {(late, "output")})[
        (late, "output")
    ]
    unit = float(late_hidden[:, 1:].norm(dim=-1).median())
    explanation = {
        latent: f"the word {tokenizer.decode([t]).strip()!r}" for latent, t in enumerate(token_ids)
    }
    control = {latent: explanation[(latent + 1) % len(token_ids)] for latent in explanation}

    def score_latents(batch: int, latents: list[int]) -> dict:
        source = ContinuationSource(
            steerer, writer, prompts, args.tokens, args.target_kl, lambda latent: unit, batch=batch
        )
        likelihoods = Likelihoods(lm, tokenizer, batch * len(prompts))
        shared_s = timed(source.unsteered)
        told = {latent: [explanation[latent], control[latent]] for latent in latents}
        source.expect(latents)
        made, scores = {}, {}

        def score() -> None:
            for latent in latents:
                for text in (explanation[latent], control[latent]):
                    made[latent], scored = score_in_batch(source, likelihoods, told, latent, text)
                    scores[(latent, text)] = scored.score

        return {
            "s_per_latent": timed(score) / len(latents),
            "shared_s": shared_s,
            "made": made,
            "scores": scores,
            "likelihoods": likelihoods,
        }

    before = time_before(args) if args.before else None
    alone = score_latents(1, list(range(min(args.baseline_latents, len(token_ids)))))
    batched = score_latents(args.batch, list(range(len(token_ids))))
    floor = arithmetic_floor(
        lm,
        tokenizer,
        prompts,
        args.tokens,
        batched["likelihoods"],
        len(token_ids),
        args.batch * len(prompts),
    )
    differences = [abs(alone["scores"][key] - batched["scores"][key]) for key in alone["scores"]]
    same = (
        all(
            alone["made"][latent].steered == batched["made"][latent].steered
            and alone["made"][latent].delta == batched["made"][latent].delta
            for latent in alone["made"]
        )
        and max(differences) < 1e-4
    )

    print(
        json.dumps(
            {
                "device": args.device,
                "dtype": args.dtype,
                "architecture": args.architecture
                if args.architecture == "embedded"
                else f"llama d{d_model} L{n_layers}",
                "prompts": args.prompts,
                "tokens": args.tokens,
                "repeats": args.repeats,
                **(
                    {
                        "bare_tok_s": round(generated / statistics.median(bare_s), 1),
                        "steered_tok_s": round(generated / statistics.median(steered_s), 1),
                        "ratio": round(statistics.median(ratios), 3),
                        "ratios": [round(r, 3) for r in ratios],
                    }
                    if args.repeats
                    else {}
                ),
                "latents": args.latents,
                "batch": args.batch,
                "baseline_latents": len(alone["made"]),
                "intervention_s_per_latent_alone": round(alone["s_per_latent"], 2),
                "intervention_s_per_latent_batched": round(batched["s_per_latent"], 2),
                "intervention_speedup": round(alone["s_per_latent"] / batched["s_per_latent"], 1),
                "shared_s": round(batched["shared_s"], 2),
                "same_as_alone": same,
                "largest_score_difference": float(f"{max(differences):.1g}"),
                "kl_reached": [round(m.kl, 3) for m in batched["made"].values()],
                "judge_requests_per_latent": 2,
                **(
                    {
                        "before": args.before,
                        # that bench counts the shared work among its latents: so here too
                        "intervention_s_per_latent_before": before,
                        "speedup_over_before": round(
                            before
                            / (batched["s_per_latent"] + batched["shared_s"] / len(token_ids)),
                            1,
                        ),
                    }
                    if before
                    else {}
                ),
                "tokens_per_latent": floor["tokens_per_latent"],
                "forward_s_per_token": floor["s_per_token"],
                "arithmetic_floor_s_per_latent": round(floor["s_per_latent"], 2),
                **(
                    {"ceiling_speedup_over_before": round(before / floor["s_per_latent"], 1)}
                    if before
                    else {}
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
