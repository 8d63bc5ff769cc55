"""Latents whose truth we plant, and scripted LLMs that read only what a prompt literally shows.

Each planted latent fires on one or two *senses*: a class of token inside a container, "digits inside
parentheses" (`(4)`), "capitalized words inside quotation marks" (`"Anna"`) or "symbols inside square
brackets" (`[#]`). Its windows are built
from lower-case filler text, so nothing else in them is a digit or a capital: activating windows hold
the sense, hard negatives hold the class outside its container (`4`, `Anna`, `#`), random ones neither. A
too-broad explanation ("digits") therefore fires on hard negatives, and the narrow one does not.

`scripted_explainer` answers an explainer prompt from the marked spans it shows: the commonest class
first ("digits"), too broad. Asked to revise, it narrows each class it named to the container its
marked spans sit in, but only when the prompt shows it texts that it wrongly fits, and adds a class
that the texts it misses show marked. `literal_judge` answers detection and fuzzing prompts from
what the description literally says, in that grammar; other descriptions match nothing.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd

CLASSES = {"digits": r"\d+", "capitalized words": r"[A-Z][a-z]+", "symbols": r"[#%&@]"}
CONTAINERS = {
    "parentheses": ("(", ")"),
    "quotation marks": ('"', '"'),
    "square brackets": ("[", "]"),
}
SENSES = {
    "digits": "parentheses",
    "capitalized words": "quotation marks",
    "symbols": "square brackets",
}
"""Each class and the container it is planted in."""
NAMES = ["Anna", "Paris", "London", "Maria", "Peter", "Rome", "John", "David", "Sarah", "Emma"]
FILLER = (
    "the old road near a quiet farm where we walked after lunch and talked about rain on the hill while "
    "some birds sang over small green fields and nobody came back for tea until late evening"
).split()
SPLITS = {"train": (8, 0, 0), "valid": (5, 3, 2), "test": (10, 6, 4)}
"""Windows per split: activating, hard negatives, random negatives."""


def filler(rng: np.random.Generator, n: int) -> str:
    return " ".join(FILLER[i] for i in rng.choice(len(FILLER), size=n, replace=False))


def instance(cls: str, rng: np.random.Generator) -> str:
    return {
        "digits": lambda: str(rng.integers(0, 10)),
        "capitalized words": lambda: NAMES[rng.integers(len(NAMES))],
        "symbols": lambda: "#%&@"[rng.integers(4)],
    }[cls]()


def window(rng: np.random.Generator, cls: str | None, contained: bool) -> list[tuple[str, bool]]:
    """(piece, fires) pieces of one window: filler around an instance of `cls`, inside its container
    (the latent fires on it) or bare; only filler when `cls` is None."""
    before, after = filler(rng, 4), " " + filler(rng, 4)
    if cls is None:
        return [(before, False), (after, False)]
    if not contained:
        return [(before, False), (" " + instance(cls, rng), False), (after, False)]
    left, right = CONTAINERS[SENSES[cls]]
    return [
        (before, False),
        (" " + left, False),
        (instance(cls, rng), True),
        (right, False),
        (after, False),
    ]


def planted_exemplars(
    tokenizer, latents: dict[int, tuple[str, ...]], seed: int = 0, splits: dict = SPLITS
) -> pd.DataFrame:
    """Exemplar rows (the `exemplars` table's columns) of latents planted as latent → its classes; each
    window's text is distinct within its latent, so a prompt that shows a window can be told by its text.
    `splits` gives the windows per split as `SPLITS` does."""
    rng = np.random.default_rng(seed)
    rows = []
    for latent, classes in latents.items():
        seen = set()
        for split, (n_activating, n_hard, n_random) in splits.items():
            plans = [("activating", classes[i % len(classes)], True) for i in range(n_activating)]
            plans += [("embedding", classes[i % len(classes)], False) for i in range(n_hard)] + [
                ("random", None, False)
            ] * n_random
            for i, (kind, cls, contained) in enumerate(plans):
                pieces = window(rng, cls, contained)
                while "".join(p for p, _ in pieces) in seen:
                    pieces = window(rng, cls, contained)
                seen.add("".join(p for p, _ in pieces))
                tokens, acts = [], []
                for piece, fires in pieces:
                    ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    tokens += ids
                    acts += [1.0 + 0.1 * (i % 5) if fires else 0.0] * len(ids)
                rows.append(
                    {
                        "latent": latent,
                        "split": split,
                        "kind": kind,
                        "quantile": 1 + i % 5 if kind == "activating" else 0,
                        "sequence": 0,
                        "start": 0,
                        "max_activation": max(acts),
                        "tokens": tokens,
                        "activations": acts,
                    }
                )
    return pd.DataFrame(rows)


def window_texts(exemplars: pd.DataFrame, vocab: list[str], split: str) -> set[str]:
    """The plain text of every `split` window, as prompts would show it."""
    return {
        "".join(vocab[t] for t in tokens)
        for tokens in exemplars[exemplars["split"] == split]["tokens"]
    }


# ---- the scripted explainer ----------------------------------------------------------------------


def class_of(span: str) -> str | None:
    return next(
        (name for name, pattern in CLASSES.items() if re.fullmatch(pattern, span.strip())), None
    )


def marked_spans(text: str) -> list[tuple[str, str | None]]:
    """(class, container) of each `<<span>>` in the text: the container whose marks enclose it, if any."""
    found = []
    for match in re.finditer(r"<<(.*?)>>", text):
        before, after = text[: match.start()].rstrip(), text[match.end() :].lstrip()
        container = next(
            (
                name
                for name, (left, right) in CONTAINERS.items()
                if before.endswith(left) and after.startswith(right)
            ),
            None,
        )
        found.append((class_of(match.group(1)), container))
    return [(cls, container) for cls, container in found if cls is not None]


def senses_of(explanation: str) -> list[tuple[str, str | None]]:
    """(class, container) of each sense an explanation names in the planted grammar ('A or B')."""
    senses = []
    for part in explanation.split(" or "):
        found = re.fullmatch(
            rf"\s*({'|'.join(CLASSES)})(?: inside ({'|'.join(CONTAINERS)}))?\s*", part
        )
        if found:
            senses.append((found.group(1), found.group(2)))
    return senses


def described(senses: list[tuple[str, str | None]]) -> str:
    return " or ".join(
        cls + (f" inside {container}" if container else "") for cls, container in senses
    )


def scripted_explainer(messages: list[dict]) -> str:
    shown = marked_spans(messages[1]["content"])
    if (
        len(messages) == 2
    ):  # the first ask: name the commonest class of the marked spans, nothing more
        return f"Explanation: {Counter(cls for cls, _ in shown).most_common(1)[0][0]}"
    feedback = messages[-1]["content"]
    named = [cls for cls, _ in senses_of(messages[-2]["content"].removeprefix("Explanation: "))]
    missed = (
        feedback.split("yet the feature fires in them")[1].split("\n\n")[0]
        if "yet the feature fires in them" in feedback
        else ""
    )
    named += [cls for cls, _ in marked_spans(missed) if cls not in named]
    if "but the feature does not fire" not in feedback:
        return f"Explanation: {described([(cls, None) for cls in dict.fromkeys(named)])}"
    containers = {
        cls: {container for c, container in shown + marked_spans(missed) if c == cls}
        for cls in named
    }
    located = [
        (cls, next(iter(containers[cls])) if len(containers[cls]) == 1 else None)
        for cls in dict.fromkeys(named)
    ]
    return f"Explanation: {described(located)}"


# ---- the literal judge -----------------------------------------------------------------------------


def fits(text: str, senses: list[tuple[str, str | None]]) -> bool:
    """Whether plain window text holds an instance of any sense."""
    for cls, container in senses:
        pattern = (
            CLASSES[cls]
            if container is None
            else re.escape(CONTAINERS[container][0])
            + r"\s*"
            + CLASSES[cls]
            + r"\s*"
            + re.escape(CONTAINERS[container][1])
        )
        if re.search(pattern, text):
            return True
    return False


def literal_judge(messages: list[dict]) -> str:
    """A detection or fuzzing answer from what the description literally says."""
    user = messages[-1]["content"]
    senses = senses_of(re.search(r"^Description: (.*)$", user, re.MULTILINE).group(1))
    examples = re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)
    if "marked tokens are what" in messages[0]["content"]:
        return str(
            [
                int(any(sense in senses or (sense[0], None) in senses for sense in marked_spans(e)))
                for e in examples
            ]
        )
    return str([int(fits(e, senses)) for e in examples])


def scripted_llm(messages: list[dict]) -> str:
    """The explainer for explainer prompts, the judge for judge prompts (they show a 'Description:')."""
    return (
        literal_judge(messages)
        if "Description:" in messages[-1]["content"]
        else scripted_explainer(messages)
    )
