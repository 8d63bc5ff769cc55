"""Every parquet table of the pipeline, defined once: its columns and types, shared by the stage that
writes it and every stage (or tool) that reads it, and written atomically.

`TABLES` is the record type of each stage boundary; `write_table` refuses a frame whose columns
are not the table's (so a writer cannot drift from its readers), and writes an empty frame as the
typed empty table. The README's format section lists the same columns (a test checks it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.atomic import atomic_path, exclusive_lock

SCORE_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "precision",
    "recall",
    "f1",
    "tp",
    "fp",
    "tn",
    "fn",
    "roc_auc",
    "pearson",
    "n_scored",
    "ev_correlation",
    "rsquared",
    "logprob_fraction",
    "intervention_score",
    "steering_kl",
    "none_floor",
)
"""Every metric a scorer may report per latent (NaN where it does not apply)."""
INTERVAL_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "roc_auc",
    "ev_correlation",
    "intervention_score",
)
"""The scorers' main metrics: each scorer stores its own's 95 % interval beside it as `<metric>_lo` and
`<metric>_hi` (`assets.score_metrics.main_interval`; NaN for the other metrics and in older tables)."""
INTERVAL_COLUMNS = tuple(f"{m}_{end}" for m in INTERVAL_METRICS for end in ("lo", "hi"))
SCORES_FIELDS = [
    ("latent", pa.int64()),
    ("explanation", pa.large_string()),
    ("control_explanation", pa.large_string()),
    ("control_note", pa.large_string()),
    *((m, pa.float64()) for m in SCORE_METRICS),
    ("quantile_accuracy", pa.large_string()),
    *((f"control_{m}", pa.float64()) for m in SCORE_METRICS),
    ("control_quantile_accuracy", pa.large_string()),
    ("gap", pa.float64()),
    ("n_failed", pa.int64()),
    ("n_dropped", pa.int64()),
    ("failures", pa.large_string()),
    ("prompt_tokens", pa.int64()),
    ("explanation_hash", pa.large_string()),
    ("models", pa.large_string()),
    *(
        (c, pa.float64()) for c in INTERVAL_COLUMNS
    ),  # last: the columns before them are as they were
]
"""The columns of a scorer's per-latent rows: the `scores` and `reseed_scores` tables', and with `sense`
first the `sense_scores` table's."""


@dataclass(frozen=True)
class Table:
    name: str
    schema: pa.Schema
    open: bool = False
    """Whether writers may add columns after the schema's (per-scorer extras, one column per scorer)."""

    @property
    def columns(self) -> list[str]:
        return self.schema.names


