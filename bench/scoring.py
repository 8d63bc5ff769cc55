"""What explaining and scoring one latent costs: requests and prompt tokens, ours against delphi's.

Builds latents at delphi's default example counts (40 windows shown to the explainer; 50
activating and 50 non-activating held-out windows of 32 tokens, real text from the embedded
corpus), then runs our explainer and our detection and fuzzing scorers (each with its shuffled-
explanation control) against a scripted OpenAI-compatible server on 127.0.0.1 that counts the
requests and the prompt tokens (SmolLM2's chat template). delphi's requests per latent follow
from its documented settings: one explainer request, and 5 examples per detection or fuzzing
prompt over the same 100 windows (`num_examples_per_scorer_prompt=5`), without a control.
Prints a JSON object as its last line.

    .venv/bin/python bench/scoring.py [--latents 10]
"""

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assets.corpus import embedded_documents, tokenize_documents  # noqa: E402
from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings  # noqa: E402
from assets.explanations import ExplanationsConfig, explain_all  # noqa: E402
from assets.scorers import SCORERS, ScorerDeps, scorer_settings  # noqa: E402
from assets.scores import score_partition  # noqa: E402
from resources.llm import LLMResource  # noqa: E402
from resources.subject_model import load_tokenizer  # noqa: E402
from tests.scripted_llm_server import ScriptedLLMServer  # noqa: E402

DELPHI = {
    "n_examples_train": 40,
    "n_examples_test": 50,
    "n_non_activating": 50,
    "examples_per_prompt": 5,
    "example_ctx_len": 32,
    "n_quantiles": 10,
}


def synthetic_exemplars(
    n_latents: int, tokens: np.ndarray, rng: np.random.Generator
) -> pd.DataFrame:
    """Windows of real text; the latent 'fires' on 1-3 random tokens of each activating window."""
    rows, windows = [], iter(rng.permutation(len(tokens)))
    for latent in range(n_latents):
        for split, kind, count in (
            ("train", "activating", DELPHI["n_examples_train"]),
            ("test", "activating", DELPHI["n_examples_test"]),
            ("test", "random", DELPHI["n_non_activating"]),
        ):
            for i in range(count):
                ids = tokens[next(windows)].tolist()
                acts = np.zeros(len(ids), np.float32)
                if kind == "activating":
                    acts[rng.choice(len(ids), size=int(rng.integers(1, 4)), replace=False)] = (
                        rng.uniform(0.5, 5.0)
                    )
                rows.append(
                    {
                        "latent": latent,
                        "split": split,
                        "kind": kind,
                        "quantile": 1 + i * DELPHI["n_quantiles"] // count
                        if kind == "activating"
                        else 0,
                        "sequence": 0,
                        "start": 0,
                        "max_activation": float(acts.max()),
                        "tokens": ids,
                        "activations": acts.tolist(),
                    }
                )
    return pd.DataFrame(rows)


def judge(messages):
    user = messages[-1]["content"]
    if "Description" not in user:
        return f"Explanation: pattern {abs(hash(user)) % 1000}"
    return str([i % 2 for i in range(user.count("\nExample "))])


async def run(client, exemplars, vocab):
    explanations = await explain_all(
        EXPLAINERS["highlighted"](ExplainerSettings(), ExplainerDeps(llm=client)),
        ExplanationsConfig(),
        exemplars,
        None,
        sorted(exemplars.latent.unique()),
        vocab,
        embed=None,
    )
    settings = scorer_settings()
    for name in ("detection", "fuzzing"):
        await score_partition(
            SCORERS[name](settings[name], ScorerDeps(llm=client)), exemplars, explanations, vocab
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=10)
    args = parser.parse_args()

    tokenizer = load_tokenizer()
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    per_latent_windows = (
        DELPHI["n_examples_train"] + DELPHI["n_examples_test"] + DELPHI["n_non_activating"]
    )
    tokens = tokenize_documents(
        embedded_documents(),
        tokenizer,
        ctx_len=DELPHI["example_ctx_len"],
        n_tokens=DELPHI["example_ctx_len"] * per_latent_windows * args.latents,
        add_bos=False,
        seed=0,
    )
    exemplars = synthetic_exemplars(args.latents, tokens, np.random.default_rng(0))

    with ScriptedLLMServer(judge) as server:
        client = LLMResource(
            backend="openai",
            base_url=server.base_url,
            model="scripted",
            max_concurrency=16,
            cache_dir="",
        ).client()
        asyncio.run(run(client, exemplars, vocab))
    prompt_tokens = sum(
        len(
            tokenizer(
                tokenizer.apply_chat_template(
                    r["messages"], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )["input_ids"]
        )
        for r in server.requests
    )
    scorer_requests = sum("Description" in r["messages"][-1]["content"] for r in server.requests)

    examples_per_latent = DELPHI["n_examples_test"] + DELPHI["n_non_activating"]
    delphi = 1 + 2 * math.ceil(examples_per_latent / DELPHI["examples_per_prompt"])
    ours = len(server.requests) / args.latents
    print(
        f"{args.latents} latents: {len(server.requests)} requests ({scorer_requests} scorer "
        f"requests, half of them the controls), {prompt_tokens} prompt tokens"
    )
    print(
        json.dumps(
            {
                "latents": args.latents,
                "examples_per_latent": examples_per_latent,
                "examples_per_prompt": scorer_settings()["detection"].examples_per_prompt,
                "requests_per_latent": round(ours, 2),
                "requests_per_latent_without_control": round(
                    ours - scorer_requests / 2 / args.latents, 2
                ),
                "prompt_tokens_per_latent": round(prompt_tokens / args.latents, 1),
                "delphi_requests_per_latent": delphi,
                "ratio": round(ours / delphi, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
