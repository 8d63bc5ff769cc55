"""Every prompt template of the explainers and scorers, and the parsers of their answers, in one place.

Examples are rendered from token strings; active tokens are wrapped in `<<` `>>` (runs of active
tokens share one pair), as in delphi's highlighted-token format.
"""
from __future__ import annotations

import re

EXPLAINER_SYSTEM = (
    "You study single features of a language model. You are shown text examples in which the tokens "
    "where the feature fires are wrapped in << and >>. After each example, the marked tokens are "
    "listed with the feature's strength on a 0-10 scale. Work out what the marked tokens have in "
    "common, taking their context into account, and describe it in one short phrase. Answer with a "
    "single line of the form 'Explanation: <phrase>'."
)

CONTRASTIVE_SYSTEM = EXPLAINER_SYSTEM + (
    " You are also shown counter-examples, similar texts in which the feature does not fire at all: "
    "your description must fit the marked tokens and not the counter-examples."
)

TOKEN_TABLE_SYSTEM = (
    "You study single features of a language model. Each text example is listed one token per line, "
    "followed by a tab and the feature's strength on that token on a 0-10 scale (0 = not firing). Work "
    "out what the tokens with high values have in common, taking their context into account, and "
    "describe it in one short phrase. Answer with a single line of the form 'Explanation: <phrase>'."
)

TOP_TOKENS_SYSTEM = (
    "You study single features of a language model. You are given the vocabulary tokens on which the "
    "feature fires most strongly on average, with their average strength. Describe in one short phrase "
    "what these tokens have in common. Answer with a single line of the form 'Explanation: <phrase>'."
)

DETECTION_SYSTEM = (
    "You check descriptions of a language-model feature against text. You are given a description "
    "and numbered text examples. For each example, answer 1 if the feature described would fire "
    "somewhere in it and 0 if not. Answer with only a list of 0s and 1s, one per example, e.g. [1, 0, 1]."
)

FUZZING_SYSTEM = (
    "You check descriptions of a language-model feature against text. You are given a description "
    "and numbered text examples in which some tokens are wrapped in << and >>. For each example, "
    "answer 1 if the marked tokens are what the description is about and 0 if not. Answer with "
    "only a list of 0s and 1s, one per example, e.g. [1, 0, 1]."
)

INTRUDER_SYSTEM = (
    "You study single features of a language model. You are shown numbered text examples with some "
    "tokens wrapped in << and >>. In all examples but one, the marked tokens are where one feature "
    "fires, so they share something. One example is an intruder: its marked tokens do not fit with "
    "the others. Answer with only the intruder's number in a list, e.g. [2]."
)

SIMULATION_SYSTEM = (
    "You predict how a language-model feature fires on text. You are given a description of the "
    "feature and a text split into numbered tokens. For every token, predict the feature's strength "
    "on it from 0 (not firing, most tokens) to 10 (firing strongest), judging each token in its "
    "context. Answer with only a list of integers, one per token, in order, e.g. [0, 0, 7, 0]."
)

SURPRISAL_DESCRIPTION = "Description of the sentences below: {explanation}\nSentences:\n"
SURPRISAL_NO_DESCRIPTION = "Various unrelated sentences."


def highlight(token_strs: list[str], marked: list[bool]) -> str:
    """Join tokens, wrapping each run of marked tokens in << >>."""
    out, inside = [], False
    for text, is_marked in zip(token_strs, marked):
        if is_marked and not inside:
            out.append("<<")
        if not is_marked and inside:
            out.append(">>")
        out.append(text)
        inside = is_marked
    if inside:
        out.append(">>")
    return "".join(out).replace("\n", " ")


def scaled(activations: list[float], max_activation: float) -> list[int]:
    """Activations on OpenAI's 0-10 integer scale relative to the latent's maximum."""
    top = max(max_activation, 1e-9)
    return [min(10, max(0, round(10 * a / top))) for a in activations]


def explainer_messages(examples: list[tuple[list[str], list[float]]], max_activation: float) -> list[dict]:
    parts = []
    for i, (token_strs, acts) in enumerate(examples, start=1):
        marks = [a > 0 for a in acts]
        listed = ", ".join(f"{t.strip() or repr(t)} ({s})" for t, a, s in zip(token_strs, acts, scaled(acts, max_activation)) if a > 0)
        parts.append(f"Example {i}: {highlight(token_strs, marks)}\nMarked: {listed}")
    return [
        {"role": "system", "content": EXPLAINER_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts) + "\n\nWhat does the feature fire on?"},
    ]