TABLES = {
    t.name: t
    for t in [
        Table(
            "exemplars",
            pa.schema(
                [
                    ("latent", pa.int64()),
                    ("split", pa.large_string()),
                    ("kind", pa.large_string()),
                    ("quantile", pa.int64()),
                    ("sequence", pa.int64()),
                    ("start", pa.int64()),
                    ("max_activation", pa.float64()),
                    ("tokens", pa.list_(pa.int64())),
                    ("activations", pa.list_(pa.float64())),
                ]
            ),
        ),
        Table(
            "latent_profiles",
            pa.schema(
                [
                    ("latent", pa.int64()),
                    ("frequency", pa.float64()),
                    ("max_activation", pa.float64()),
                    ("mean_activation", pa.float64()),
                    ("activating_windows", pa.int64()),
                    ("quantile_boundaries", pa.list_(pa.float64())),
                    ("top_tokens", pa.list_(pa.int64())),
                    ("top_token_mean_activation", pa.list_(pa.float64())),
                    ("neighbours", pa.list_(pa.int64())),
                ]
            ),
        ),
        Table(
            "explanations",
            pa.schema(
                [
                    ("latent", pa.int64()),
                    ("explainer", pa.large_string()),
                    ("explanation", pa.large_string()),
                    ("status", pa.large_string()),
                    ("error", pa.large_string()),
                    ("prompt_tokens", pa.int64()),
                    ("completion_tokens", pa.int64()),
                    ("model", pa.large_string()),
                    ("candidates", pa.list_(pa.string())),
                    ("candidate_scores", pa.list_(pa.float64())),
                    ("examples_dropped", pa.int64()),
                    ("exemplars_fingerprint", pa.large_string()),
                ]
            ),
        ),
        Table(
            "explanation_rounds",
            pa.schema(
                [
                    ("latent", pa.int64()),
                    ("round", pa.int64()),
                    ("explanation", pa.large_string()),
                    ("valid_balanced_accuracy", pa.float64()),
                    ("false_positives", pa.int64()),
                    ("false_negatives", pa.int64()),
                    ("kept", pa.bool_()),
                    ("requests", pa.int64()),
                ]
            ),
        ),
        Table(
            "explanation_senses",
            pa.schema(
                [
                    ("latent", pa.int64()),
                    ("sense", pa.int64()),
                    ("explanation", pa.large_string()),
                    ("windows", pa.int64()),
                    ("clusters", pa.list_(pa.int64())),
                    ("test_windows", pa.list_(pa.int64())),
                ]
            ),
        ),
        Table(
            "explanation_reseeds",
            pa.schema(
                [
                    ("latent", pa.int64()),
                    ("explanation", pa.large_string()),
                    ("first_explanation", pa.large_string()),
                    ("windows", pa.int64()),
                    ("similarity", pa.float64()),
                    ("status", pa.large_string()),
                    ("error", pa.large_string()),
                    ("prompt_tokens", pa.int64()),
                    ("completion_tokens", pa.int64()),
                ]
            ),
        ),  # `[explanations] stability_latents`: a latent's second text, beside the first it was drawn for
        Table("scores", pa.schema(SCORES_FIELDS)),
        Table("sense_scores", pa.schema([("sense", pa.int64()), *SCORES_FIELDS])),
        Table("reseed_scores", pa.schema(SCORES_FIELDS)),  # a scorer's rows of the second texts
        Table(
            "scored_examples",
            pa.schema(
                [
                    ("example", pa.int64()),
                    ("label", pa.int64()),
                    ("quantile", pa.int64()),
                    ("activation", pa.float64()),
                    ("prediction", pa.float64()),
                    ("score", pa.float64()),
                    ("predicted", pa.int64()),
                    ("latent", pa.int64()),
                    ("source", pa.large_string()),
                ]
            ),
            open=True,
        ),  # + a scorer's own per-example columns (simulation: simulated, true_activations, values_from)
        Table(
            "score_summary",
            pa.schema(
                [
                    ("latent", pa.int64()),
                    ("shard", pa.large_string()),
                    ("explanation", pa.large_string()),
                    ("mean_gap", pa.float64()),
                    ("stale", pa.large_string()),
                    ("senses", pa.int64()),
                ]
            ),
            open=True,
        ),  # + <scorer>, <scorer>_control, <scorer>_gap per scorer; <scorer>_min_sense per scorer that scores senses
        # <scorer>_calibration (the judge's calibration card) per scorer that asks a judge
    ]
}


class TableColumnsError(ValueError):
    """A writer's frame does not have its table's columns: a bug, caught before it reaches a reader."""


def table_lock_path(path: Path) -> Path:
    """The lock file beside the table at `path`."""
    return path.with_name(f".{path.name}.lock")


def table_lease_path(path: Path) -> Path:
    """The record beside the table at `path` of the lock and generation its last locked commit held."""
    return path.with_name(f".{path.name}.lease")


def table_lock(path: Path, what: str, wait: bool = False):
    """The lock every writer of the table at `path` holds across reading, changing and writing it (the
    explanations asset for a whole shard's run, `autointerp import delphi` among its runs), so that no run
    overwrites rows another has just written. `what` names the writer that would wait or be refused."""
    return exclusive_lock(table_lock_path(path), what, wait)


def write_table(
    frame: pd.DataFrame, path: Path, table: str, before_commit: Callable[[], None] | None = None
) -> None:
    """Write `frame` as the table named `table`; an empty one is written as the typed empty table, so a
    shard with nothing in it is still a valid table whose every column has its type. `before_commit`
    may raise to keep the old file."""
    spec = TABLES[table]
    with atomic_path(path, before_commit) as tmp:
        if not len(frame):
            pq.write_table(spec.schema.empty_table(), tmp)
        else:
            conformed(frame, path, table).to_parquet(tmp, index=False)


def conformed(frame: pd.DataFrame, path: Path, table: str) -> pd.DataFrame:
    """`frame`'s columns in the table's order (an open table's extra ones after them), or the error
    naming what is missing or unknown."""
    spec = TABLES[table]
    missing = [c for c in spec.columns if c not in frame.columns]
    extra = [c for c in frame.columns if c not in spec.columns]
    if missing or (extra and not spec.open):
        raise TableColumnsError(
            f"the {table} table written to {path} lacks columns {missing} or has unknown ones "
            f"{extra if not spec.open else []}"
        )
    return frame[spec.columns + extra]


