"""Stage 5, `scores/<scorer>` and `score_summary`: one asset per scorer, each beside its control.

Every scorer plugin of `assets/scorers/` is its own asset, partitioned like its inputs (coder × shard),
so adding a scorer materializes only it. Its code version carries the hash of its settings: a
change of one scorer's settings makes only that scorer's partitions stale, and its automation
condition re-materializes exactly those (unchanged prompts are answered by the response cache).
Each latent is scored twice: with its explanation and with the control (another latent's
explanation; for intruder, tasks without an intruder). The gap between the two, and a verdict over
all latents, say whether the score means anything. `score_summary` (per coder) joins the main
metric of every scorer across all shards into one table.
"""

import asyncio
import base64
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AutomationCondition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.accounting import coder_accounting
from assets.automation import CODE_CHANGED, FOLLOW, LLM_POOL, SUBJECT_MODEL_POOL, in_pool
from assets.cards import card_metadata, card_name, judge_of
from assets.checks import result, scorer_results, scorer_specs, shards_present, summary_specs
from assets.explanations import viewer_links
from assets.latent_queue import (
    ChunkLoader,
    nothing_succeeded,
    overlaps_shards,
    selected_latents,
    stream_latents,
)
from assets.links import coder_url, home_url, latent_url
from assets.partitions import (
    backfill_policy,
    coder_and_shard,
    coders_of,
    each_shard,
    shard_partitions,
)
from assets.prompts import corpus_prompt_vocab, window_embedding
from assets.records import read_records
from assets.score_metrics import (
    CONTROLS_VERSION,
    STALE,
    beside_control,
    control_assignment,
    example_metrics,
    main_interval,
    mean_interval,
    no_control_reason,
    paired_means,
    predictions_of,
    stale_scores,
    verdict,
)
from assets.scorers import Job, JobResult, Scorer, ScorerDeps, ScorerSettings
from assets.scorers.base import CONTROLS
from assets.senses import lowest_sense_scores, of_current
from assets.stability import current_reseeds, reseed_stability, stability_line
from assets.stage_config import NO_MODELS, SCORER_ROLES, Models
from resources.llm import stopped_by_budget
from resources.sparse_coders import load_registered
from storage.calibration_cards import card_files
from storage.content_identity import file_digest
from storage.corpus import load_corpus
from storage.journal import Journal
from storage.store import TableStore
from storage.tables import (
    INTERVAL_COLUMNS,
    SCORE_METRICS,
    TABLES,
    empty_table,
    explanation_hash,
    latents_in,
)
from storage.vector_store import CorpusWindows

EMPTY_SHARD = "empty shard: no explainable latent"

# New explanations, or a changed setting of this scorer (its code version), re-run exactly the
# affected partitions; partitions never materialized run once their inputs are there (`FOLLOW`).
SCORER_AUTOMATION = FOLLOW | CODE_CHANGED
# The summary follows any scorer that updates, and is made if missing once any scorer of its coder
# has a table; scorers never run (not automated) do not hold it back.
SUMMARY_AUTOMATION = (
    (
        AutomationCondition.any_deps_updated().since_last_handled()
        | (
            AutomationCondition.missing()
            & ~AutomationCondition.execution_failed()
            & AutomationCondition.any_deps_match(~AutomationCondition.missing())
        )
    )
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.any_deps_match(AutomationCondition.will_be_requested())
    & ~AutomationCondition.in_progress()
)


SUMMARY_VERSION = "4"
"""Of the summary's code: bump when its columns change (3: `senses`, `<scorer>_min_sense`; 4: `<scorer>_calibration`);
a summary recorded with another is built again (`summary_sources`)."""


def scorer_version(scorer: type[Scorer]) -> str:
    """A scorer's own version, with the control assignment's where its control is another latent's explanation:
    part of its code version and journal key, so that a new assignment re-scores once."""
    return (
        f"{scorer.version}+controls{CONTROLS_VERSION}"
        if scorer.control == "shuffled_explanation"
        else scorer.version
    )


def scorer_key(name: str) -> AssetKey:
    return AssetKey(["scores", name])


# ---- scoring a partition --------------------------------------------------------------------------


def scored_latents(
    scorer: Scorer,
    exemplars: pd.DataFrame | Path,
    explanations: pd.DataFrame | None,
    max_latents: int,
) -> dict[int, str | None]:
    """Latent → explanation to score: explained latents, or for scorers without one (intruder) the
    latents the explainer would take."""
    if not scorer.uses_explanation:
        return {latent: None for latent in selected_latents(exemplars, max_latents)}
    ok = explanations[explanations["status"] == "ok"]
    return dict(sorted(zip(ok["latent"].astype(int), ok["explanation"], strict=False)))


def latent_row(
    main_metric: str,
    latent: int,
    explanation,
    control_explanation,
    own: JobResult,
    control: JobResult | None,
    control_note: str = "",
    models: str = "",
    seed: int = 0,
) -> dict:
    def metrics(result: JobResult | None) -> dict:
        if result is None:
            return {m: np.nan for m in SCORE_METRICS} | {"quantile_accuracy": {}}
        columns = (
            np.array([r.get(c, np.nan) for r in result.rows], float)
            for c in ("label", "quantile", "activation", "prediction", "score")
        )
        return {m: np.nan for m in SCORE_METRICS} | example_metrics(*columns) | result.extra

    mine, theirs = metrics(own), metrics(control)
    results = [own] + ([control] if control else [])
    return {
        "latent": latent,
        "explanation": explanation or "",
        "control_explanation": control_explanation or "",
        "control_note": control_note,
        **{m: mine[m] for m in SCORE_METRICS},
        "quantile_accuracy": json.dumps(mine["quantile_accuracy"]),
        **{f"control_{m}": theirs[m] for m in SCORE_METRICS},
        "control_quantile_accuracy": json.dumps(theirs["quantile_accuracy"]),
        "gap": mine[main_metric] - theirs[main_metric],
        "n_failed": sum(r.failed for r in results),
        "n_dropped": sum(r.dropped for r in results),
        "failures": json.dumps([reason for r in results for reason in r.failures]),
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "explanation_hash": explanation_hash(explanation),
        "models": models,
        **{c: np.nan for c in INTERVAL_COLUMNS},
        **(
            dict(
                zip(
                    (f"{main_metric}_lo", f"{main_metric}_hi"),
                    interval(main_metric, own, seed),
                    strict=True,
                )
            )
            if f"{main_metric}_lo" in INTERVAL_COLUMNS  # a plugin's own main metric has no column
            else {}
        ),
    }


