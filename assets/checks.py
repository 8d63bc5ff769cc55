"""Asset checks of every stage but `activations` (whose `coder_health` sits beside it): pure functions of
what a stage just wrote → `Outcome` (passed, severity, metadata), turned into check results inside the
asset's own run, so they cost nothing extra and show per partition in the UI's Checks tab.

A check is blocking where a failure (severity ERROR) means downstream work would be wasted: the stages
below it in the same run then skip that shard (Dagster itself in a run of one shard, `each_shard` in a
range, where the other shards go on). A WARN failure only flags a result worth a look.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import pandas as pd
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetKey, PreviewWarning

from assets.partitions import shard_partitions

ERROR, WARN = AssetCheckSeverity.ERROR, AssetCheckSeverity.WARN

MIN_TRAIN_ACTIVATING = 1
"""Activating `train` windows a latent needs to be explained at all."""
MIN_TEST_ACTIVATING = 1
MIN_TEST_NON_ACTIVATING = 1
"""Activating and non-activating `test` windows a latent needs to be scored: with either class missing,
every scorer's metrics (balanced accuracy, ROC AUC) are undefined."""
LOW_EXPLAINABLE_SHARE = 0.05
"""Below this share of a shard's live latents with enough windows, `explainable_latents` warns: most latents
fire in fewer than `min_activating_windows` windows (a short corpus, or a threshold set too high)."""
MAX_EXPLANATION_FAILURE_SHARE = 0.5
"""Above this share of failed explanations, `explanation_failures` warns (an unreadable or stopped LLM)."""
MAX_EXAMPLE_FAILURE_SHARE = 0.2
"""Above this share of a scorer's examples lost to failed or unreadable answers, `example_failures` warns."""
MIN_CONTROL_SHARE = 0.5
"""Below this share of scored latents with a control, `control_coverage` warns: their gaps are undefined."""


class Outcome(NamedTuple):
    passed: bool
    severity: AssetCheckSeverity
    metadata: dict


def share(part: int, whole: int) -> float:
    """`part / whole`, NaN (undefined, not 0) when `whole` is 0."""
    return part / whole if whole else math.nan


# ---- corpus ---------------------------------------------------------------------------------------


def corpus_tokens(meta: dict, requested_tokens: int) -> Outcome:
    """Tokens stored > 0 and equal to what the config asked for (`n_tokens` rounded down to whole
    sequences); fewer means the source's text ran out. The content hash goes in the metadata."""
    stored, requested = meta["n_tokens"], requested_tokens // meta["ctx_len"] * meta["ctx_len"]
    metadata = {
        "tokens": stored,
        "requested_tokens": requested,
        "content_hash": meta["hash"],
        "source": meta["source"],
    }
    if stored == 0:
        return Outcome(
            False, ERROR, {**metadata, "reason": "no token stored: nothing to cache activations on"}
        )
    if stored < requested:
        reason = (
            f"the source's text ran out after {stored // meta['ctx_len']} of {requested // meta['ctx_len']} sequences; "
            f"add text to corpus.source or lower corpus.n_tokens to {stored}"
        )
        return Outcome(False, WARN, {**metadata, "reason": reason})
    return Outcome(True, ERROR, metadata)


# ---- exemplars ------------------------------------------------------------------------------------


