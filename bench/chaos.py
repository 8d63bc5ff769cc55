"""Explaining and scoring against an endpoint that misbehaves on 30% of its requests: nothing misread.

Builds latents whose truth is known (latent L fires exactly on its own word, in otherwise neutral
sentences of real tokens of the embedded model), and a scripted OpenAI-compatible judge on
127.0.0.1 that answers from that truth: the explainer names the marked word, detection, fuzzing and
simulation answer correctly for whatever explanation they are given (so the shuffled-explanation
control scores low). Then runs explanations and the detection, fuzzing and simulation scorers
(each with its control) three times:

1. against the truthful judge with no faults: the reference;
2. against the same judge answering 30% of requests with a fault: 429 with Retry-After, 500, 503,
   a reset connection, a stall past the client's timeout, a body cut short, a 200 that is not JSON,
   prose instead of the list (several lines of it, for explanations), or a list of the wrong length;
3. again on run 2's data root and response cache with the faults stopped.

In run 2 the explanations of the first `--lose-explanations` latents (default 1) are always answered
with prose, so they are lost, and run 3 explains and scores them: a latent that gains an explanation.

`misread` counts explanations and scored examples of run 2 that differ from the reference: a faulty
answer that was taken for a real one. `rerun_equals_fault_free` says whether run 3 equals the
reference (every latent scored, same tables; the token counts aside, which count both turns where a
question was answered on its follow-up in run 2 and replayed from the cache in run 3). Beside
`rerun_requests`: `lost_questions` (explanations and scorer questions run 2 lost), `rerun_repeats`
(run 3's requests that run 2 had sent too: lost questions asked again) and `rerun_new_prompts` (those
never sent before: what the gained explanations need, their own and control questions and one
neighbour's control; `rerun_bound` allows 3 jobs' questions per lost explanation). Prints a JSON object
as its last line.

    .venv/bin/python bench/chaos.py [--latents 200] [--fault-rate 0.3] [--lose-explanations 1]
"""

import argparse
import asyncio
import collections
import json
import math
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assets.explainers import EXPLAINERS, ExplainerDeps, ExplainerSettings  # noqa: E402
from assets.explanations import ExplanationsConfig, explain_all  # noqa: E402
from assets.prompts import prompt_vocab  # noqa: E402
from assets.scorers import SCORERS, ScorerDeps, scorer_settings  # noqa: E402
from assets.scores import score_partition  # noqa: E402
from resources.llm import LLMResource  # noqa: E402
from resources.subject_model import load_tokenizer  # noqa: E402
from tests.scripted_llm_server import Fault, ScriptedLLMServer  # noqa: E402

SCORED = ("detection", "fuzzing", "simulation")
TEMPLATES = [
    "Yesterday I saw a {} near the old house.",
    "She said the {} was the best part of the trip.",
    "Nobody expected the {} to be there in the morning.",
    "A small {} appeared in the photo.",
    "He wrote a long story about a {} and a friend.",
    "There is a {} in every picture she drew.",
    "We talked about the {} all evening.",
    "Her letter mentioned a {} twice.",
]
NEUTRAL = ["table", "letter", "window", "bottle", "ticket", "chair", "garden", "pencil"]
FAULTS = ("429", "500", "503", "reset", "timeout", "truncated", "not_json", "prose", "wrong_length")


def latent_words(tokenizer, n: int) -> list[str]:
    """n lowercase English-looking words that are one token each (with their leading space)."""
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    taken = {w for t in TEMPLATES for w in re.findall(r"[a-z]+", t)} | set(NEUTRAL)
    words = sorted({t[1:] for t in vocab if re.fullmatch(r" [a-z]{5,9}", t) and t[1:] not in taken})
    return random.Random(0).sample(words, n)


def exemplars_for(words: list[str], tokenizer) -> pd.DataFrame:
    """Per latent: 6 activating windows to explain, 5 activating and 5 silent ones to score."""
    rows = []
    for latent, word in enumerate(words):
        for i, template in enumerate(TEMPLATES[:6] + TEMPLATES[:5]):
            ids = tokenizer(template.format(word), add_special_tokens=False)["input_ids"]
            acts = [
                1.0 + 0.2 * (i % 5) if tokenizer.decode([t]).strip() == word else 0.0 for t in ids
            ]
            split = "train" if i < 6 else "test"
            rows.append(
                {
                    "latent": latent,
                    "split": split,
                    "kind": "activating",
                    "quantile": i % 5 + 1 if split == "test" else 0,
                    "tokens": ids,
                    "activations": acts,
                }
            )
        for i in range(5):
            ids = tokenizer(
                TEMPLATES[i].format(NEUTRAL[(latent + i) % len(NEUTRAL)]), add_special_tokens=False
            )["input_ids"]
            rows.append(
                {
                    "latent": latent,
                    "split": "test",
                    "kind": "random",
                    "quantile": -1,
                    "tokens": ids,
                    "activations": [0.0] * len(ids),
                }
            )
    return pd.DataFrame(rows).assign(
        sequence=0, start=0, max_activation=lambda f: f["activations"].map(max)
    )