def interval(main_metric: str, result: JobResult, seed: int) -> tuple[float, float]:
    """The 95 % interval of the main metric from the latent's own judged examples (`main_interval`)."""
    columns = [
        np.array([r.get(c, np.nan) for r in result.rows], float)
        for c in ("label", "prediction", "score")
    ]
    windows = (
        ([r["simulated"] for r in result.rows], [r["true_activations"] for r in result.rows])
        if result.rows and "true_activations" in result.rows[0]
        else None
    )
    return main_interval(main_metric, *columns, windows=windows, seed=seed)


def withheld(row: dict) -> dict:
    """A latent's row without its metrics (NaN): the budget stopped some of its questions, and metrics of the
    others alone would be a score of part of its windows. Its failures say why; the next run scores it."""
    blank = (
        {m: np.nan for m in SCORE_METRICS}
        | {f"control_{m}": np.nan for m in SCORE_METRICS}
        | {c: np.nan for c in INTERVAL_COLUMNS}
    )
    return {
        **row,
        **blank,
        "gap": np.nan,
        "quantile_accuracy": "{}",
        "control_quantile_accuracy": "{}",
    }


async def score_partition(
    scorer: Scorer,
    exemplars: pd.DataFrame | Path,
    explanations: pd.DataFrame | None,
    vocab: list[str],
    max_latents: int = 0,
    report=None,
    journal: Journal | None = None,
    coder: str = "",
    controls: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-latent metrics and per-example rows of one scorer on one partition, with the control (without
    one when not `controls`: the second texts of `reseed_scores`, compared with the first, not a control).
    `exemplars` is the table or its file; from a file, a chunk of latents' rows is read at a time, as
    `coder`'s records (`read_records`), from which each latent's jobs take their examples.
    Latents stream through a bounded queue; with a `journal`, each scored latent's rows go to disk as it
    finishes (and not kept in memory), and latents kept by an interrupted run are not scored again."""
    settings = scorer.settings
    text_of = scored_latents(scorer, exemplars, explanations, max_latents)
    have_exemplars = set(latents_in(exemplars))
    missing = [latent for latent in text_of if latent not in have_exemplars]
    if missing and report:
        report(
            f"{scorer.name}: {len(missing)} explained latents have no exemplars (e.g. {missing[:5]}): skipped; "
            f"the explanations are older than the exemplars, re-materialize `explanations`"
        )
    text_of = {latent: text for latent, text in text_of.items() if latent in have_exemplars}
    control_of = (
        {}
        if not controls
        else control_assignment(text_of, settings.seed)
        if scorer.uses_explanation
        else {latent: latent for latent in text_of}
    )
    done = set(journal.kept(text_of, "scores")) if journal is not None else set()
    if done and report:
        report(
            f"{scorer.name}: {len(done)} latents kept from an interrupted run; "
            f"scoring the other {len(text_of) - len(done)}"
        )
    todo = [latent for latent in text_of if latent not in done]

    async def load(chunk: list[int]) -> dict[int, tuple[Job, Job | None]]:
        """A chunk's jobs (each latent's own and control), with what they share prepared."""
        records = await asyncio.to_thread(read_records, exemplars, chunk, coder, vocab)
        jobs = {}
        for latent, record in records.items():
            rng = np.random.default_rng([settings.seed, latent])
            examples = record.examples("test", rng)
            calibration = (
                record.examples("valid", rng) if scorer.uses_calibration else []
            )  # drawn after the test windows: their marks do not depend on it
            own = Job(
                record,
                text_of[latent],
                examples,
                control=False,
                seed=settings.seed + latent,
                calibration=calibration,
            )
            control = (
                Job(
                    record,
                    text_of[control_of[latent]],
                    examples,
                    control=True,
                    seed=settings.seed + latent + 1,
                    calibration=calibration,
                )
                if latent in control_of
                else None
            )
            jobs[latent] = (own, control)
        await scorer.prepare([job for pair in jobs.values() for job in pair if job is not None])
        return jobs

    loader = ChunkLoader(todo, load)

    async def score_latent(latent: int) -> tuple[dict, list[dict]]:
        own_job, control_job = await loader.take(latent)
        own, control = await asyncio.gather(
            scorer.score(own_job), scorer.score(control_job) if control_job is not None else _none()
        )
        note = "" if latent in control_of or not controls else no_control_reason(len(text_of))
        row = latent_row(
            scorer.main_metric,
            latent,
            text_of[latent],
            text_of.get(control_of.get(latent)) if scorer.uses_explanation else None,
            own,
            control,
            note,
            scorer.deps.models,
            settings.seed + latent,
        )
        if any(
            map(stopped_by_budget, json.loads(row["failures"]))
        ):  # a partial score is no score: asked again next time
            return withheld(row), []
        example_rows = []
        for source, judged in (("explanation", own), ("control", control)):
            if judged is not None and judged.rows:
                predicted = predictions_of(
                    *(
                        np.array([r.get(c, np.nan) for r in judged.rows], float)
                        for c in ("label", "prediction", "score")
                    )
                )
                example_rows += [
                    {**r, "predicted": int(p), "latent": latent, "source": source}
                    for r, p in zip(judged.rows, predicted, strict=False)
                ]
        return row, example_rows

    in_memory: dict[int, tuple[dict, list[dict]]] = {}
    """Scored latents not in the journal: all of them without one, else those stopped by the budget."""

    def keep(latent: int, result: tuple[dict, list[dict]]) -> None:
        row, example_rows = result
        if journal is not None and not any(
            map(stopped_by_budget, json.loads(row["failures"]))
        ):  # budget-stopped latents are scored next time
            journal.add(examples=example_rows, scores=[row])
        else:
            in_memory[latent] = result

    async with (
        scorer.deps.llm.session() if scorer.deps.llm is not None else contextlib.nullcontext()
    ):
        workers = 2 * scorer.deps.llm.max_concurrency if scorer.deps.llm is not None else 64
        try:
            await stream_latents(
                todo,
                score_latent,
                workers=workers,
                on_finished=keep,
                report=report,
                label=f"{scorer.name} latents (explanation and control)",
                retain=False,
            )
        finally:
            if journal is not None:
                journal.flush()
    kept = journal.kept(text_of, "scores") if journal is not None else {}
    rows = [kept[latent] if latent in kept else in_memory[latent][0] for latent in text_of]
    parts = [journal.finished("examples")] if kept else []
    parts = [part[part["latent"].isin(list(kept))] for part in parts if len(part)]
    fresh = [row for latent in text_of if latent in in_memory for row in in_memory[latent][1]]
    parts += [pd.DataFrame(fresh)] if fresh else []
    examples = (
        pd.concat(parts, ignore_index=True).sort_values("latent", kind="stable", ignore_index=True)
        if parts
        else pd.DataFrame()
    )
    return pd.DataFrame(rows), examples  # one frame, not one per job


async def score_senses(
    scorer: Scorer,
    exemplars: pd.DataFrame | Path,
    senses: pd.DataFrame,
    vocab: list[str],
    coder: str = "",
) -> pd.DataFrame:
    """Each sense's scores (rows of `explanation_senses`) on the `test` windows: the activating ones nearest that
    sense (its `test_windows`) are its positives, every other window (the other senses' included) its negatives.
    One `score_partition` per sense number, so a sense's control is another latent's sense of that number.
    Columns: `sense` and those of `score_partition`'s per-latent rows (the `sense_scores` table's)."""
    if not len(senses):
        return empty_table("sense_scores")
    records = read_records(exemplars, sorted(set(senses["latent"].astype(int))), coder, vocab)
    parts = []
    for number, rows in senses.groupby("sense"):
        relabelled = []
        for row in rows.itertuples():
            windows = records[row.latent].windows.copy()
            test = np.flatnonzero((windows["split"] == "test").to_numpy())
            own = set(row.test_windows)
            others = [
                test[position]
                for position in np.flatnonzero(windows["kind"].to_numpy()[test] == "activating")
                if position not in own
            ]
            windows.iloc[others, windows.columns.get_loc("kind")] = (
                "random"  # another sense: a negative of this one
            )
            windows.iloc[others, windows.columns.get_loc("quantile")] = 0
            relabelled.append(windows)
        explained = rows.assign(status="ok")[["latent", "explanation", "status"]]
        scored, _ = await score_partition(
            scorer, pd.concat(relabelled), explained, vocab, coder=coder
        )
        parts.append(scored.assign(sense=int(number)))
    return pd.concat(parts, ignore_index=True)[TABLES["sense_scores"].columns]


def scorable_senses(
    store: TableStore, coder: str, shard: str, explanations: pd.DataFrame, report
) -> pd.DataFrame:
    """The partition's `explanation_senses` rows of its current explanations (`assets.senses.of_current`): what
    the scorers score sense by sense. Senses written before they recorded their `test_windows` are not scorable."""
    senses = store.explanation_senses(coder, shard).read_if_present()
    if senses is None or not len(senses):
        return empty_table("explanation_senses")
    if "test_windows" not in senses or senses["test_windows"].isna().any():
        report(
            f"the senses of {coder} shard {shard} do not say which test windows are each sense's "
            "(written before they did): no sense is scored on its own. "
            "Fix: re-materialize `explanations` for this partition."
        )
        return empty_table("explanation_senses")
    return of_current(senses, explanations)


async def score_reseeds(
    scorer: Scorer,
    exemplars: pd.DataFrame | Path,
    reseeds: pd.DataFrame,
    vocab: list[str],
    coder: str = "",
) -> pd.DataFrame:
    """The `reseed_scores` rows: each latent's second text (`current_reseeds`) scored as its first was, on the
    same `test` windows in the same order (the same seeds), without a control."""
    if not len(reseeds):
        return empty_table("reseed_scores")
    scored, _ = await score_partition(
        scorer, exemplars, reseeds.assign(status="ok"), vocab, coder=coder, controls=False
    )
    return scored[TABLES["reseed_scores"].columns]


async def _none():
    return None


# ---- what the UI shows ----------------------------------------------------------------------------


def _png_markdown(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return f"![plot](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_range(metric: str) -> tuple[float, float]:
    return (
        (-1.0, 1.0) if metric in ("ev_correlation", "pearson", "intervention_score") else (0.0, 1.0)
    )


def histogram_markdown(panels: list[tuple[str, str, pd.Series, pd.Series, str]]) -> str:
    """One histogram per (title, metric, scores, control scores, control name): the score beside its control."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (title, metric, own, control, control_name) in zip(axes[0], panels, strict=False):
        lo, hi = metric_range(metric)
        bins = np.linspace(lo, hi, 11)
        ax.hist(
            own.dropna().clip(lo, hi),
            bins=bins,
            alpha=0.7,
            label="latent" if control_name == CONTROLS["no_intruder"] else "explanation",
        )
        ax.hist(
            control.dropna().clip(lo, hi),
            bins=bins,
            alpha=0.5,
            label=control_name.removeprefix("the "),
        )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(metric)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("latents")
    return _png_markdown(fig)


