"""Every prompt template of the explainers and scorers, and the parsers of their answers, in one place.

Examples are rendered from token strings; active tokens are wrapped in `<<` `>>` (runs of active
tokens share one pair), as in delphi's highlighted-token format. Tokens are shown as a judge can
read them (`prompt_vocab`): the subject model's special tokens become one visible document
boundary, and whitespace is made visible, so a latent that fires on line breaks can be explained
and judged. Answers are parsed strictly: a value list is read only when it is unambiguous, and
anything else is refused (and asked again by the caller), never guessed.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from resources.llm import Refusal

DOCUMENT_BOUNDARY = "‖"
TOKEN_LEGEND = (
    " In the texts, ↵ stands for a line break, ⇥ for a tab, ␣ for a space on its own, and ‖ for the "
    "boundary between two documents."
)

EXPLAINER_SYSTEM = (
    "You study single features of a language model. You are shown text examples in which the tokens "
    "where the feature fires are wrapped in << and >>. After each example, the marked tokens are "
    "listed with the feature's strength on a 0-10 scale. Work out what the marked tokens have in "
    "common, taking their context into account, and describe it in one short phrase. Answer with a "
    "single line of the form 'Explanation: <phrase>'." + TOKEN_LEGEND
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
    + TOKEN_LEGEND
)

TOP_TOKENS_SYSTEM = (
    "You study single features of a language model. You are given the vocabulary tokens on which the "
    "feature fires most strongly on average, with their average strength. Describe in one short phrase "
    "what these tokens have in common. Answer with a single line of the form 'Explanation: <phrase>'."
    + TOKEN_LEGEND
)

DETECTION_SYSTEM = (
    "You check descriptions of a language-model feature against text. You are given a description "
    "and numbered text examples. For each example, answer 1 if the feature described would fire "
    "somewhere in it and 0 if not. Answer with only a list of 0s and 1s, one per example, e.g. [1, 0, 1]."
    + TOKEN_LEGEND
)

FUZZING_SYSTEM = (
    "You check descriptions of a language-model feature against text. You are given a description "
    "and numbered text examples in which some tokens are wrapped in << and >>. For each example, "
    "answer 1 if the marked tokens are what the description is about and 0 if not. Answer with "
    "only a list of 0s and 1s, one per example, e.g. [1, 0, 1]." + TOKEN_LEGEND
)

INTRUDER_SYSTEM = (
    "You study single features of a language model. You are shown numbered text examples with some "
    "tokens wrapped in << and >>. In all examples but one, the marked tokens are where one feature "
    "fires, so they share something. One example is an intruder: its marked tokens do not fit with "
    "the others. Answer with only the intruder's number in a list, e.g. [2]." + TOKEN_LEGEND
)

SIMULATION_SYSTEM = (
    "You predict how a language-model feature fires on text. You are given a description of the "
    "feature and a text split into numbered tokens. For every token, predict the feature's strength "
    "on it from 0 (not firing, most tokens) to 10 (firing strongest), judging each token in its "
    "context. Answer with only a list of integers, one per token, in order, e.g. [0, 0, 7, 0]."
    + TOKEN_LEGEND
)

SURPRISAL_DESCRIPTION = "Description of the sentences below: {explanation}\nSentences:\n"
SURPRISAL_NO_DESCRIPTION = "Various unrelated sentences."


_VISIBLE = str.maketrans({"\n": "↵", "\r": "↵", "\t": "⇥"})
_PLAIN = str.maketrans({"↵": "\n", "⇥": "\t", "␣": " ", DOCUMENT_BOUNDARY: "\n"})


@lru_cache(
    maxsize=1 << 16
)  # a vocabulary's worth: every window of every prompt renders its tokens through here
def visible_token(token: str) -> str:
    """A token as a judge sees it: line breaks and tabs as ↵ and ⇥, a token of spaces only as ␣s.
    Idempotent, so text that was already rendered renders the same."""
    shown = token.translate(_VISIBLE)
    return "␣" * len(shown) if shown and not shown.strip(" ") else shown


def prompt_vocab(vocab: list[str], special_ids) -> list[str]:
    """Token id → what prompts show: the subject model's special tokens (BOS, EOS, chat markers: in a
    corpus they separate documents) become one visible boundary, never their control-token text."""
    special = set(int(i) for i in special_ids)
    return [DOCUMENT_BOUNDARY if i in special else token for i, token in enumerate(vocab)]


def plain_text(rendered: str) -> str:
    """Rendered window text back to plain text, for embedders, which read whitespace as whitespace."""
    return rendered.translate(_PLAIN)


WINDOW_TEXT_VERSION = "1"
"""Version of `window_text`: part of the contexts table's name, so a change re-embeds the corpus windows."""