def explainable_latents(windows: pd.DataFrame, live_latents: int) -> Outcome:
    """Share of a shard's live latents with enough windows to be explained and scored (`windows`: the shard's
    exemplar rows, columns latent, split, kind): WARN below `LOW_EXPLAINABLE_SHARE`, also when none is. A
    shard whose latents all fire too rarely is no error (a coder has such shards on a short corpus): the
    stages below it write typed empty tables without asking anything, so nothing would be saved by blocking."""
    activating = windows["kind"] == "activating"
    counts = pd.DataFrame(
        {
            "train": (activating & (windows["split"] == "train")).groupby(windows["latent"]).sum(),
            "test": (activating & (windows["split"] == "test")).groupby(windows["latent"]).sum(),
            "test_non_activating": (~activating & (windows["split"] == "test"))
            .groupby(windows["latent"])
            .sum(),
        }
    )
    enough = int(
        (
            (counts["train"] >= MIN_TRAIN_ACTIVATING)
            & (counts["test"] >= MIN_TEST_ACTIVATING)
            & (counts["test_non_activating"] >= MIN_TEST_NON_ACTIVATING)
        ).sum()
    )
    explainable_share = share(enough, live_latents)
    metadata = {
        "live_latents": live_latents,
        "latents_with_exemplars": len(counts),
        "explainable_latents": enough,
        "explainable_share": explainable_share,
        "enough": f">= {MIN_TRAIN_ACTIVATING} train activating, >= {MIN_TEST_ACTIVATING} test activating and "
        f">= {MIN_TEST_NON_ACTIVATING} test non-activating windows; warns below a share of {LOW_EXPLAINABLE_SHARE}",
    }
    if live_latents == 0:
        return Outcome(True, WARN, {**metadata, "note": "no live latent in this shard"})
    return Outcome(explainable_share >= LOW_EXPLAINABLE_SHARE, WARN, metadata)


# ---- explanations ---------------------------------------------------------------------------------


def explanation_failures(frame: pd.DataFrame) -> Outcome:
    """Share of a shard's latents whose explanation failed: WARN above `MAX_EXPLANATION_FAILURE_SHARE`,
    ERROR when every one failed."""
    failed = int((frame["status"] != "ok").sum())
    failure_share = share(failed, len(frame))
    metadata = {
        "latents": len(frame),
        "failed": failed,
        "failure_share": failure_share,
        "warns_above": MAX_EXPLANATION_FAILURE_SHARE,
    }
    if len(frame) and failed == len(frame):
        return Outcome(False, ERROR, metadata)
    return Outcome(not failure_share > MAX_EXPLANATION_FAILURE_SHARE, WARN, metadata)


def explanations_not_empty(frame: pd.DataFrame) -> Outcome:
    """No latent with status ok has an empty explanation: scoring "" would judge nothing."""
    ok = frame[frame["status"] == "ok"]
    empty = ok["latent"][ok["explanation"].str.strip() == ""].astype(int).tolist()
    return Outcome(
        not empty,
        ERROR,
        {"explained": len(ok), "empty": len(empty), "empty_latents": str(empty[:20])},
    )


# ---- scores/<scorer> ------------------------------------------------------------------------------


def control_coverage(frame: pd.DataFrame) -> Outcome:
    """Share of scored latents that have a control (no `control_note`): WARN below `MIN_CONTROL_SHARE`.
    The scores of an empty shard are a frame without columns."""
    with_control = int((frame["control_note"] == "").sum()) if len(frame) else 0
    control_share = share(with_control, len(frame))
    return Outcome(
        not control_share < MIN_CONTROL_SHARE,
        WARN,
        {
            "latents_scored": len(frame),
            "with_control": with_control,
            "control_share": control_share,
            "warns_below": MIN_CONTROL_SHARE,
        },
    )


def example_failures(frame: pd.DataFrame, scored_examples: int) -> Outcome:
    """Share of a scorer's examples lost to failed or unreadable answers (`n_failed` over the examples
    scored plus those lost): WARN above `MAX_EXAMPLE_FAILURE_SHARE`."""
    failed = int(frame["n_failed"].sum()) if len(frame) else 0
    failure_share = share(failed, scored_examples + failed)
    return Outcome(
        not failure_share > MAX_EXAMPLE_FAILURE_SHARE,
        WARN,
        {
            "examples": scored_examples + failed,
            "failed": failed,
            "failure_share": failure_share,
            "warns_above": MAX_EXAMPLE_FAILURE_SHARE,
        },
    )