def quantile_accuracy_markdown(examples: pd.DataFrame, title: str) -> str:
    """Accuracy per activation quantile (0 = non-activating windows), explanation beside control."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    correct = examples.assign(correct=(examples["predicted"] == examples["label"]).astype(float))
    for source, style in (("explanation", "o-"), ("control", "s--")):
        part = correct[correct["source"] == source]
        if len(part):
            by_quantile = part.groupby("quantile")["correct"].mean()
            ax.plot(by_quantile.index, by_quantile.values, style, label=source)
    ax.set_xlabel("activation quantile (0 = not activating, 1 = strongest)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png_markdown(fig)


def best_and_worst(frame: pd.DataFrame, metric: str, columns: list[str], n: int = 5) -> str:
    ranked = frame.dropna(subset=[metric]).sort_values(metric, ascending=False)
    if not len(ranked):
        return "nothing scored"
    best, worst = ranked.head(n), ranked.tail(min(n, max(0, len(ranked) - n)))

    def text(part: pd.DataFrame) -> str:
        return (
            part[columns]
            .assign(explanation=part["explanation"].str.slice(0, 80))
            .round(3)
            .to_markdown(index=False)
        )

    return (
        f"**Best {len(best)}**\n\n{text(best)}\n\n**Worst {len(worst)}**\n\n"
        f"{text(worst) if len(worst) else '(none)'}"
    )


def scorer_metadata(
    scorer: type[Scorer], settings: ScorerSettings, frame: pd.DataFrame, examples: pd.DataFrame
) -> dict:
    main = scorer.main_metric
    metadata = {
        "scorer": scorer.description,
        "settings": MetadataValue.json(settings.model_dump()),
        "latents_scored": len(frame),
        "verdict": verdict(frame["gap"], scorer.control_description())
        if len(frame)
        else "cannot tell: nothing scored",
        "main_metric": main,
    }
    if not len(frame):
        return metadata
    metadata["informative"] = metadata["verdict"].startswith("informative")
    for metric in dict.fromkeys(
        (main, "accuracy", "balanced_accuracy", "f1", "roc_auc", "pearson")
    ):
        if frame[metric].notna().any():
            mean, control, _ = paired_means(
                frame[metric], frame[f"control_{metric}"]
            )  # over the latents with both
            metadata[f"mean_{metric}"] = MetadataValue.float(round(mean, 4))
            metadata[f"mean_control_{metric}"] = MetadataValue.float(round(control, 4))
    metadata["mean_gap"] = (
        MetadataValue.float(round(float(frame["gap"].mean()), 4))
        if frame["gap"].notna().any()
        else MetadataValue.float(float("nan"))
    )
    lo, hi = mean_interval(frame["gap"])
    metadata["gap_interval"] = f"[{lo:.4f}, {hi:.4f}] (95 %, t over latents)"
    if f"{main}_lo" in frame:
        covered = frame[[main, f"{main}_lo", f"{main}_hi"]].dropna()
        metadata[f"mean_{main}_interval_width"] = MetadataValue.float(
            round(float((covered[f"{main}_hi"] - covered[f"{main}_lo"]).mean()), 4)
            if len(covered)
            else float("nan")
        )  # how far one latent's score is to be trusted, from its own examples
    confusion = pd.DataFrame(
        {
            "": ["fires", "silent"],
            "judged fires": [frame["tp"].sum(), frame["fp"].sum()],
            "judged silent": [frame["fn"].sum(), frame["tn"].sum()],
        }
    )
    metadata["confusion_matrix"] = MetadataValue.md(confusion.to_markdown(index=False))
    metadata["failed_examples"] = int(frame["n_failed"].sum())
    metadata["dropped_examples"] = int(
        frame["n_dropped"].sum()
    )  # left out to fit the judge's context
    metadata["latents_without_control"] = int((frame["control_note"] != "").sum())
    metadata["histogram"] = MetadataValue.md(
        histogram_markdown(
            [
                (
                    scorer.name,
                    main,
                    frame[main],
                    frame[f"control_{main}"],
                    scorer.control_description(),
                )
            ]
        )
    )
    if len(examples):
        metadata["quantile_accuracy"] = MetadataValue.md(
            quantile_accuracy_markdown(examples, f"{scorer.name}: accuracy by quantile")
        )
    metadata["best_and_worst"] = MetadataValue.md(
        best_and_worst(frame, main, ["latent", main, f"control_{main}", "gap", "explanation"])
    )
    return metadata


# ---- the assets -----------------------------------------------------------------------------------


def scorer_asset(
    scorer: type[Scorer],
    settings: ScorerSettings,
    automate: bool,
    partitions_per_run: int = 1,
    models: Models = NO_MODELS,
) -> AssetsDefinition:
    """The asset of one scorer; its code version is the scorer's version, the hash of its settings and the
    identities of the models it uses (the judge, the embedder, the subject model)."""
    roles = [SCORER_ROLES[use] for use in sorted(scorer.uses) if use in SCORER_ROLES]
    deps = [AssetDep("exemplars")] + (
        [AssetDep("explanations")] if scorer.control == "shuffled_explanation" else []
    )

    @asset(
        key=scorer_key(scorer.name),
        group_name="scores",
        partitions_def=shard_partitions,
        deps=deps,
        code_version=f"{scorer_version(scorer)}-{settings.digest()}{models.version_part(*roles)}",
        automation_condition=SCORER_AUTOMATION if automate else None,
        backfill_policy=backfill_policy(partitions_per_run),
        output_required=False,  # a range records each shard itself (`each_shard`)
        **in_pool(
            SUBJECT_MODEL_POOL
            if "subject_model" in scorer.uses
            else LLM_POOL
            if "llm" in scorer.uses
            else None
        ),
        required_resource_keys={
            "settings",
            *(scorer.uses - {"coder"}),
        },  # the coder comes from the registry
        check_specs=scorer_specs(scorer_key(scorer.name)),
        description=f"{scorer.description} Each latent also scored with {scorer.control_description()}.",
    )
    def _scores(context: AssetExecutionContext):
        def score_shard(partition_key: str, asked=lambda: None) -> MaterializeResult:
            coder, shard = coder_and_shard(partition_key)
            resources = context.resources
            store = resources.settings.store
            layout = store.layout
            client = (
                resources.llm.client(
                    layout,
                    role="judge",
                    coordination_url=resources.settings.coordination_url,
                )
                if "llm" in scorer.uses
                else None
            )
            corpus = load_corpus(layout)
            used = {
                "judge": client.identity if client else "",
                "embedder": resources.embedder.identity() if "embedder" in scorer.uses else "",
                "subject_model": resources.subject_model.identity()
                if "subject_model" in scorer.uses
                else "",
            }
            named = "; ".join(f"{role}={identity}" for role, identity in used.items() if identity)
            deps = ScorerDeps(
                llm=client,
                models=named,
                embedder=resources.embedder if "embedder" in scorer.uses else None,
                corpus_windows=CorpusWindows(
                    layout.lancedb_dir,
                    corpus.meta["hash"],
                    corpus.tokens,
                    window_embedding(resources.embedder.model),
                )
                if "embedder" in scorer.uses
                else None,
                subject_model=resources.subject_model if "subject_model" in scorer.uses else None,
                coder=load_registered(layout.registry_dir, coder)
                if "coder" in scorer.uses
                else None,
                activations_dir=layout.activations_dir(coder) if "coder" in scorer.uses else None,
            )
            judge = scorer(settings, deps)
            exemplars = store.exemplars(coder, shard).require()  # read a chunk of latents at a time
            explanations_table = store.explanations(coder, shard)
            explanations = explanations_table.read() if judge.uses_explanation else None
            exemplars_fingerprint = exemplars.fingerprint()
            if (
                explanations is not None
                and len(explanations)
                and "exemplars_fingerprint" in explanations
            ):
                read_from, now = (
                    explanations["exemplars_fingerprint"].iloc[0],
                    exemplars_fingerprint,
                )
                if read_from != now:
                    raise Failure(
                        f"The explanations of {coder} shard {shard} were written from other "
                        f"exemplars ({read_from}) than those there now ({now}): "
                        "scoring them on the new windows mixes two versions. "
                        "Fix: re-materialize `explanations` for this partition first."
                    )
            max_latents = resources.settings.max_latents_per_shard
            fingerprints = "|".join(
                [
                    exemplars_fingerprint,
                    *([explanations_table.fingerprint()] if explanations_table.exists() else []),
                ]
            )
            with store.writing(
                store.scores(coder, shard, scorer.name),
                journal_key=f"{scorer_version(scorer)}|{settings.digest()}|{named}|{fingerprints}",
                parts=("examples", "scores"),
            ) as writer:
                vocab = corpus_prompt_vocab(corpus)
                senses = (
                    scorable_senses(store, coder, shard, explanations, context.log.warning)
                    if judge.scores_senses and judge.uses_explanation
                    else None
                )
                reseeds_table = store.explanation_reseeds(coder, shard)
                reseeds = (
                    current_reseeds(reseeds_table.read(), explanations)
                    if judge.uses_explanation and reseeds_table.exists()
                    else None
                )  # `[explanations] stability_latents`: none while it was never on

                async def union_and_senses():  # one event loop: the judge's client is bound to it
                    frame, examples = await score_partition(
                        judge,
                        exemplars,
                        explanations,
                        vocab,
                        max_latents,
                        context.log.info,
                        writer.journal,
                        coder,
                    )
                    scored = (
                        senses[senses["latent"].isin(frame["latent"] if len(frame) else [])]
                        if senses is not None
                        else None
                    )  # `max_latents_per_shard`
                    second = (
                        reseeds[reseeds["latent"].isin(frame["latent"] if len(frame) else [])]
                        if reseeds is not None
                        else None
                    )
                    return (
                        frame,
                        examples,
                        await score_senses(judge, exemplars, scored, vocab, coder)
                        if scored is not None
                        else None,
                        await score_reseeds(judge, exemplars, second, vocab, coder)
                        if second is not None
                        else None,
                    )

                frame, examples, sense_frame, reseed_frame = asyncio.run(union_and_senses())
                asked()  # a range's next shard may ask now, while this one is written (`each_shard`)
                if (
                    len(frame)
                    and frame["n_failed"].sum() > 0
                    and (frame["n_scored"].fillna(0) + frame["control_n_scored"].fillna(0)).sum()
                    == 0
                ):
                    reasons = pd.Series(
                        [reason for cell in frame["failures"] for reason in json.loads(cell)],
                        dtype=str,
                    )
                    raise nothing_succeeded(
                        f"scores/{scorer.name}",
                        f"no example of {len(frame)} latents could be scored",
                        reasons,
                    )
                writer.commit(
                    frame,
                    (store.scored_examples(coder, shard, scorer.name), examples),
                    *(
                        [(store.sense_scores(coder, shard, scorer.name), sense_frame)]
                        if sense_frame is not None
                        else []
                    ),
                    *(
                        [(store.reseed_scores(coder, shard, scorer.name), reseed_frame)]
                        if reseed_frame is not None
                        else []
                    ),
                )
            metadata = scorer_metadata(scorer, settings, frame, examples)
            if sense_frame is not None and len(sense_frame):
                metadata["senses_scored"] = len(sense_frame)
                metadata[f"mean_sense_{scorer.main_metric}"] = MetadataValue.float(
                    round(float(sense_frame[scorer.main_metric].mean()), 4)
                )
            if reseed_frame is not None and len(reseed_frame):
                said = reseed_stability(
                    frame.set_index("latent")[scorer.main_metric],
                    reseed_frame.set_index("latent")[scorer.main_metric],
                    pd.Series(dtype=float),
                )
                metadata["reseeds_scored"] = len(reseed_frame)
                metadata["mean_abs_reseed_difference"] = MetadataValue.float(
                    round(said["mean_abs_difference"], 4)
                )
            metadata.update(
                {
                    f"{role}_model" if role == "judge" else role: identity
                    for role, identity in used.items()
                    if identity
                }
            )
            if not latents_in(exemplars):
                metadata["verdict"] = EMPTY_SHARD
            if client is not None:
                metadata.update(client.ledger.as_metadata())
                metadata.update(card_metadata(layout, client.identity, scorer.name))
            context.log.info(f"{scorer.name}: {metadata['verdict']}")
            return MaterializeResult(
                metadata=metadata, check_results=scorer_results(frame, examples)
            )

        yield from each_shard(
            context,
            score_shard,
            overlap="llm" in scorer.uses
            and overlaps_shards(context.resources.llm, "judge", scorer.uses),
        )

    return _scores


def current_explanations(store: TableStore, coder: str, shard: str) -> pd.DataFrame:
    """The shard's explanations rows (latent, explanation, status) that it holds now with status ok."""
    columns = ["latent", "explanation", "status"]
    table = store.explanations(coder, shard).read_if_present(columns=columns)
    if table is None:
        return pd.DataFrame(columns=columns)
    return table[table["status"] == "ok"]