def window_text(token_strs: list[str]) -> str:
    """A window as embedders read it: the prompt rendering (a document boundary as a line break), in
    plain text. The contexts table and the embedding scorer embed this same text, so the scorer reads
    a grid window's vector from the table instead of embedding it again."""
    return plain_text(highlight(token_strs, [False] * len(token_strs)))


@lru_cache(maxsize=1 << 17)
def token_text(token_str: str) -> str:
    """`window_text` of one token, remembered: a partition's windows hold ~150k tokens but a few thousand texts."""
    return window_text([token_str])


def window_embedding(embedder_model: str) -> str:
    """What the contexts table's vectors are: `embedder_model` on `window_text` at its version."""
    return f"{embedder_model}|window_text {WINDOW_TEXT_VERSION}"


def highlight(token_strs: list[str], marked: list[bool]) -> str:
    """Join tokens (made visible), wrapping each run of marked tokens in << >>."""
    if not any(marked):  # most windows a judge reads: no loop over the tokens
        return "".join(map(visible_token, token_strs))
    out, inside = [], False
    for text, is_marked in zip(token_strs, marked, strict=False):
        if is_marked and not inside:
            out.append("<<")
        if not is_marked and inside:
            out.append(">>")
        out.append(visible_token(text))
        inside = is_marked
    if inside:
        out.append(">>")
    return "".join(out)


def quoted(token: str) -> str:
    """A token standing alone in a list or table: visible, in quotes, so its leading space shows."""
    return f'"{visible_token(token)}"'


def scaled(activations: list[float], max_activation: float) -> list[int]:
    """Activations on OpenAI's 0-10 integer scale relative to the latent's maximum."""
    top = max(max_activation, 1e-9)
    return [min(10, max(0, round(10 * a / top))) for a in activations]