# ---- score_summary --------------------------------------------------------------------------------


def shards_present(expected: dict[str, list[str]], scored: dict[str, list[str]]) -> Outcome:
    """Every shard of every coder scored (has a scores table), or named as missing: WARN when any is."""
    missing = {
        coder: sorted(set(shards) - set(scored.get(coder, [])))
        for coder, shards in expected.items()
    }
    missing = {coder: shards for coder, shards in missing.items() if shards}
    metadata = {
        "coders": len(expected),
        "shards": sum(map(len, expected.values())),
        "missing_shards": sum(map(len, missing.values())),
        "missing_by_coder": missing,
    }
    return Outcome(not missing, WARN, metadata)


# ---- wiring ---------------------------------------------------------------------------------------


def spec(
    asset: str | AssetKey,
    name: str,
    description: str,
    blocking: bool = False,
    per_shard: bool = True,
) -> AssetCheckSpec:
    """A check of `asset`, evaluated per shard partition (`per_shard`) as the asset is, so the Checks tab
    shows each shard's result. Partitioned checks are a preview in Dagster 1.13: chosen knowingly, so
    its warning is not repeated on every load of the definitions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreviewWarning)
        return AssetCheckSpec(
            name,
            asset=asset,
            blocking=blocking,
            description=description,
            partitions_def=shard_partitions if per_shard else None,
        )


def corpus_specs() -> list[AssetCheckSpec]:
    return [
        spec(
            "corpus",
            "token_count",
            "Tokens stored > 0 (ERROR, blocking) and as many as asked (WARN, saying why fewer); the content hash.",
            blocking=True,
            per_shard=False,
        )
    ]


def exemplars_specs() -> list[AssetCheckSpec]:
    return [
        spec(
            "exemplars",
            "explainable_latents",
            f"Share of live latents with enough train and test windows: WARN below {LOW_EXPLAINABLE_SHARE} "
            f"(also when none is: the stages below then write empty tables without asking anything).",
        )
    ]


def explanations_specs() -> list[AssetCheckSpec]:
    return [
        spec(
            "explanations",
            "explanation_failures",
            f"Share of failed explanations: WARN above {MAX_EXPLANATION_FAILURE_SHARE}, ERROR "
            "(blocking) when all failed.",
            blocking=True,
        ),
        spec(
            "explanations",
            "explanations_not_empty",
            "No explanation with status ok is empty (ERROR, blocking).",
            blocking=True,
        ),
    ]


def scorer_specs(key: AssetKey) -> list[AssetCheckSpec]:
    return [
        spec(
            key,
            "control_coverage",
            f"Share of scored latents with a control: WARN below {MIN_CONTROL_SHARE}.",
        ),
        spec(
            key,
            "example_failures",
            f"Share of examples lost to failed or unreadable answers: WARN above {MAX_EXAMPLE_FAILURE_SHARE}.",
        ),
    ]


def summary_specs() -> list[AssetCheckSpec]:
    return [
        spec(
            "score_summary",
            "shards_present",
            "Every shard of every coder has scores, or is named as missing (WARN).",
            per_shard=False,
        )
    ]


def result(name: str, outcome: Outcome) -> AssetCheckResult:
    return AssetCheckResult(
        check_name=name, passed=outcome.passed, severity=outcome.severity, metadata=outcome.metadata
    )


def explanations_results(frame: pd.DataFrame) -> list[AssetCheckResult]:
    return [
        result("explanation_failures", explanation_failures(frame)),
        result("explanations_not_empty", explanations_not_empty(frame)),
    ]


def scorer_results(frame: pd.DataFrame, examples: pd.DataFrame) -> list[AssetCheckResult]:
    """`frame`: the scores table of a shard; `examples`: its scored examples (failed ones are not among them)."""
    return [
        result("control_coverage", control_coverage(frame)),
        result("example_failures", example_failures(frame, len(examples))),
    ]