def current_senses(
    store: TableStore, coder: str, shard: str, explained: pd.DataFrame
) -> pd.DataFrame:
    """The shard's `explanation_senses` rows (latent, sense, explanation) of its `explained` rows."""
    columns = ["latent", "sense", "explanation"]
    senses = store.explanation_senses(coder, shard).read_if_present(columns=columns)
    if senses is None:
        return empty_table("explanation_senses")[columns]
    return of_current(senses, explained)


def summary_table(store: TableStore, coder: str, scorers: dict[str, type[Scorer]]) -> pd.DataFrame:
    """One row per scored latent of `coder` (all shards): each scorer's main metric, its control and the gap,
    beside the latent's current explanation. A score made with another explanation (a scorer not re-run
    after a re-explain) is not shown as the latent's: its columns are NaN and `stale` names the scorer.
    `senses` counts the senses of the current explanation (0: none), and per scorer that scores senses
    `<scorer>_min_sense` is its lowest sense's main metric (`assets.senses.lowest_sense_scores`; NaN with one sense).
    Per scorer that asks a judge, `<scorer>_calibration` names the calibration card of the judge that made the
    latent's score (`assets/calibration.py`; '' where that judge has none yet).
    Where latents were re-explained (`assets.stability`), `<scorer>_reseed` is the main metric of a latent's
    current second text and `reseed_similarity` the two texts' similarity; without any, no such column."""
    parts, counts, lowest = (
        [],
        {},
        {name: [] for name, scorer in scorers.items() if scorer.scores_senses},
    )
    cards = {name: {} for name, scorer in scorers.items() if "llm" in scorer.uses}
    seconds: list[pd.DataFrame] = []
    for shard in store.scored_shards(coder):
        explained = current_explanations(store, coder, shard)
        reseeds = current_reseeds(
            store.explanation_reseeds(coder, shard).read_if_present(), explained
        ).set_index("latent")
        current = dict(zip(explained["latent"].astype(int), explained["explanation"], strict=False))
        senses = current_senses(store, coder, shard, explained)
        counts |= {latent: 1 for latent in current} | senses.groupby("latent").size().to_dict()
        for name, scorer in scorers.items():
            main = scorer.main_metric
            if (
                name in lowest
                and len(senses)
                and (scored := store.sense_scores(coder, shard, name).read_if_present()) is not None
            ):
                lowest[name].append(lowest_sense_scores(senses, scored, main))
            second = (
                store.reseed_scores(coder, shard, name).read_if_present() if len(reseeds) else None
            )
            if second is not None and len(second):
                fresh = second[
                    second["explanation"] == second["latent"].map(reseeds["explanation"])
                ]
                seconds.append(
                    pd.DataFrame(
                        {
                            "latent": fresh["latent"].astype(int),
                            "shard": shard,
                            "scorer": name,
                            "score": fresh[scorer.main_metric],
                            "similarity": fresh["latent"].map(reseeds["similarity"]),
                        }
                    )
                )
            frame = store.scores(coder, shard, name).read_if_present()
            if frame is None or not len(frame):  # an empty shard adds nothing
                continue
            latents = frame["latent"].astype(int)
            if name in cards and "models" in frame:
                layout = store.layout
                named = {
                    judge: card_name(layout, judge) for judge in set(frame["models"].map(judge_of))
                }
                cards[name] |= dict(
                    zip(latents, frame["models"].map(judge_of).map(named), strict=True)
                )
            stale = stale_scores(frame, explained)
            parts.append(
                pd.DataFrame(
                    {
                        "latent": latents,
                        "shard": shard,
                        "scorer": name,
                        "explanation": latents.map(current).fillna(frame["explanation"]),
                        "score": frame[main].mask(stale),
                        "control": frame[f"control_{main}"].mask(stale),
                        "gap": frame["gap"].mask(stale),
                        "stale": stale,
                    }
                )
            )
    if not parts:
        return empty_table("score_summary")
    long = pd.concat(parts, ignore_index=True)
    explanation = long[long["explanation"] != ""].groupby("latent")["explanation"].first()
    stale = (
        long[long["stale"]]
        .groupby("latent")["scorer"]
        .agg(lambda names: f"{STALE} ({', '.join(sorted(names))})")
    )
    wide = long.set_index(["latent", "shard", "scorer"])[["score", "control", "gap"]].unstack(
        "scorer"
    )  # keeps a row whose every score is stale
    wide.columns = [name if kind == "score" else f"{name}_{kind}" for kind, name in wide.columns]
    for name in long[
        "scorer"
    ].unique():  # a column that is all NaN (e.g. no control with one latent) is still a column
        for column in (name, f"{name}_control", f"{name}_gap"):
            if column not in wide.columns:
                wide[column] = np.nan
    wide = wide.reset_index()
    wide.insert(2, "explanation", wide["latent"].map(explanation).fillna(""))
    gaps = [c for c in wide.columns if c.endswith("_gap")]
    wide["mean_gap"] = wide[gaps].mean(axis=1)
    wide["stale"] = [stale.get(latent, "") for latent in wide["latent"]]
    wide["senses"] = wide["latent"].map(counts).fillna(0).astype("int64")
    for name, found in lowest.items():
        if name in long["scorer"].unique():
            wide[f"{name}_min_sense"] = (
                wide["latent"].map(pd.concat(found)).astype("float64") if found else np.nan
            )
    for name, found in cards.items():
        if name in long["scorer"].unique():
            wide[f"{name}_calibration"] = [found.get(latent, "") for latent in wide["latent"]]
    if seconds:
        second = pd.concat(seconds, ignore_index=True)
        scored = second.pivot_table(index="latent", columns="scorer", values="score", dropna=False)
        for name in scored.columns:
            wide[f"{name}_reseed"] = wide["latent"].map(scored[name]).astype("float64")
        similarity = second.drop_duplicates("latent").set_index("latent")["similarity"]
        wide["reseed_similarity"] = wide["latent"].map(similarity).astype("float64")
    return wide


