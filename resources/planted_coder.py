"""A sparse coder whose truth we plant: latents that fire exactly on known classes of tokens of a corpus.

It reads token ids, not hidden states: each latent fires on a class told by the tokenizer's own strings
(digits, a closed list of negation words, colons and semicolons, any token inside parentheses), on two
classes at once (a latent with two senses), or at random positions (a latent no text can explain). The
judge calibration (`assets/calibration.py`) sends them through a deployment's explainer and judge as
real latents go, so that what the judge says of latents whose answer is known can be read beside its
scores of real ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = {
    "digits": "digits and numbers",
    "negation": "negation words such as not, no, never, without",
    "colons": "colons and semicolons",
    "parenthesized": "words inside parentheses",
}
"""Each planted class and the description its explanation is compared with (`assets.calibration`)."""
NEGATION = {"not", "no", "never", "nothing", "neither", "nor", "cannot", "without"}
"""The closed word list, lower-case; a capitalised first letter counts too ('Not'), Python's 'None' does not."""
CAPITALIZED = {word.capitalize() for word in NEGATION}
TWO_SENSES = ("digits", "negation")
RANDOM_RATE = 0.01
"""Share of tokens a random latent fires on: about the planted classes' own rate on English prose."""


@dataclass(frozen=True)
class PlantedLatent:
    latent: int
    classes: tuple[str, ...]
    """The classes it fires on; empty for a random latent."""

    @property
    def kind(self) -> str:
        return "planted" if self.classes else "random"


def planted_latents(per_class: int, n_random: int) -> list[PlantedLatent]:
    """`per_class` latents of each class and of the two-sense pair, then `n_random` random ones."""
    kinds = [(name,) for name in CLASSES] + [TWO_SENSES]
    planted = [classes for _ in range(per_class) for classes in kinds]
    return [PlantedLatent(i, classes) for i, classes in enumerate(planted)] + [
        PlantedLatent(len(planted) + i, ()) for i in range(n_random)
    ]


def class_masks(tokens: np.ndarray, vocab: list[str], special_ids) -> dict[str, np.ndarray]:
    """Per class, which tokens of `tokens` `[n_seq, ctx]` belong to it (special tokens never do)."""
    stripped = [token.strip() for token in vocab]
    special = set(int(i) for i in special_ids)
    by_id = {
        "digits": [s.isdigit() for s in stripped],
        "negation": [s in NEGATION or s in CAPITALIZED for s in stripped],
        "colons": [s != "" and set(s) <= {":", ";"} for s in stripped],
    }
    ordinary = ~np.isin(tokens, list(special))
    masks = {name: np.asarray(flags, bool)[tokens] & ordinary for name, flags in by_id.items()}
    masks["parenthesized"] = inside_parentheses(tokens, vocab, special)
    return masks


def inside_parentheses(tokens: np.ndarray, vocab: list[str], special: set[int]) -> np.ndarray:
    """Tokens between an opening and its closing parenthesis, those holding a parenthesis themselves left
    out; a sequence or a document (a special token) starts outside."""
    opens = np.array([token.count("(") for token in vocab])
    closes = np.array([token.count(")") for token in vocab])
    inside = np.zeros(tokens.shape, bool)
    for s, row in enumerate(tokens):
        depth = 0
        for p, token in enumerate(row):
            if token in special:
                depth = 0
            elif opens[token] or closes[token]:
                depth = max(0, depth + opens[token] - closes[token])
            else:
                inside[s, p] = depth > 0
    return inside


class PlantedCoder:
    """Encodes a corpus's tokens to the planted latents' activations, as (seq, pos, latent) locations and
    values sorted by latent then location (the activation cache's order). Values are seeded per latent
    (uniform in [0.5, 1.5)), so that windows differ in strength as a real latent's do."""

    def __init__(self, latents: list[PlantedLatent], seed: int = 0):
        self.latents, self.seed = latents, seed

    @property
    def width(self) -> int:
        return len(self.latents)

    def encode(
        self, tokens: np.ndarray, vocab: list[str], special_ids
    ) -> tuple[np.ndarray, np.ndarray]:
        masks = class_masks(tokens, vocab, special_ids)
        special = np.isin(tokens, [int(i) for i in special_ids])
        locations, values = [], []
        for planted in self.latents:
            rng = np.random.default_rng([self.seed, planted.latent])
            if planted.classes:
                fires = np.logical_or.reduce([masks[name] for name in planted.classes])
            else:
                fires = (rng.random(tokens.shape) < RANDOM_RATE) & ~special
            seq, pos = np.nonzero(fires)  # row-major: sorted by sequence, then position
            locations.append(np.stack([seq, pos, np.full(len(seq), planted.latent)], 1))
            values.append(rng.uniform(0.5, 1.5, len(seq)))
        if not locations:
            return np.zeros((0, 3), np.int32), np.zeros(0, np.float32)
        return (
            np.concatenate(locations).astype(np.int32),
            np.concatenate(values).astype(np.float32),
        )
