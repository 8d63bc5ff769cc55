"""Parquet tables of exemplars, explanations and scores, written atomically."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from storage.atomic import atomic_path


def write_table(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_table(path: Path, stage: str) -> pd.DataFrame:
    """Read a stage's table, or say which asset to materialize when it is missing."""
    if not path.exists():
        raise FileNotFoundError(
            f"No {stage} at {path}. Materialize the `{stage}` asset for this partition first."
        )
    return pd.read_parquet(path)