def coder_summary(table: pd.DataFrame, scorers: dict[str, type[Scorer]]) -> dict[str, dict]:
    """Per scorer in a coder's summary `table`: the mean main metric and its control's over the latents
    with both, the mean gap, each with its 95 % t interval over those latents (paired: the same latents),
    and the verdict. A scorer no latent has a control for gets its mean over the scored latents alone."""
    found = {}
    for name, scorer in scorers.items():
        if name not in table.columns or not len(table):
            continue
        score, control, gap = table[name], table[f"{name}_control"], table[f"{name}_gap"]
        paired = table[[name, f"{name}_control"]].dropna()
        mean, mean_control, n = paired_means(score, control)
        own = paired[name] if n else score
        found[name] = {
            "main_metric": scorer.main_metric,
            "latents": int(score.notna().sum()),
            "with_control": n,
            "mean": mean,
            "mean_interval": list(mean_interval(own)),
            "control": mean_control,
            "control_interval": list(mean_interval(paired[f"{name}_control"])),
            "gap": float(gap.mean()) if gap.notna().any() else float("nan"),
            "gap_interval": list(mean_interval(gap)),
            "verdict": verdict(gap, scorer.control_description()),
        }
        if f"{name}_reseed" in table.columns:  # `[explanations] stability_latents`
            found[name]["stability"] = reseed_stability(
                score, table[f"{name}_reseed"], table["reseed_similarity"]
            )
    return found


