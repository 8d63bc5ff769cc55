"""Reading a judge's calibration card (`assets/calibration.py` makes it): its line for people, and which
judge made a score. Apart from the asset so that the scorers, the summary and the browser read cards
without importing what makes them."""

from __future__ import annotations

from dagster import MetadataValue

from storage.calibration_cards import read_card
from storage.layout import DataRoot


def fmt(value, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def card_line(card: dict, scorer: str) -> str:
    """One scorer's line of a card, for people: 'judged by X: planted detection 0.91 [0.87, 0.94], gap +0.40,
    random +0.01 (N planted, M random): can tell'."""
    part = card["scorers"].get(scorer)
    if part is None:
        return f"judged by {card['judge']}: its card has no {scorer} (not calibrated)"
    planted, random = part["planted"], part["random"]
    lo, hi = planted["mean_interval"]
    return (
        f"judged by {card['judge']}: planted {scorer} {fmt(planted['mean'])} [{fmt(lo)}, {fmt(hi)}], "
        f"gap {fmt(planted['gap'], True)}, random {fmt(random['gap'], True)} "
        f"({planted['latents']} planted, {random['latents']} random latents): "
        f"{part['verdict'].split(':')[0]}"
    )


def judge_of(models: str) -> str:
    """The judge's identity in a scores row's `models` ('judge=…; embedder=…'), '' where none judged."""
    for part in str(models or "").split("; "):
        role, _, identity = part.partition("=")
        if role == "judge":
            return identity
    return ""


def card_metadata(root: DataRoot, judge: str, scorer: str) -> dict:
    """What a scorer's materialization says of its judge's card: the line and the file, or how to make one."""
    card = read_card(root, judge)
    if card is None:
        return {"calibration": f"no calibration card for {judge}: run `autointerp calibrate`"}
    return {
        "calibration": card_line(card, scorer),
        "calibration_card": MetadataValue.path(str(root.calibration_card_path(judge))),
    }


def card_name(root: DataRoot, judge: str) -> str:
    """The card of the judge `judge` as the summary names it, its path under the data root; '' where the
    judge has no card yet (or nothing was judged)."""
    path = root.calibration_card_path(judge) if judge else None
    return str(path.relative_to(root.root)) if path is not None and path.exists() else ""