def truthful(messages) -> str:
    """The answer a perfect judge gives, read from the first user turn (also when it is asked again)."""
    system, user = messages[0]["content"], messages[1]["content"]
    if "Explanation: <phrase>" in system:
        marked = [m.strip() for m in re.findall(r"<<(.*?)>>", user)]
        return f"Explanation: the word {collections.Counter(marked).most_common(1)[0][0]}"
    word = re.search(r"Description: the word (\w+)", user).group(1)
    if "predict how" in system:
        tokens = re.findall(r'^\d+\t"(.*)"$', user, re.MULTILINE)
        return str([10 if t.strip() == word else 0 for t in tokens])
    examples = re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)
    if "marked tokens are what" in system:
        return str(
            [int(any(m.strip() == word for m in re.findall(r"<<(.*?)>>", e))) for e in examples]
        )
    return str([int(re.search(rf"(?<!\w){word}(?!\w)", e) is not None) for e in examples])


class FaultyJudge:
    """The truthful judge, with a seeded share of requests answered by a fault instead."""

    def __init__(self, rate: float, seed: int = 0, lost_words: frozenset[str] = frozenset()):
        self.rate, self.rng, self.lock = rate, random.Random(seed), threading.Lock()
        self.faults = collections.Counter()
        self.lost_answers = {f"Explanation: the word {word}" for word in lost_words}
        """Explanations answered with prose every time they are asked."""

    def __call__(self, messages):
        with self.lock:
            kind = self.rng.choice(FAULTS) if self.rng.random() < self.rate else None
            if kind:
                self.faults[kind] += 1
        answer = truthful(messages)
        kind = "prose" if answer in self.lost_answers else kind
        if kind is None:
            return answer
        if kind == "prose":
            if answer.startswith("Explanation"):
                return "These examples are hard to pin down.\nSome mention objects, others places."
            return "Examples 1, 2 and 4 fire; the others do not."
        if kind == "wrong_length":
            return (
                answer[:-1] + ", 0]"
                if answer.startswith("[")
                else "Looking at them:\n- objects\n- places"
            )
        return {
            "429": (429, {"retry-after-ms": "20"}),
            "500": 500,
            "503": 503,
            "reset": Fault("reset"),
            "timeout": Fault("stall", 2.0),
            "truncated": Fault("truncated"),
            "not_json": Fault("not_json"),
        }[kind]


async def explain_and_score(client, exemplars, vocab):
    latents = sorted(int(latent) for latent in exemplars.latent.unique())
    explanations = await explain_all(
        EXPLAINERS["highlighted"](ExplainerSettings(), ExplainerDeps(llm=client)),
        ExplanationsConfig(),
        exemplars,
        None,
        latents,
        vocab,
        embed=None,
    )
    settings = scorer_settings()
    scores = {}
    for name in SCORED:
        scores[name] = await score_partition(
            SCORERS[name](settings[name], ScorerDeps(llm=client)), exemplars, explanations, vocab
        )
    return explanations, scores


def run(reply, exemplars, vocab, cache_dir: Path, port: int = 0):
    with ScriptedLLMServer(reply, port=port) as server:
        llm = LLMResource(
            backend="openai",
            base_url=server.base_url,
            model="scripted",
            max_concurrency=32,
            timeout_s=1.0,
            cache_dir=str(cache_dir),
        )
        client = llm.client()
        client.backoff_s = (
            0.01  # the faults come fast; the schedule of waits is what is tested elsewhere
        )
        started = time.perf_counter()
        explanations, scores = asyncio.run(explain_and_score(client, exemplars, vocab))
        return (
            explanations,
            scores,
            list(server.requests),
            time.perf_counter() - started,
            client.ledger,
            server.port,
        )


def scored_items(explanations, scores) -> dict:
    """Every judged thing of a run, keyed: explanations by latent, examples by (scorer, latent, source, example)."""
    items = {
        ("explanation", int(r.latent)): r.explanation
        for r in explanations.itertuples()
        if r.status == "ok"
    }
    for name, (_, examples) in scores.items():
        value = "simulated" if name == "simulation" else "prediction"
        for r in examples.itertuples():
            items[(name, int(r.latent), r.source, int(r.example))] = json.dumps(
                getattr(r, value), default=float
            )
    return items


def failures(explanations, scores) -> list[dict]:
    out = [
        {"latent": int(r.latent), "stage": "explanations", "reason": r.error[:160]}
        for r in explanations.itertuples()
        if r.status != "ok"
    ]
    for name, (frame, _) in scores.items():
        for r in frame.itertuples():
            if r.n_failed:
                out.append(
                    {
                        "latent": int(r.latent),
                        "stage": name,
                        "reason": "; ".join(json.loads(r.failures))[:160],
                    }
                )
    return out


def lost_questions(explanations, scores) -> int:
    """Questions run 2 ended without a value: each failed explanation, and each failure a score row lists."""
    return int((explanations.status != "ok").sum()) + sum(
        len(json.loads(f)) for frame, _ in scores.values() for f in frame.failures
    )