def chat(system: str, user: str) -> list[dict]:
    """One question: the instructions as the system message, then the user's text."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def numbered(texts: list[str]) -> str:
    """`Example 1: …` lines, the numbering every judge answers by."""
    return "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts, start=1))


def explainer_messages(
    examples: list[tuple[list[str], list[float]]], max_activation: float
) -> list[dict]:
    parts = []
    for i, (token_strs, acts) in enumerate(examples, start=1):
        marks = [a > 0 for a in acts]
        firing = [
            (t, a) for t, a in zip(token_strs, acts, strict=False) if a > 0
        ]  # scaled only where listed: rounding numpy scalars costs
        listed = ", ".join(
            f"{visible_token(t).strip() or visible_token(t)} ({s})"
            for (t, _), s in zip(
                firing, scaled([a for _, a in firing], max_activation), strict=False
            )
        )
        parts.append(f"Example {i}: {highlight(token_strs, marks)}\nMarked: {listed}")
    return chat(
        EXPLAINER_SYSTEM,
        "\n\n".join(parts) + "\n\nWhat does the feature fire on?",
    )


def contrastive_messages(
    examples: list[tuple[list[str], list[float]]],
    counter_examples: list[list[str]],
    max_activation: float,
) -> list[dict]:
    messages = explainer_messages(examples, max_activation)
    counters = "\n".join(
        f"Counter-example {i}: {highlight(tokens, [False] * len(tokens))}"
        for i, tokens in enumerate(counter_examples, start=1)
    )
    user = messages[1]["content"].replace(
        "\n\nWhat does the feature fire on?", f"\n\n{counters}\n\nWhat does the feature fire on?"
    )
    return chat(CONTRASTIVE_SYSTEM, user)


def token_table_messages(
    examples: list[tuple[list[str], list[float]]], max_activation: float
) -> list[dict]:
    tables = []
    for i, (token_strs, acts) in enumerate(examples, start=1):
        lines = "\n".join(
            f"{quoted(t)}\t{s}"
            for t, s in zip(token_strs, scaled(acts, max_activation), strict=False)
        )
        tables.append(f"Example {i}:\n{lines}")
    return chat(
        TOKEN_TABLE_SYSTEM,
        "\n\n".join(tables) + "\n\nWhat does the feature fire on?",
    )


def top_tokens_messages(tokens: list[str], mean_activations: list[float]) -> list[dict]:
    top = max(mean_activations, default=1.0)
    listed = "\n".join(
        f"{quoted(t)}: {s}" for t, s in zip(tokens, scaled(mean_activations, top), strict=False)
    )
    return chat(
        TOP_TOKENS_SYSTEM,
        f"Tokens (average strength, 0-10):\n{listed}\n\nWhat does the feature fire on?",
    )


def scorer_messages(system: str, explanation: str, texts: list[str]) -> list[dict]:
    return chat(
        system,
        f"Description: {explanation}\n\n{numbered(texts)}\n\nAnswer with {len(texts)} numbers in a list.",
    )


def intruder_messages(texts: list[str]) -> list[dict]:
    return chat(
        INTRUDER_SYSTEM,
        f"{numbered(texts)}\n\nWhich example is the intruder? Answer with one number "
        f"from 1 to {len(texts)} in a list.",
    )


def simulation_messages(explanation: str, token_strs: list[str]) -> list[dict]:
    listed = "\n".join(f"{i}\t{quoted(t)}" for i, t in enumerate(token_strs, start=1))
    return chat(
        SIMULATION_SYSTEM,
        f"Description: {explanation}\n\nTokens:\n{listed}\n\n"
        f"Answer with {len(token_strs)} integers from 0 to 10 in a list.",
    )


def reask_list_message(n: int, lo: int, hi: int) -> dict:
    """The one follow-up turn after an answer that could not be read as a value list."""
    example = ", ".join(str(lo + (i % (hi - lo + 1))) for i in range(min(n, 4)))
    return {
        "role": "user",
        "content": f"Your answer could not be read. Reply with only a list of exactly {n} "
        f"integers from {lo} to {hi}, like [{example}{', ...' if n > 4 else ''}], "
        "and nothing else.",
    }


def refine_message(shown: list[tuple[bool, str]], tried: list[str]) -> dict:
    """The follow-up turn of a refine round, after the explainer's own answer: the `valid` windows the
    explanation wrongly fits (`(True, plain text)`) and those it misses (`(False, text with the firing
    tokens marked)`), and revisions already tried that scored no better (so a round never repeats one)."""
    fits = [text for wrongly_fits, text in shown if wrongly_fits]
    misses = [text for wrongly_fits, text in shown if not wrongly_fits]
    parts = [
        "Your explanation was checked on other texts by a reader who saw only the explanation."
    ]
    if fits:
        parts.append(
            "It fits these texts, but the feature does not fire anywhere in them:\n"
            + "\n".join(f"Text {i}: {t}" for i, t in enumerate(fits, start=1))
        )
    if misses:
        parts.append(
            "It does not fit these texts, yet the feature fires in them (on the tokens in << and >>):\n"
            + "\n".join(f"Text {i}: {t}" for i, t in enumerate(misses, start=1))
        )
    if tried:
        parts.append("Already tried, and no better: " + "; ".join(f"'{t}'" for t in tried) + ".")
    parts.append(
        "Revise the explanation so that it fits the texts where the feature fires and not the others. "
        "Answer with a single line of the form 'Explanation: <phrase>'."
    )
    return {"role": "user", "content": "\n\n".join(parts)}


REASK_EXPLANATION = {
    "role": "user",
    "content": "Your answer could not be read. Reply with only one line of the form 'Explanation: <phrase>'.",
}


# ---- parsing answers -----------------------------------------------------------------------------


def strip_reasoning(text: str) -> str:
    """The answer without a reasoning preamble (`<think>…</think>`); empty when the reasoning never closed."""
    if re.search(r"</think>", text, re.IGNORECASE):
        text = re.split(r"</think>", text, flags=re.IGNORECASE)[-1]
    if re.search(r"<think>", text, re.IGNORECASE):
        return ""  # cut off while thinking: there is no answer
    text = re.sub(r"^\s*```[a-zA-Z]*\s*$", "", text, flags=re.MULTILINE)  # markdown code fences
    return text.strip()


_LABEL = re.compile(r"\**\[?\bexplanation\b\]?\**\s*:(?:\*\*)?\s*", re.IGNORECASE)
_LEADER = re.compile(r"^(?:\d+[.)]\s+|[-*•]\s+|answer\s*:\s*)", re.IGNORECASE)
_PAIRS = (('"', '"'), ("'", "'"), ("`", "`"), ("**", "**"), ("*", "*"), ("“", "”"), ("‘", "’"))
_ECHO = re.compile(
    r"\[?\b(?:explanation|description|answer|marked|tokens?|(?:counter-)?examples?\s*\d*)\b\]?\s*:|<phrase>",
    re.IGNORECASE,
)
"""The prompts' own labels and the answer template's placeholder: a model that only echoes them said nothing."""
_CONTINUED = re.compile(r"^[a-z0-9\"'“‘`(<]")


def _unwrap(text: str) -> str:
    """Remove one pair of quotes or emphasis that wraps the whole text, never quotes that belong to it."""
    for left, right in _PAIRS:
        inner = text[len(left) : len(text) - len(right)]
        if (
            len(text) > len(left) + len(right)
            and text.startswith(left)
            and text.endswith(right)
            and left not in inner
            and right not in inner
        ):
            return inner.strip()
    return text


def _continues(above: str, line: str) -> bool:
    """Whether `line` carries on the phrase `above` it, broken over lines: the phrase has not ended
    (no final . ! ?) and the line starts in lower case or with a quote or bracket, and is no list item
    or label. A capitalized line, an item or a label starts something else, which is not read."""
    return (
        not above.rstrip("*").endswith((".", "!", "?"))
        and bool(_CONTINUED.match(line))
        and not _LEADER.match(line)
        and not _LABEL.search(line)
    )


def _repetition(text: str) -> str | None:
    """A run of words said over and over (a model stuck in a loop): an n-gram repeated back to back at
    least 3 times and over at least 6 words ("is on is on is on"), or None. Shorter repeats ("very
    very", "ha ha ha") can be what a latent is about."""
    words = re.findall(r"\w+", text.casefold())
    for n in range(1, 9):
        times = max(3, -(-6 // n))
        for i in range(len(words) - n * times + 1):
            if all(words[i + k * n : i + (k + 1) * n] == words[i : i + n] for k in range(1, times)):
                return f"{' '.join(words[i : i + n])!r} repeated {times} or more times in a row"
    return None


def parse_explanation(text: str) -> str | Refusal:
    """The explanation in a model's answer, or a `Refusal` saying why there is none to read unambiguously.

    A line labelled 'Explanation:' is read (from the next line if the label stands alone), with the
    lines that continue its phrase (`_continues`); without a label, only a one-line answer is. Two
    different labelled explanations are refused (which one is meant would be a guess), and so is
    degenerate text: nothing but the prompt's labels, or words repeated in a loop. Numbering, bullets,
    repeated labels, a wrapping pair of quotes or emphasis and one final period are removed; quotes
    and punctuation inside the explanation are kept."""
    answer = strip_reasoning(text)
    if not answer:
        return Refusal(
            "cut off while reasoning"
            if re.search(r"<think>", text, re.IGNORECASE)
            else "empty answer"
        )
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    found = []
    for i, line in enumerate(lines):
        match = _LABEL.search(line)
        if match:
            parts, j = [line[match.end() :].strip()], i + 1
            if not parts[0] and j < len(lines):
                parts, j = [lines[j]], j + 1
            while j < len(lines) and _continues(parts[-1], lines[j]):
                parts.append(lines[j])
                j += 1
            if _LEADER.match(parts[0]) and j < len(lines) and _LEADER.match(lines[j]):
                return Refusal("a list of items under the label, not one explanation")
            found.append(" ".join(p for p in parts if p))
    if len(set(found)) > 1:
        return Refusal(
            f"{len(set(found))} different explanations: {' and '.join(repr(f) for f in dict.fromkeys(found))}"
        )
    if not found and len(lines) > 1:
        return Refusal("several lines and no 'Explanation:' label")
    candidate = found[0] if found else lines[0]
    if not _ECHO.sub("", candidate).strip(" *:."):
        return Refusal(
            f"only the prompt's labels: {candidate[:80]!r}"
            if _ECHO.search(candidate)
            else "nothing after the label"
            if found
            else "no explanation in the answer"
        )
    previous = None
    while previous != candidate:
        previous = candidate
        candidate = _unwrap(
            _LEADER.sub(
                "", _LABEL.sub("", candidate, count=1) if _LABEL.match(candidate) else candidate
            ).strip()
        )
        if candidate.endswith(".") and not candidate.endswith(".."):
            candidate = candidate[:-1].rstrip()
    if not candidate.strip(". "):
        return Refusal("no explanation, only punctuation")
    loop = _repetition(candidate)
    return Refusal(f"degenerate: {loop}") if loop else candidate


def read_int_list(n: int, lo: int, hi: int):
    """A reader for `ProductionClient.ask`: `parse_int_list`'s values, or a `Refusal` naming what was wanted."""
    return lambda text: (
        values
        if (values := parse_int_list(text, n, lo, hi)) is not None
        else Refusal(f"not a list of exactly {n} integers from {lo} to {hi}")
    )


_NUMBER_LIST = re.compile(r"\[\s*(-?\d+(?:\s*[,;\s]\s*-?\d+)*)\s*\]")
_LINE_INDEX = re.compile(
    r"^\W*(?:example|token|item|window|text)?\s*#?(\d+)\s*[:.)=\-]", re.IGNORECASE
)
_NUMBERED_LINE = re.compile(
    r"^\W*(?:example|token|item|window|text)?\s*#?(\d+)\s*[:.)=\-]\s*\**\s*(-?\d+|yes|no|true|false)\b",
    re.IGNORECASE,
)
_BARE = re.compile(r"^\s*-?\d+(?:\s*[,;\s]\s*-?\d+)*\s*\.?\s*$")
_SINGLE_PHRASES = (
    r"(?:example|number|#)\s*(\d+)\s+is\s+(?:the\s+)?(?:intruder|odd one out)",
    r"intruder\s+is\s+(?:example\s*|number\s*|#)?(\d+)",
    r"answer\s+is\s+(?:example\s*|number\s*|#)?(\d+)",
)
_WORDS = {"yes": 1, "true": 1, "no": 0, "false": 0}


def _ints(body: str) -> list[int]:
    return [int(v) for v in re.findall(r"-?\d+", body)]


def _from_json(text: str):
    """Values of an answer that is JSON: a list of integers, or an object holding one such list
    (structured output). `False` when it is JSON of another shape, None when it is not JSON."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))
    if isinstance(data, int) and not isinstance(data, bool):
        data = [data]
    if isinstance(data, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in data):
        return data
    return False


def parse_int_list(text: str, n: int, lo: int, hi: int) -> list[int] | None:
    """Exactly `n` integers in [lo, hi] from an answer, or None when the answer does not say them
    unambiguously. Read, in order: JSON; the part after a last 'answer:'; one distinct bracketed list;
    lines numbered 1..n (yes/no for 0/1 lists); a bare run of numbers; for n = 1, one stated choice
    ("example 3 is the intruder"). A list of another length or with values out of range is refused,
    never cut or padded."""
    body = strip_reasoning(text)

    def valid(values: list[int] | None) -> list[int] | None:
        ok = values is not None and len(values) == n and all(lo <= v <= hi for v in values)
        return values if ok else None

    as_json = _from_json(body)
    if as_json is not None:
        return valid(as_json) if as_json is not False else None
    marked = re.split(r"(?:final\s+)?answer\s*(?:is)?\s*[:=]", body, flags=re.IGNORECASE)
    if len(marked) > 1:
        body = marked[-1].strip()
        as_json = _from_json(body)
        if as_json is not None:
            return valid(as_json) if as_json is not False else None
    lists = {tuple(_ints(m)) for m in _NUMBER_LIST.findall(body)}
    if lists:
        return valid(list(lists.pop())) if len(lists) == 1 else None
    indexed = [line.strip() for line in body.splitlines() if _LINE_INDEX.match(line.strip())]
    if indexed:
        numbered = [_NUMBERED_LINE.match(line) for line in indexed]
        if not all(numbered) or [int(m.group(1)) for m in numbered] != list(range(1, n + 1)):
            return None
        words = [m.group(2).lower() for m in numbered]
        if any(w in _WORDS for w in words) and (lo, hi) != (0, 1):
            return None
        return valid([_WORDS[w] if w in _WORDS else int(w) for w in words])
    if _BARE.match(body):
        return valid(_ints(body))
    if n == 1:
        stated = {
            int(v) for pattern in _SINGLE_PHRASES for v in re.findall(pattern, body, re.IGNORECASE)
        }
        if len(stated) == 1:
            return valid([stated.pop()])
    return None


def corpus_prompt_vocab(corpus) -> list[str]:
    """Token id → what prompts show, for a stored corpus (`storage.corpus.Corpus`)."""
    return prompt_vocab(corpus.vocab, corpus.special_ids)