def write_table_batches(frames, path: Path, table: str, before_commit=None) -> int:
    """Write frames, one row group each, as the table named `table` without holding them all: memory
    stays one batch's however large the table. `before_commit(n_rows)` may raise to keep the old
    file (nothing replaces it until the last batch is written). Returns the rows written."""
    spec, writer, rows = TABLES[table], None, 0
    with atomic_path(path) as tmp:
        try:
            for frame in frames:
                if not len(frame):
                    continue
                batch = pa.Table.from_pandas(conformed(frame, path, table), preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, batch.schema)
                writer.write_table(batch.cast(writer.schema))
                rows += len(frame)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            pq.write_table(spec.schema.empty_table(), tmp)
        if before_commit is not None:
            before_commit(rows)
    return rows


def empty_table(table: str) -> pd.DataFrame:
    return TABLES[table].schema.empty_table().to_pandas()


def explanation_hash(text: str | None) -> str:
    """Short hash of an explanation's text ("" for none): a score records the one it was made with, so
    that it is never shown beside another."""
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else ""


def file_fingerprint(path: Path) -> str:
    """A content hash of a stored table: what a later stage records as the version it read."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class EmptierResultsError(RuntimeError):
    """A run would replace a table that holds results with an empty one."""


def refuse_emptier(frame: pd.DataFrame, path: Path, stage: str, allow: bool) -> None:
    """Stop a run whose table would be empty where the finished one at `path` has rows, unless `allow`
    (a deliberate re-run): a mistake upstream must not quietly wipe finished results."""
    if allow or len(frame) or not path.exists():
        return
    held = pq.read_metadata(path).num_rows
    if held:
        raise EmptierResultsError(
            f"{stage}: this run has no results, where {path} holds {held} rows; "
            "the table is kept. Fix: check what changed upstream; "
            "if an empty result is meant, "
            "set allow_empty_results: true on the `settings` resource for this run."
        )


def latents_in(exemplars: pd.DataFrame | Path) -> list[int]:
    """The latents that have rows in an exemplars table (in memory, or a file of which only the
    `latent` column is read), ascending."""
    column = (
        exemplars["latent"].to_numpy()
        if isinstance(exemplars, pd.DataFrame)
        else pq.read_table(exemplars, columns=["latent"])["latent"].to_numpy()
    )
    return [int(x) for x in np.unique(column)]


def rows_for_latents(exemplars: pd.DataFrame | Path, latents: list[int]) -> pd.DataFrame:
    """The rows of `latents` in an exemplars table. From a file, only the row groups whose `latent`
    range can hold them are read: the exemplars stage writes one row group per batch of latents, so a
    chunk of latents costs its own rows, not the partition's."""
    if isinstance(exemplars, pd.DataFrame):
        return exemplars[exemplars["latent"].isin(latents)]
    return latent_rows(exemplars, latents).to_pandas()


def latent_rows(path: Path, latents: list[int]) -> pa.Table:
    """The rows of `latents` in the table at `path` (any table with a `latent` column), in the table's
    order, reading only the row groups whose `latent` statistics can hold them."""
    file = pq.ParquetFile(path)
    column = file.schema_arrow.get_field_index("latent")
    lo, hi = min(latents, default=0), max(latents, default=-1)

    def may_hold(group: int) -> bool:
        stats = file.metadata.row_group(group).column(column).statistics
        return stats is None or not stats.has_min_max or (stats.min <= hi and stats.max >= lo)

    groups = [g for g in range(file.num_row_groups) if may_hold(g)]
    table = file.read_row_groups(groups) if groups else file.schema_arrow.empty_table()
    return table.filter(
        pc.is_in(table["latent"], pa.array(latents, table.schema.field("latent").type))
    )


def existing_table(path: Path, stage: str) -> Path:
    """`path`, or an error that says which asset to materialize when there is no table there."""
    if not path.exists():
        raise FileNotFoundError(
            f"No {stage} at {path}. Materialize the `{stage}` asset for this partition first."
        )
    return path


def read_table(path: Path, stage: str) -> pd.DataFrame:
    """Read a stage's table, or say which asset to materialize when it is missing."""
    return pd.read_parquet(existing_table(path, stage))