def summary_sources(
    store: TableStore, coder: str, scorers: dict[str, type[Scorer]]
) -> dict[str, str]:
    """`<shard>/<scorer>` → fingerprint of each scores table of `coder` that the summary joins, and of each
    scored shard's explanations (`<shard>/explanations`): a re-explain changes which scores are stale; its
    senses and their scores (`<shard>/senses`, `<shard>/<scorer>.senses`); and `code_version`, the summary's
    (`SUMMARY_VERSION`), so that a summary built by older code (without newer columns) is built again."""
    shards = store.scored_shards(coder)
    tables = {
        f"{shard}/{name}": store.scores(coder, shard, name) for shard in shards for name in scorers
    }
    tables |= {f"{shard}/explanations": store.explanations(coder, shard) for shard in shards}
    tables |= {f"{shard}/senses": store.explanation_senses(coder, shard) for shard in shards}
    tables |= {
        f"{shard}/{name}.senses": store.sense_scores(coder, shard, name)
        for shard in shards
        for name, scorer in scorers.items()
        if scorer.scores_senses
    }
    tables |= {f"{shard}/reseeds": store.explanation_reseeds(coder, shard) for shard in shards}
    tables |= {
        f"{shard}/{name}.reseeds": store.reseed_scores(coder, shard, name)
        for shard in shards
        for name in scorers
    }  # only those that exist count: none while `stability_latents` was never on
    found = {source: table.fingerprint() for source, table in tables.items() if table.exists()}
    cards = card_files(store.layout) if found else []
    found |= {f"calibration/{card.name}": file_digest(card) for card in cards}
    return found | {"code_version": SUMMARY_VERSION} if found else {}


