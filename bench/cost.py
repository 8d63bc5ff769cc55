"""What explaining and scoring a latent costs in tokens, ours beside delphi's, counted with one tokenizer.

Runs our explainer and our detection and fuzzing scorers (each with its shuffled-explanation control)
at our defaults on two sets of latents:
- planted: latents whose truth is planted (`tests/planted_latents.py`, one sense each, the windows
  our `ExemplarsConfig` defaults ask for), explained and judged by the scripted explainer and literal
  judge there, so the detection and fuzzing gaps over the control are measured in the same run;
- demo: the first `--demo-latents` latents of the demo coder's shard 00 as its exemplars stage
  wrote them under `--data` (`make demo`'s data root), answered by a scripted model in the same
  answer formats; left out, and said so, when that root has no such exemplars.

The endpoint is a scripted OpenAI-compatible server on 127.0.0.1 that counts every request's prompt
and completion tokens with tiktoken's `o200k_base` (GPT-4o's; each message costs 3 tokens beside its
role and content, and 3 prime the reply, as OpenAI counts a chat). tiktoken downloads its ranks on
first use; here they come from the `bpe-openai` package, which ships them (checked against tiktoken's
own hash of the file).

For the same latents, the tokens delphi (eai-delphi 0.1.3) would send at its defaults are counted with
the same tokenizer: its `DefaultExplainer` prompt (40 windows shown, `threshold` 0.3, activations
listed) and its `DetectionScorer` and `FuzzingScorer` prompts (50 activating and 50 non-activating
windows, 5 a prompt: `num_examples_per_scorer_prompt`), built by delphi's own code, called without a
model, from the latent's own windows (repeated in turn where delphi asks for more windows than the
latent's exemplars hold) and our explanation. delphi's answers are counted as the answers of a perfect
judge in its formats (`[EXPLANATION]: …`, `[1,0,…]`). delphi scores without a control.

Prefix caching: a prompt's cached tokens are its leading tokens that an earlier request (of the same
run, in the order the endpoint saw them) began with, under OpenAI's rule (only a shared prefix of
>= 1,024 tokens, in steps of 128) and under vLLM's (whole blocks of 16 tokens, never the whole
prompt). `billed_per_latent` charges cached prompt tokens at (1 - `--cache-discount`) of the price
(OpenAI's rule). Prints a JSON object as its last line.

    .venv/bin/pip install -e '.[bench]'     # tiktoken and bpe-openai; eai-delphi comes with `make test`
    .venv/bin/python bench/cost.py [--data data] [--per-sense 8] [--demo-latents 24] [--cache-discount 0.5]
"""

import argparse
import asyncio
import gzip
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assets.exemplars import ExemplarsConfig  # noqa: E402
from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings  # noqa: E402
from assets.explanations import ExplanationsConfig, explain_all  # noqa: E402
from assets.score_metrics import paired_means  # noqa: E402
from assets.scorers import SCORERS, ScorerDeps, scorer_settings  # noqa: E402
from assets.scores import score_partition  # noqa: E402
from resources.llm import LLMResource  # noqa: E402
from tests.planted_latents import CLASSES, SPLITS, planted_exemplars, scripted_llm  # noqa: E402
from tests.scripted_llm_server import ScriptedLLMServer  # noqa: E402

DEMO_CODER = "smollm2-topk/model.layers.15"
SCORED = ("detection", "fuzzing")
DELPHI = {"n_examples_train": 40, "n_examples_test": 50, "n_non_activating": 50, "per_prompt": 5}
"""delphi's defaults (`SamplerConfig`, `ConstructorConfig`, `RunConfig.num_examples_per_scorer_prompt`)."""
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
IM_START, IM_END, IM_SEP = 200264, 200265, 200266
"""The chat markers of OpenAI's o200k models."""
OPENAI_MIN, OPENAI_STEP, VLLM_BLOCK = 1024, 128, 16


def o200k():
    """tiktoken's `o200k_base`, offline: its ranks file from the `bpe-openai` package, put where tiktoken
    looks first (`TIKTOKEN_CACHE_DIR`, the file named by the SHA-1 of its URL); tiktoken checks its hash."""
    import importlib.util

    import tiktoken

    cache = Path(
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(tempfile.gettempdir()) / "tiktoken"))
    )
    target = cache / hashlib.sha1(O200K_URL.encode()).hexdigest()
    if not target.exists():
        package = importlib.util.find_spec("bpe_openai").submodule_search_locations[0]
        shipped = Path(package) / "data" / "o200k_base.tiktoken.gz"  # its data only, not its code
        cache.mkdir(parents=True, exist_ok=True)
        target.write_bytes(gzip.decompress(shipped.read_bytes()))
    return tiktoken.get_encoding("o200k_base")


