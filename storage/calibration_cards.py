"""The judges' calibration cards on disk, `calibration/<hash>.json` (`DataRoot.calibration_card_path`): one JSON
file per judge, written whole (atomically) by the `calibration` asset, read by the scorers, the summary and the
browser. Not a table: a card is one small document, made once per judge."""

from __future__ import annotations

from pathlib import Path

from storage.atomic import read_json, write_json
from storage.layout import DataRoot


def write_card(root: DataRoot, judge: str, card: dict) -> Path:
    path = root.calibration_card_path(judge)
    write_json(path, card)
    return path


def read_card(root: DataRoot, judge: str) -> dict | None:
    """The card of the judge `judge` (an identity), or None where it has none yet."""
    path = root.calibration_card_path(judge)
    return read_json(path) if judge and path.exists() else None


def card_files(root: DataRoot) -> list[Path]:
    """Every judge's card, by file name."""
    return sorted(root.calibration_dir.glob("*.json"))