def contrastive_messages(examples: list[tuple[list[str], list[float]]], counter_examples: list[list[str]], max_activation: float) -> list[dict]:
    messages = explainer_messages(examples, max_activation)
    counters = "\n".join(f"Counter-example {i}: {''.join(tokens)}".replace("\n", " ") for i, tokens in enumerate(counter_examples, start=1))
    user = messages[1]["content"].replace("\n\nWhat does the feature fire on?", f"\n\n{counters}\n\nWhat does the feature fire on?")
    return [{"role": "system", "content": CONTRASTIVE_SYSTEM}, {"role": "user", "content": user}]


def token_table_messages(examples: list[tuple[list[str], list[float]]], max_activation: float) -> list[dict]:
    tables = []
    for i, (token_strs, acts) in enumerate(examples, start=1):
        lines = "\n".join(f"{t!r}\t{s}" for t, s in zip(token_strs, scaled(acts, max_activation)))
        tables.append(f"Example {i}:\n{lines}")
    return [{"role": "system", "content": TOKEN_TABLE_SYSTEM}, {"role": "user", "content": "\n\n".join(tables) + "\n\nWhat does the feature fire on?"}]


def top_tokens_messages(tokens: list[str], mean_activations: list[float]) -> list[dict]:
    top = max(mean_activations, default=1.0)
    listed = "\n".join(f"{t!r}: {s}" for t, s in zip(tokens, scaled(mean_activations, top)))
    return [{"role": "system", "content": TOP_TOKENS_SYSTEM}, {"role": "user", "content": f"Tokens (average strength, 0-10):\n{listed}\n\nWhat does the feature fire on?"}]


def scorer_messages(system: str, explanation: str, texts: list[str]) -> list[dict]:
    numbered = "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts, start=1))
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Description: {explanation}\n\n{numbered}\n\nAnswer with {len(texts)} numbers in a list."},
    ]


def intruder_messages(texts: list[str]) -> list[dict]:
    numbered = "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts, start=1))
    return [
        {"role": "system", "content": INTRUDER_SYSTEM},
        {"role": "user", "content": f"{numbered}\n\nWhich example is the intruder? Answer with one number from 1 to {len(texts)} in a list."},
    ]


def simulation_messages(explanation: str, token_strs: list[str]) -> list[dict]:
    listed = "\n".join(f"{i}\t{t!r}" for i, t in enumerate(token_strs, start=1))
    return [
        {"role": "system", "content": SIMULATION_SYSTEM},
        {"role": "user", "content": f"Description: {explanation}\n\nTokens:\n{listed}\n\nAnswer with {len(token_strs)} integers from 0 to 10 in a list."},
    ]


_PREFIX = re.compile(r"^\s*(?:\[?explanation\]?\s*[:\-]\s*|answer\s*:\s*|\d+[.)]\s*|[-*•]\s*)", re.IGNORECASE)


def parse_explanation(text: str) -> str | None:
    """The explanation in a model's answer, without labels, numbering, quotes or a trailing period."""
    match = re.search(r"explanation\]?\s*[:\-]\s*(.+)", text, re.IGNORECASE)
    candidate = match.group(1) if match else next((line for line in text.splitlines() if line.strip()), "")
    candidate = candidate.strip().splitlines()[0] if candidate.strip() else ""
    previous = None
    while previous != candidate:
        previous = candidate
        candidate = _PREFIX.sub("", candidate).strip().strip("\"'`*").strip()
    candidate = candidate.rstrip(".").strip()
    return candidate or None


def parse_int_list(text: str, n: int, lo: int, hi: int) -> list[int] | None:
    """A list of `n` integers in [lo, hi]: a bracketed list if there is one, else the first `n` such integers."""
    for body in re.findall(r"\[([^\]]*)\]", text):
        values = [int(v) for v in re.findall(r"\d+", body)]
        if len(values) == n and all(lo <= v <= hi for v in values):
            return values
    unlabelled = re.sub(r"(example|token)\s*\d+\s*[:.)\-]?", " ", text, flags=re.IGNORECASE)
    values = [int(v) for v in re.findall(r"(?<!\d)\d+(?!\d)", unlabelled) if lo <= int(v) <= hi]
    return values[:n] if len(values) >= n else None