class Tokens:
    """One tokenizer for every count: a chat as OpenAI's o200k models read it."""

    def __init__(self):
        self.enc = o200k()

    def text(self, text: str) -> list[int]:
        """Special tokens' names as plain text: delphi's prompts show `<|endoftext|>` so."""
        return self.enc.encode(text, disallowed_special=())

    def chat(self, messages: list[dict]) -> list[int]:
        out = []
        for m in messages:
            out += [IM_START, *self.text(m["role"]), IM_SEP, *self.text(m["content"]), IM_END]
        return out + [IM_START, *self.text("assistant"), IM_SEP]

    def usage(self, messages, answer: str) -> dict:
        """The scripted endpoint's `usage` of one answer."""
        prompt, completion = len(self.chat(messages)), len(self.text(answer))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def shared_prefixes(prompts: list[list[int]]) -> list[int]:
    """Per prompt, in the order sent: how many of its leading tokens, in whole blocks of `VLLM_BLOCK`,
    some earlier prompt began with (a chain of block hashes, as vLLM keys its cache)."""
    seen, out = set(), []
    for tokens in prompts:
        key, matched, matching = 0, 0, True
        for k in range(len(tokens) // VLLM_BLOCK):
            key = hash((key, tuple(tokens[k * VLLM_BLOCK : (k + 1) * VLLM_BLOCK])))
            matching = matching and key in seen
            matched += VLLM_BLOCK if matching else 0
            seen.add(key)
        out.append(matched)
    return out


def cached_openai(shared: int) -> int:
    """OpenAI: a prefix is cached from 1,024 tokens on, in steps of 128."""
    return shared // OPENAI_STEP * OPENAI_STEP if shared >= OPENAI_MIN else 0


def cached_vllm(shared: int, length: int) -> int:
    """vLLM: whole blocks of 16, but the last token is always computed."""
    return min(shared, (length - 1) // VLLM_BLOCK * VLLM_BLOCK)


def account(prompts: list[list[int]], completions: list[int], discount: float) -> dict:
    """Tokens, cached prompt tokens under both rules, and what OpenAI would bill, of one run's requests."""
    shared = shared_prefixes(prompts)
    prompt = sum(map(len, prompts))
    openai = sum(map(cached_openai, shared))
    vllm = sum(cached_vllm(s, len(p)) for s, p in zip(shared, prompts, strict=True))
    completion = sum(completions)
    return {
        "requests": len(prompts),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_openai": openai,
        "cached_vllm": vllm,
        "billed": prompt - openai * discount + completion,
    }


# ---- our pipeline ----------------------------------------------------------------------------------


def demo_answer(messages: list[dict]) -> str:
    """A scripted model for the demo coder's latents, in our answer formats: the commonest marked token
    as the explanation; a judge's list of as many 0s and 1s as the prompt has examples."""
    user = messages[1]["content"]
    if "Description:" not in user:
        marked = Counter(m.strip() for m in re.findall(r"<<(.*?)>>", user)).most_common(1)
        return f"Explanation: the token '{marked[0][0] if marked else ''}'"
    return str([i % 2 for i in range(len(re.findall(r"^Example \d+: ", user, re.MULTILINE)))])


async def explain_and_score(base_url: str, exemplars: pd.DataFrame, vocab: list[str]):
    client = LLMResource(
        backend="openai", base_url=base_url, model="scripted", max_concurrency=16, cache_dir=""
    ).client()
    explanations = await explain_all(
        EXPLAINERS["highlighted"](ExplainerSettings(), ExplainerDeps(llm=client)),
        ExplanationsConfig(),
        exemplars,
        None,
        sorted(int(x) for x in exemplars["latent"].unique()),
        vocab,
        embed=None,
    )
    settings = scorer_settings()
    scores = {}
    for name in SCORED:
        scorer = SCORERS[name](settings[name], ScorerDeps(llm=client))
        scores[name] = (await score_partition(scorer, exemplars, explanations, vocab))[0]
    return explanations, scores


def run_ours(tokens: Tokens, reply, exemplars: pd.DataFrame, vocab: list[str], discount: float):
    """Our explainer and scorers on `exemplars` against the counting endpoint."""
    answered = []

    def usage(messages, answer):  # called on the server's one event-loop thread
        counted = tokens.usage(messages, answer)
        answered.append(counted["completion_tokens"])
        return counted

    with ScriptedLLMServer(reply, usage=usage) as server:
        explanations, scores = asyncio.run(explain_and_score(server.base_url, exemplars, vocab))
    prompts = [tokens.chat(r["messages"]) for r in server.requests]
    return explanations, scores, account(prompts, answered, discount)


def gap(frame: pd.DataFrame) -> float:
    score, control, _ = paired_means(frame["balanced_accuracy"], frame["control_balanced_accuracy"])
    return round(score - control, 3)


# ---- delphi's prompts for the same latents ---------------------------------------------------------


def delphi_code():
    """delphi's explainer and scorers, imported without running `delphi.clients`' package module (it
    imports vLLM) and with a stand-in for aiofiles (only its explanation loaders use it); the prompt
    builders need neither."""
    import delphi

    if "delphi.clients" not in sys.modules:
        clients = types.ModuleType("delphi.clients")
        clients.__path__ = [str(Path(delphi.__file__).parent / "clients")]
        sys.modules["delphi.clients"] = clients
        from delphi.clients.client import Client

        clients.Client = Client
    sys.modules.setdefault("aiofiles", types.ModuleType("aiofiles"))
    from delphi import explainers, scorers
    from delphi.latents import latents, samplers

    return types.SimpleNamespace(
        DefaultExplainer=explainers.DefaultExplainer,
        DetectionScorer=scorers.DetectionScorer,
        FuzzingScorer=scorers.FuzzingScorer,
        ActivatingExample=latents.ActivatingExample,
        NonActivatingExample=latents.NonActivatingExample,
        Latent=latents.Latent,
        LatentRecord=latents.LatentRecord,
        normalize_activations=samplers.normalize_activations,
    )


def cycled(rows: list, n: int) -> list:
    """n rows, the latent's own in turn: delphi's counts from the windows the latent has."""
    return [rows[i % len(rows)] for i in range(n)] if rows else []


def delphi_record(d, windows: pd.DataFrame, vocab: list[str]):
    """A delphi `LatentRecord` at delphi's default counts from one latent's exemplar windows."""
    import torch

    def example(row, activating: bool):
        tokens = torch.tensor(list(row.tokens))
        acts = torch.tensor(list(row.activations), dtype=torch.float32)
        strs = [vocab[t] for t in row.tokens]
        if activating:
            return d.ActivatingExample(tokens, acts, str_tokens=strs, quantile=int(row.quantile))
        return d.NonActivatingExample(tokens, acts, str_tokens=strs, distance=-1.0)

    rows = list(windows.itertuples())
    train = [r for r in rows if r.split == "train" and r.kind == "activating"]
    test = [r for r in rows if r.split == "test" and r.kind == "activating"]
    silent = [r for r in rows if r.split == "test" and r.kind != "activating"]
    top = max(float(r.max_activation) for r in train + test)
    record = d.LatentRecord(d.Latent("", int(rows[0].latent)))
    record.train = d.normalize_activations(
        [example(r, True) for r in cycled(train, DELPHI["n_examples_train"])], top
    )
    record.test = d.normalize_activations(
        [example(r, True) for r in cycled(test, DELPHI["n_examples_test"])], top
    )
    record.not_active = [example(r, False) for r in cycled(silent, DELPHI["n_non_activating"])]
    return record


def delphi_requests(d, record, explanation: str) -> list[tuple[list[dict], str]]:
    """Every (prompt, perfect answer) delphi would send for one latent: explain, then detect and fuzz."""
    explainer = d.DefaultExplainer(client=None, threshold=0.3)
    out = [(explainer._build_prompt(record.train), f"[EXPLANATION]: {explanation}")]
    record.explanation = explanation
    for scorer in (
        d.DetectionScorer(None, n_examples_shown=DELPHI["per_prompt"]),
        d.FuzzingScorer(None, n_examples_shown=DELPHI["per_prompt"]),
    ):
        samples = scorer._prepare(record)
        scorer.rng.shuffle(samples)  # as `Classifier.__call__` does
        for batch in scorer._batch(samples):
            answer = "[" + ",".join(str(int(s.data.activating)) for s in batch) + "]"
            out.append((scorer._build_prompt(explanation, batch), answer))
    return out


def run_delphi(tokens: Tokens, exemplars, explanations, vocab: list[str], discount: float) -> dict:
    d = delphi_code()
    text_of = dict(zip(explanations["latent"], explanations["explanation"], strict=True))
    prompts, answers = [], []
    for latent, windows in exemplars.groupby("latent", sort=True):
        record = delphi_record(d, windows, vocab)
        for messages, answer in delphi_requests(d, record, text_of.get(latent, "")):
            prompts.append(tokens.chat(messages))
            answers.append(len(tokens.text(answer)))
    return account(prompts, answers, discount)


# ---- the latent sets -------------------------------------------------------------------------------


def planted_set(per_sense: int):
    """Single-sense planted latents with our default window counts, and the vocabulary."""
    from resources.subject_model import load_tokenizer

    config = ExemplarsConfig()
    n_hard, n_random = SPLITS["test"][1:]
    assert n_hard + n_random == config.n_non_activating
    splits = {
        "train": (config.n_examples_train, 0, 0),
        "valid": SPLITS["valid"],
        "test": (config.n_examples_test, n_hard, n_random),
    }
    classes = list(CLASSES)
    latents = {i: (classes[i % len(classes)],) for i in range(per_sense * len(classes))}
    tokenizer = load_tokenizer()
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return planted_exemplars(tokenizer, latents, seed=0, splits=splits), vocab, vocab


def demo_set(data: Path, n: int):
    """The first n latents of the demo coder's shard 00 as `make demo` wrote them, or None."""
    from assets.prompts import corpus_prompt_vocab
    from storage.corpus import load_corpus
    from storage.layout import DataRoot

    root = DataRoot.at(data)
    path = root.exemplars_path(DEMO_CODER, "00")
    if not path.exists() or not root.corpus_meta_path.exists():
        return None
    frame = pd.read_parquet(path)
    keep = sorted(frame["latent"].unique())[:n]
    corpus = load_corpus(root)
    frame = frame[frame["latent"].isin(keep)].reset_index(drop=True)
    return frame, corpus_prompt_vocab(corpus), corpus.vocab


def per_latent(totals: dict, latents: int) -> dict:
    return {k: round(v / latents, 1) for k, v in totals.items()}


def summed(parts: list[dict]) -> dict:
    return {k: sum(p[k] for p in parts) for k in parts[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="`make demo`'s data root")
    parser.add_argument("--per-sense", type=int, default=8, help="planted latents per sense")
    parser.add_argument("--demo-latents", type=int, default=24)
    parser.add_argument(
        "--cache-discount",
        type=float,
        default=0.5,
        help="share of the price taken off cached prompt tokens",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    tokens = Tokens()

    sets = {"planted": planted_set(args.per_sense)}
    demo = demo_set(args.data, args.demo_latents)
    if demo is None:
        print(
            f"no demo exemplars under {args.data} ({DEMO_CODER}|00): run `make demo`; planted only"
        )
    else:
        sets["demo"] = demo
    coders, ours_all, delphi_all, gaps, latents = {}, [], [], {}, 0
    for name, (exemplars, vocab, raw_vocab) in sets.items():
        exemplars = exemplars.assign(
            latent=exemplars["latent"].astype(int)
        )  # one dtype for the groupings below
        reply = scripted_llm if name == "planted" else demo_answer
        explanations, scores, ours = run_ours(tokens, reply, exemplars, vocab, args.cache_discount)
        delphi = run_delphi(tokens, exemplars, explanations, raw_vocab, args.cache_discount)
        n = exemplars["latent"].nunique()
        latents += n
        windows = exemplars.groupby(["split", "kind"]).size() / n
        coders[name] = {
            "latents": n,
            "windows_per_latent": {f"{s}/{k}": round(v, 1) for (s, k), v in windows.items()},
            "ours": per_latent(ours, n),
            "delphi": per_latent(delphi, n),
        }
        if name == "planted":
            gaps = {f"planted_{s}_gap": gap(scores[s]) for s in SCORED}
        ours_all.append(ours)
        delphi_all.append(delphi)
        print(f"{name}: {n} latents; ours {coders[name]['ours']}; delphi {coders[name]['delphi']}")

    ours, delphi = summed(ours_all), summed(delphi_all)

    def total(t: dict) -> int:
        return t["prompt_tokens"] + t["completion_tokens"]

    print(
        json.dumps(
            {
                "tokenizer": "tiktoken o200k_base (ranks shipped by bpe-openai)",
                "latents": latents,
                "tokens_per_latent": round(total(ours) / latents, 1),
                "delphi_tokens_per_latent": round(total(delphi) / latents, 1),
                "ratio_to_delphi": round(total(ours) / total(delphi), 3),
                "billed_per_latent": round(ours["billed"] / latents, 1),
                "delphi_billed_per_latent": round(delphi["billed"] / latents, 1),
                "cache_discount": args.cache_discount,
                "cached_prefix_fraction": round(ours["cached_openai"] / ours["prompt_tokens"], 3),
                "cached_prefix_fraction_vllm": round(
                    ours["cached_vllm"] / ours["prompt_tokens"], 3
                ),
                "delphi_cached_prefix_fraction": round(
                    delphi["cached_openai"] / delphi["prompt_tokens"], 3
                ),
                "delphi_cached_prefix_fraction_vllm": round(
                    delphi["cached_vllm"] / delphi["prompt_tokens"], 3
                ),
                "requests_per_latent": round(ours["requests"] / latents, 2),
                "delphi_requests_per_latent": round(delphi["requests"] / latents, 2),
                **gaps,
                "coders": coders,
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