def summary_is_stale(store: TableStore, coder: str, sources: dict[str, str]) -> bool:
    """Whether the summary was built from other scores tables than `sources` (a table added, changed or
    deleted, a scorer added or dropped), or there is none yet while there are scores. Contents, not file
    times: a deleted table leaves no newer file behind, and a copied one may keep an old time."""
    if not store.score_summary(coder).exists():
        return bool(sources)
    return store.summary_sources(coder) != sources


def summary_links(base: str, ranked: dict[str, list[int]], per_coder: int = 5) -> dict:
    """Links into the latent browser at `base` for the summary's metadata: with one coder, its page and its
    latents' pages (`ranked`: best mean gap first); with several, the coders page and each coder's page
    with its best latents."""
    if len(ranked) == 1:
        return viewer_links(base, *next(iter(ranked.items())))
    if not ranked:
        return {}
    pages = [
        f"- [{coder}]({coder_url(coder, base)}): "
        + ", ".join(f"[{latent}]({latent_url(coder, latent, base)})" for latent in best[:per_coder])
        for coder, best in ranked.items()
    ]
    return {
        "viewer": MetadataValue.url(home_url(base)),
        "latent_pages": MetadataValue.md("\n".join(pages)),
    }


def summary_asset(scorers: dict[str, type[Scorer]]) -> AssetsDefinition:
    """`score_summary`: per coder, every scorer joined over all its shards into one table; one asset for
    all coders (a coder's shards are partitions of their own), rebuilding only coders whose scores changed."""

    @asset(
        name="score_summary",
        group_name="scores",
        deps=[AssetDep(scorer_key(name)) for name in scorers],
        automation_condition=SUMMARY_AUTOMATION,
        required_resource_keys={"settings"},
        code_version=SUMMARY_VERSION,
        **in_pool(None),
        check_specs=summary_specs(),
        description="Per coder, every scorer joined into one table over all shards "
        "(each main metric, its control and the gap), with verdicts; "
        "coders whose scores changed are rebuilt.",
    )
    def score_summary(context: AssetExecutionContext) -> MaterializeResult:
        settings = context.resources.settings
        store = settings.store
        partition_keys = context.instance.get_dynamic_partitions(shard_partitions.name)
        coders = coders_of(partition_keys)
        rebuilt, rows, latents, present, ranked = [], [], 0, set(), {}
        for coder in coders:
            sources = summary_sources(store, coder, scorers)
            if summary_is_stale(store, coder, sources):
                store.commit_summary(coder, summary_table(store, coder, scorers), sources)
                rebuilt.append(coder)
            if (table := store.score_summary(coder).read_if_present()) is not None:
                row = {
                    "coder": coder,
                    "latents": int(table["latent"].nunique()) if len(table) else 0,
                }
                ranked[coder] = (
                    table.sort_values("mean_gap", ascending=False, na_position="last")[
                        "latent"
                    ].tolist()
                    if len(table)
                    else []
                )
                latents += row["latents"]
                for name in scorers:
                    if name in table.columns and len(table):
                        present.add(name)
                        row[name] = beside_control(
                            *paired_means(table[name], table[f"{name}_control"])[:2]
                        )
                        row[f"{name} verdict"] = verdict(
                            table[f"{name}_gap"], scorers[name].control_description()
                        ).split(":")[0]
                rows.append(row)
        context.log.info(f"score_summary: rebuilt {len(rebuilt)} of {len(coders)} coders")
        metadata = {
            "coders": len(coders),
            "latents": latents,
            "rebuilt": ", ".join(rebuilt) or "none (no scores changed)",
            "scorers": ", ".join(name for name in scorers if name in present) or "none yet",
        }
        accounted = {c: found for c in coders if (found := coder_accounting(store, c)) is not None}
        if accounted:  # every latent of each coder, in one bucket each (`assets/accounting.py`)
            metadata["latent_accounting"] = MetadataValue.json(
                {
                    c: {k: v for k, v in found.items() if k != "shards"}
                    for c, found in accounted.items()
                }
            )
        if rows:
            metadata["by_coder"] = MetadataValue.md(
                pd.DataFrame(rows).fillna("").to_markdown(index=False)
            )
        for coder in (
            rebuilt[:1] if len(coders) == 1 else []
        ):  # one coder: its histograms and best/worst latents, as before
            table = store.score_summary(coder).read()
            present = [name for name in scorers if name in table.columns]
            if present and len(table):
                panels = [
                    (
                        f"{n} ({scorers[n].main_metric})",
                        scorers[n].main_metric,
                        table[n],
                        table[f"{n}_control"],
                        scorers[n].control_description(),
                    )
                    for n in present
                ]
                metadata["histograms"] = MetadataValue.md(histogram_markdown(panels))
                metadata["best_and_worst"] = MetadataValue.md(
                    best_and_worst(
                        table, "mean_gap", ["latent", "shard", "mean_gap", *present, "explanation"]
                    )
                )
                for name, said in coder_summary(table, scorers).items():
                    metadata[f"{name}_verdict"] = said["verdict"]
                    metadata[f"{name}_mean"] = MetadataValue.float(round(said["mean"], 4))
                    metadata[f"{name}_mean_control"] = MetadataValue.float(
                        round(said["control"], 4)
                    )
                    for part in ("mean", "control", "gap"):
                        lo, hi = said[f"{part}_interval"]
                        metadata[f"{name}_{part}_interval"] = (
                            f"[{lo:.4f}, {hi:.4f}] (95 %, over latents)"
                        )
                    if "stability" in said:
                        metadata[f"{name}_reseed_stability"] = stability_line(said["stability"])
        metadata.update(summary_links(settings.viewer_url, ranked))
        metadata["path"] = MetadataValue.path(str(store.layout.scores_dir))
        shards = {
            coder: [
                coder_and_shard(key)[1]
                for key in partition_keys
                if coder_and_shard(key)[0] == coder
            ]
            for coder in coders
        }
        coverage = shards_present(shards, {coder: store.scored_shards(coder) for coder in coders})
        return MaterializeResult(
            metadata=metadata, check_results=[result("shards_present", coverage)]
        )

    return score_summary