def prompt(request) -> str:
    return json.dumps(request["messages"], sort_keys=True) + str(request.get("max_tokens"))


TOKEN_COUNTS = ["prompt_tokens", "completion_tokens"]


def tables(explanations, scores) -> list[pd.DataFrame]:
    return [
        frame.reset_index(drop=True)
        for frame in [explanations, *(part for name in SCORED for part in scores[name])]
    ]


def same_tables(a, b) -> bool:
    """Whether two runs wrote the same tables, token counts aside."""
    try:
        for x, y in zip(tables(*a), tables(*b), strict=False):
            pd.testing.assert_frame_equal(
                x.drop(columns=TOKEN_COUNTS, errors="ignore"),
                y.drop(columns=TOKEN_COUNTS, errors="ignore"),
            )
    except AssertionError as difference:
        print(f"tables differ: {str(difference)[:500]}")
        return False
    return True


def token_counts_differ(a, b) -> int:
    """Rows of two runs' tables whose token counts differ."""
    return sum(
        int((x[c] != y[c]).sum())
        for x, y in zip(tables(*a), tables(*b), strict=False)
        for c in TOKEN_COUNTS
        if c in x and c in y and len(x) == len(y)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=200)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument(
        "--lose-explanations",
        type=int,
        default=1,
        help="latents whose explanation run 2 always loses",
    )
    args = parser.parse_args()

    tokenizer = load_tokenizer()
    vocab = prompt_vocab(
        tokenizer.batch_decode([[i] for i in range(len(tokenizer))]), tokenizer.all_special_ids
    )
    words = latent_words(tokenizer, args.latents)
    exemplars = exemplars_for(words, tokenizer)
    with tempfile.TemporaryDirectory() as clean_dir, tempfile.TemporaryDirectory() as chaos_dir:
        ref_explanations, ref_scores, ref_sent, ref_s, _, _ = run(
            truthful, exemplars, vocab, Path(clean_dir)
        )
        judge = FaultyJudge(args.fault_rate, lost_words=frozenset(words[: args.lose_explanations]))
        explanations, scores, sent, chaos_s, ledger, port = run(
            judge, exemplars, vocab, Path(chaos_dir)
        )
        # the same endpoint (port) again, its faults stopped: the cache answers all that was answered well
        again_explanations, again_scores, rerun_sent, rerun_s, _, _ = run(
            truthful, exemplars, vocab, Path(chaos_dir), port=port
        )
    ref_requests, requests, rerun_requests = len(ref_sent), len(sent), len(rerun_sent)
    asked_before = {prompt(r) for r in sent}
    repeats = sum(prompt(r) in asked_before for r in rerun_sent)
    lost = lost_questions(explanations, scores)
    lost_explanations = int((explanations.status != "ok").sum())
    per_job = math.ceil(
        (ref_requests - args.latents) / (2 * args.latents)
    )  # one explanation a latent; a scoring job's questions

    reference, chaotic = (
        scored_items(ref_explanations, ref_scores),
        scored_items(explanations, scores),
    )
    misread = sum(chaotic[key] != reference.get(key) for key in chaotic)
    failed = failures(explanations, scores)
    failed_latents = sorted({f["latent"] for f in failed})
    print(
        f"reference: {ref_requests} requests in {ref_s:.1f} s; "
        f"with faults: {requests} requests ({sum(judge.faults.values())} faults), "
        f"{ledger.retries} retries, {lost} lost questions over {len(failed_latents)} latents, "
        f"{chaos_s:.1f} s; rerun: {rerun_requests} requests "
        f"({repeats} asked before, {rerun_requests - repeats} new), {rerun_s:.1f} s"
    )
    for f in failed[:10]:
        print(f"  latent {f['latent']} {f['stage']}: {f['reason']}")
    print(
        json.dumps(
            {
                "latents": args.latents,
                "fault_rate": args.fault_rate,
                "requests": requests,
                "faults": dict(sorted(judge.faults.items())),
                "retries": ledger.retries,
                "latents_scored": args.latents - len(failed_latents),
                "latents_failed": len(failed_latents),
                "failed": failed,
                "misread": misread,
                "items_compared": len(chaotic),
                "lost_questions": lost,
                "lost_explanations": lost_explanations,
                "rerun_requests": rerun_requests,
                "rerun_repeats": repeats,
                "rerun_new_prompts": rerun_requests - repeats,
                # the lost questions; per gained explanation its own, its control's and a
                # neighbour's control jobs
                "rerun_bound": lost + lost_explanations * 3 * per_job,
                "rerun_equals_fault_free": same_tables(
                    (again_explanations, again_scores), (ref_explanations, ref_scores)
                )
                and scored_items(again_explanations, again_scores) == reference,
                "rerun_token_counts_differ": token_counts_differ(
                    (again_explanations, again_scores), (ref_explanations, ref_scores)
                ),
                "fault_free_requests": ref_requests,
                "wall_s": {
                    "fault_free": round(ref_s, 1),
                    "faults": round(chaos_s, 1),
                    "rerun": round(rerun_s, 1),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
