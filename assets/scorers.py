"""The six scorers: how each judges an explanation (or, for intruder, a latent) on held-out examples.

Each scorer turns one job (an explanation and a latent's held-out `test` windows) into one row per
judged example, with a 0/1 `prediction` and/or a real `score`; `assets/score_metrics.py` turns
rows into metrics the same way for all of them. Every job also runs as a control (see `CONTROLS`).

- detection (delphi): the judge reads the explanation and says which windows the latent fires in.
- fuzzing (delphi): windows come with tokens marked (the latent's own, or random ones in windows
  where it is silent); the judge says which marks the explanation describes.
- intruder (delphi): no explanation; in each task one marked window of k is not the latent's,
  and the judge must find it. Is the latent itself coherent?
- simulation (OpenAI): the judge predicts each token's activation on a 0-10 scale from the
  explanation; the expected value over the answer's logprobs for 0..10 (parsed values where the
  backend gives none) is correlated with the true activations over all tokens at once.
- surprisal (delphi): how much the explanation, as a prefix, lowers the subject model's loss on a
  window; activating windows should gain more than the others (ROC AUC).
- embedding (delphi): cosine similarity of the explanation to each window in MiniLM space (ROC AUC).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from assets.prompts import (
    DETECTION_SYSTEM,
    FUZZING_SYSTEM,
    SURPRISAL_DESCRIPTION,
    SURPRISAL_NO_DESCRIPTION,
    highlight,
    intruder_messages,
    parse_int_list,
    plain_text,
    reask_list_message,
    scorer_messages,
    simulation_messages,
)
from assets.score_metrics import NAN, pearson
from resources.llm import LLMEndpointError, ProductionClient

# ---- settings: one model per scorer; their hash is part of the scorer asset's code version ----------


class ScorerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # strict: `true` is no number of examples
    seed: int = Field(default=0, description="Seed of example order, random marks, intruder tasks and the control's explanation shuffle.")

    def digest(self) -> str:
        """Short hash of every setting: a change makes this scorer's results, and only them, stale."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:10]


class DetectionSettings(ScorerSettings):
    examples_per_prompt: int = Field(default=10, ge=1, description="Windows judged per request (delphi shows 5; 10 keeps the control within delphi's request count).")


class FuzzingSettings(DetectionSettings):
    pass


class IntruderSettings(ScorerSettings):
    examples_per_task: int = Field(default=5, ge=2, description="Windows per task, one of them the intruder.")
    max_tasks: int = Field(default=10, ge=1, description="Tasks per latent (delphi: one per non-activating window).")


class SimulationSettings(ScorerSettings):
    top_logprobs: int = Field(default=10, ge=0, le=20, description="Alternatives per answer token used for expected values; 0 = parsed values only.")
    calibrate: bool = Field(default=False, description="Fit a linear map from simulated to true activations on the `valid` windows and report R² (correlation is unchanged by it).")


class SurprisalSettings(ScorerSettings):
    batch_size: int = Field(default=16, ge=1, description="Windows per forward pass of the subject model.")


class EmbeddingSettings(ScorerSettings):
    query_prefix: str = Field(default="", description="Text put before the explanation; instruction-tuned embedders want e.g. delphi's 'Instruct: Retrieve sentences that could be related to the explanation.\\nQuery:'.")


# ---- examples and jobs ---------------------------------------------------------------------------


@dataclass
class Example:
    index: int
    token_ids: list[int]
    token_strs: list[str]
    activations: np.ndarray
    marks: np.ndarray
    """The latent's firing tokens; in non-activating windows, random tokens (as many as typically fire)."""
    label: int
    quantile: int

    @property
    def text(self) -> str:
        """The window as prompts show it (whitespace and document boundaries visible)."""
        return highlight(self.token_strs, [False] * len(self.token_strs))

    @property
    def marked_text(self) -> str:
        return highlight(self.token_strs, self.marks.tolist())


def held_out_examples(rows: pd.DataFrame, vocab: list[str], rng: np.random.Generator) -> list[Example]:
    """A latent's windows in a seeded order, non-activating ones with random marks."""
    activating = rows[rows["kind"] == "activating"]
    typical_marks = max(1, int(np.median([np.count_nonzero(a) for a in activating["activations"]]))) if len(activating) else 1
    examples = []
    for i, row in enumerate(rows.itertuples()):
        acts = np.asarray(row.activations, np.float32)
        is_activating = row.kind == "activating"
        marks = acts > 0
        if not is_activating:
            marks = np.zeros(len(acts), bool)
            marks[rng.choice(len(acts), size=min(typical_marks, len(acts)), replace=False)] = True
        examples.append(Example(i, list(row.tokens), [vocab[t] for t in row.tokens], acts, marks, int(is_activating), int(row.quantile) if is_activating else 0))
    return [examples[i] for i in rng.permutation(len(examples))]


@dataclass
class Job:
    explanation: str | None
    examples: list[Example]
    control: bool
    seed: int
    calibration: list[Example] = field(default_factory=list)


@dataclass
class JobResult:
    rows: list[dict]
    failed: int = 0
    """Examples lost to failed or unreadable answers."""
    dropped: int = 0
    """Examples left out so that a prompt fits the judge's context."""
    failures: list[str] = field(default_factory=list)
    """Why each failed request failed, with the raw answer where there was one."""
    prompt_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def lost(self, examples: int, reason: str) -> None:
        self.failed += examples
        self.failures.append(reason)


def example_row(example: Example, prediction: float = NAN, score: float = NAN, **extra) -> dict:
    return {"example": example.index, "label": example.label, "quantile": example.quantile,
            "activation": float(example.activations.max()), "prediction": prediction, "score": score, **extra}


@dataclass
class ScoringContext:
    """What scorers may use; each scorer touches only its own part."""

    settings: ScorerSettings
    client: ProductionClient | None = None
    embed: Callable[[list[str]], np.ndarray] | None = None
    causal_lm: Callable[[], object] | None = None
    tokenizer: Callable[[], object] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    baseline_losses: dict[tuple[int, ...], float] = field(default_factory=dict)
    """Surprisal without an explanation, per window: shared by a latent's own and control jobs."""


def list_tokens(n: int, hi: int) -> int:
    """Room for an answer of n values up to `hi`, with separators and a JSON wrapper."""
    return 8 + (3 + len(str(hi))) * n


@dataclass
class Asked:
    """One value-list question's outcome: the values, or why there are none (with the raw answers)."""

    values: list[int] | None
    answer: object | None = None
    prompt_tokens: int = 0
    failure: str = ""


async def _ask_list(ctx: ScoringContext, messages: list[dict], n: int, lo: int, hi: int, top_logprobs: int = 0) -> Asked:
    """One request whose answer must be a list of n integers in [lo, hi]. An answer that cannot be read
    is asked again once (a follow-up turn that says so); if that fails too the question fails with both
    raw answers, and the unreadable answers are dropped from the cache so the next run asks again.
    Only whole-run errors propagate: anything else loses this question, not the latent."""
    params = {"max_tokens": list_tokens(n, hi), "int_list": (n, lo, hi), "top_logprobs": top_logprobs}
    answers = []
    try:
        values = await ctx.client.ask_readable(messages, lambda text: parse_int_list(text, n, lo, hi), reask_list_message(n, lo, hi), answers, **params)
    except LLMEndpointError:
        raise
    except Exception as error:  # budget, retries exhausted, a rejected request: this question is lost
        said = f" after {' then '.join(repr(a.text[:300]) for a in answers)}" if answers else ""
        return Asked(None, None, sum(a.prompt_tokens for a in answers), f"{type(error).__name__}: {str(error)[:300]}{said}")
    if values is not None:
        return Asked(values, answers[-1], sum(a.prompt_tokens for a in answers))
    raws = " then ".join(repr(a.text[:300]) for a in answers)
    return Asked(None, None, sum(a.prompt_tokens for a in answers), f"unreadable answer (wanted {n} integers from {lo} to {hi}): {raws}")


async def _classify(ctx: ScoringContext, job: Job, system: str, text_of: Callable[[Example], str]) -> JobResult:
    size = ctx.settings.examples_per_prompt
    batches = [job.examples[i : i + size] for i in range(0, len(job.examples), size)]
    result = JobResult([])
    prompts = []  # (the examples a prompt kept, the prompt), for prompts that kept any
    for batch in batches:
        messages, dropped = ctx.client.fitting(lambda kept: scorer_messages(system, job.explanation, [text_of(e) for e in kept]), batch, list_tokens(len(batch), 1))
        result.dropped += dropped
        if messages is not None:
            prompts.append((batch[: len(batch) - dropped], messages))
    asked = await asyncio.gather(*(_ask_list(ctx, messages, len(kept), 0, 1) for kept, messages in prompts))
    for (kept, _), outcome in zip(prompts, asked):
        result.prompt_tokens += outcome.prompt_tokens
        if outcome.values is None:
            result.lost(len(kept), outcome.failure)
            continue
        result.rows += [example_row(e, prediction=p) for e, p in zip(kept, outcome.values)]
    return result


async def detection(ctx: ScoringContext, job: Job) -> JobResult:
    return await _classify(ctx, job, DETECTION_SYSTEM, lambda e: e.text)


async def fuzzing(ctx: ScoringContext, job: Job) -> JobResult:
    return await _classify(ctx, job, FUZZING_SYSTEM, lambda e: e.marked_text)


def intruder_tasks(examples: list[Example], k: int, max_tasks: int, rng: np.random.Generator, control: bool) -> list[tuple[list[Example], int, int]]:
    """(windows, intruder position, quantile) per task: k-1 activating windows of neighbouring quantiles
    (a sliding run over the windows sorted by quantile, so each task is as homogeneous as the test set
    allows) and one non-activating intruder. The control task has no intruder: its last window is the
    next activating one, and a random position is called the intruder, so its accuracy is what a judge
    with no signal gets (chance, plus any position bias). Real and control tasks show the same number
    of windows (fewer than k when the latent has fewer activating windows), so chance is the same."""
    activating = sorted((e for e in examples if e.label), key=lambda e: e.quantile)
    negatives = [e for e in examples if not e.label]
    size = min(k, len(activating))  # windows per task; the control needs them all activating
    if size < 2:
        return []
    needed = size if control else size - 1
    tasks = []
    for t in range(min(max_tasks, len(negatives))):  # the control asks as many tasks as the real run
        start = t % (len(activating) - needed + 1)
        chosen = activating[start : start + needed]
        quantile = chosen[len(chosen) // 2].quantile
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
        position = int(rng.integers(0, size))
        if not control:
            chosen.insert(position, negatives[t])
        tasks.append((chosen, position, quantile))
    return tasks


async def intruder(ctx: ScoringContext, job: Job) -> JobResult:
    s = ctx.settings
    tasks = intruder_tasks(job.examples, s.examples_per_task, s.max_tasks, np.random.default_rng(job.seed), job.control)
    result = JobResult([])
    prompts = [intruder_messages([e.marked_text for e in windows]) for windows, _, _ in tasks]
    fits = [ctx.client.fits(m, list_tokens(1, len(w))) for m, (w, _, _) in zip(prompts, tasks)]
    result.dropped = sum(len(w) for (w, _, _), ok in zip(tasks, fits) if not ok)  # a task cannot lose windows: it goes whole
    asked = await asyncio.gather(*(_ask_list(ctx, m, 1, 1, len(w)) for m, (w, _, _), ok in zip(prompts, tasks, fits) if ok))
    kept = [(i, task) for i, (task, ok) in enumerate(zip(tasks, fits)) if ok]
    for (i, (windows, position, quantile)), outcome in zip(kept, asked):
        result.prompt_tokens += outcome.prompt_tokens
        if outcome.values is None:
            result.lost(1, outcome.failure)
            continue
        mean_activation = float(np.mean([e.activations.max() for e in windows if e.label]))
        result.rows.append({"example": i, "label": 1, "quantile": quantile, "activation": mean_activation,
                            "prediction": int(outcome.values[0] - 1 == position), "score": NAN})
    return result


_VALUE_TOKEN = re.compile(r'^[\s,\[\]{}:"]*(\d{1,2})[\s,\]}"]*$')


def expected_values(answer, values: list[int]) -> list[float] | None:
    """Per listed value, the expected value over the logprobs of the tokens 0..10 where it was written.

    None (and the caller uses the parsed values) when the answer has no logprobs or they do not align
    with the parsed list: the written list differs, or a value was not written as a token of its own
    (digits fused with other text), so its alternatives are not alternative values. Separators fused
    to a digit ("5,") still count as that digit. Where a tokenizer writes 10 as "1" "0", the "1"
    alternative counts as 10 there; elsewhere "1" is 1.
    """
    if not answer.tokens or len(answer.tokens) != len(answer.top_logprobs):
        return None
    text = "".join(answer.tokens)
    body = re.search(r"\[([^\]]*)\]", text)
    if not body or [int(m) for m in re.findall(r"\d+", body.group(1))] != values:
        return None
    starts = [body.start(1) + m.start() for m in re.finditer(r"\d+", body.group(1))]
    ends = np.cumsum([len(t) for t in answer.tokens])
    out = []
    for start, written in zip(starts, values):
        step = int(np.searchsorted(ends, start, side="right"))
        chosen = _VALUE_TOKEN.match(answer.tokens[step])
        split_ten = written == 10 and chosen is not None and chosen.group(1) == "1"
        if chosen is None or (int(chosen.group(1)) != written and not split_ten):
            return None
        weights: dict[int, float] = {}
        for alternative, logprob in answer.top_logprobs[step].items():
            match = _VALUE_TOKEN.match(alternative)
            if match and int(match.group(1)) <= 10:
                value = 10 if split_ten and match.group(1) == "1" else int(match.group(1))
                weights[value] = weights.get(value, 0.0) + float(np.exp(logprob))
        total = sum(weights.values())
        if total <= 0:
            return None
        out.append(sum(v * w for v, w in weights.items()) / total)
    return out


async def _simulate(ctx: ScoringContext, examples: list[Example], explanation: str) -> list[tuple[Example, np.ndarray | None, str, Asked]]:
    async def one(e: Example):
        messages = simulation_messages(explanation, e.token_strs)
        n = len(e.token_strs)
        if not ctx.client.fits(messages, list_tokens(n, 10)):
            return e, None, "dropped", Asked(None, failure="prompt longer than the judge's context")
        outcome = await _ask_list(ctx, messages, n, 0, 10, ctx.settings.top_logprobs)
        if outcome.values is None:
            return e, None, "", outcome
        expected = expected_values(outcome.answer, outcome.values) if ctx.settings.top_logprobs else None
        return e, np.asarray(expected if expected is not None else outcome.values, float), "logprobs" if expected is not None else "parsed", outcome

    return await asyncio.gather(*(one(e) for e in examples))


def true_scale(example: Example, top: float) -> np.ndarray:
    """True activations on the simulator's 0-10 scale (relative to the latent's top test activation)."""
    return 10 * example.activations / max(top, 1e-9)


async def simulation(ctx: ScoringContext, job: Job) -> JobResult:
    simulated = await _simulate(ctx, job.examples, job.explanation)
    top = max((e.activations.max() for e in job.examples), default=1.0)
    result = JobResult([])
    for e, values, source, outcome in simulated:
        result.prompt_tokens += outcome.prompt_tokens
        if source == "dropped":
            result.dropped += 1
        elif values is None:
            result.lost(1, outcome.failure)
        else:
            result.rows.append(example_row(e, score=float(values.max()), simulated=values.tolist(), true_activations=true_scale(e, top).tolist(), values_from=source))
    if result.rows:
        truth = np.concatenate([r["true_activations"] for r in result.rows])
        guess = np.concatenate([r["simulated"] for r in result.rows])
        # over all tokens of all windows at once; a constant simulation carries no information: 0, not NaN
        result.extra["ev_correlation"] = 0.0 if np.ptp(guess) == 0 and np.ptp(truth) > 0 else pearson(guess, truth)
        result.extra["logprob_fraction"] = float(np.mean([r["values_from"] == "logprobs" for r in result.rows]))
        if ctx.settings.calibrate and job.calibration:
            fitted = [(e, v) for e, v, _, _ in await _simulate(ctx, job.calibration, job.explanation) if v is not None]
            if fitted:
                x = np.concatenate([v for _, v in fitted])
                y = np.concatenate([true_scale(e, top) for e, _ in fitted])
                slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(y.mean()))
                calibrated = slope * guess + intercept
                result.extra["rsquared"] = float(1 - np.mean((truth - calibrated) ** 2) / max(np.mean(truth**2), 1e-12))
    return result


def _losses(ctx: ScoringContext, prefix: str, examples: list[Example]) -> np.ndarray:
    """Mean next-token loss of each window's tokens after `prefix`, from the subject model."""
    tokenizer, lm = ctx.tokenizer(), ctx.causal_lm()
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(0, len(examples), ctx.settings.batch_size):
        batch = examples[i : i + ctx.settings.batch_size]
        length = len(prefix_ids) + max(len(e.token_ids) for e in batch)
        ids = torch.zeros((len(batch), length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(batch):
            sequence = prefix_ids + e.token_ids
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        with torch.inference_mode():
            logits = lm(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits.float().cpu()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        scored = mask[:, 1:].bool()
        scored[:, : len(prefix_ids) - 1] = False  # only the window's own tokens count
        out += [float(nll[r][scored[r]].mean()) for r in range(len(batch))]
    return np.asarray(out)


async def surprisal(ctx: ScoringContext, job: Job) -> JobResult:
    def compute():
        # One job at a time: the other job of this latent may be computing the same baselines, torch
        # already uses every core, and loading the model from two threads breaks its lazy initialization.
        with ctx.lock:
            missing = [e for e in job.examples if tuple(e.token_ids) not in ctx.baseline_losses]
            if missing:
                without = SURPRISAL_DESCRIPTION.format(explanation=SURPRISAL_NO_DESCRIPTION)
                ctx.baseline_losses.update(zip((tuple(e.token_ids) for e in missing), _losses(ctx, without, missing)))
            return _losses(ctx, SURPRISAL_DESCRIPTION.format(explanation=job.explanation), job.examples)

    informed = await asyncio.to_thread(compute)
    return JobResult([example_row(e, score=ctx.baseline_losses[tuple(e.token_ids)] - float(i)) for e, i in zip(job.examples, informed)])


def explanation_similarity(embed: Callable[[list[str]], np.ndarray], explanations: list[str], texts: list[str]) -> np.ndarray:
    """Cosine similarity `[len(texts), len(explanations)]` of each text to each explanation, embedded in one call."""
    vectors = embed(explanations + texts)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors[len(explanations) :] @ vectors[: len(explanations)].T


async def embedding(ctx: ScoringContext, job: Job) -> JobResult:
    similarity = await asyncio.to_thread(explanation_similarity, ctx.embed, [ctx.settings.query_prefix + job.explanation], [plain_text(e.text) for e in job.examples])
    return JobResult([example_row(e, score=float(s)) for e, s in zip(job.examples, similarity[:, 0])])


# ---- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    run: Callable[[ScoringContext, Job], Awaitable[JobResult]]
    settings: type[ScorerSettings]
    main_metric: str
    uses: frozenset[str]
    """Resources it needs: any of 'llm', 'embedder', 'subject_model'."""
    version: str
    description: str

    @property
    def uses_explanation(self) -> bool:
        return self.name != "intruder"

    @property
    def control(self) -> str:
        return "tasks without an intruder" if not self.uses_explanation else "the shuffled-explanation control"


SCORERS: dict[str, ScorerSpec] = {
    spec.name: spec
    for spec in [
        ScorerSpec("detection", detection, DetectionSettings, "balanced_accuracy", frozenset({"llm"}), "1",
                   "Detection (delphi): does the latent fire in this window, given the explanation?"),
        ScorerSpec("fuzzing", fuzzing, FuzzingSettings, "balanced_accuracy", frozenset({"llm"}), "1",
                   "Fuzzing (delphi): are the marked tokens what the explanation describes?"),
        ScorerSpec("intruder", intruder, IntruderSettings, "accuracy", frozenset({"llm"}), "1",
                   "Intruder (delphi): can the judge find the one window that is not the latent's? No explanation used."),
        ScorerSpec("simulation", simulation, SimulationSettings, "ev_correlation", frozenset({"llm"}), "1",
                   "Simulation (OpenAI): correlation of logprob-expected 0-10 activations with the true ones, over all tokens."),
        ScorerSpec("surprisal", surprisal, SurprisalSettings, "roc_auc", frozenset({"subject_model"}), "1",
                   "Surprisal (delphi): how much more the explanation lowers the subject model's loss on activating windows (ROC AUC)."),
        ScorerSpec("embedding", embedding, EmbeddingSettings, "roc_auc", frozenset({"embedder"}), "1",
                   "Embedding (delphi): how well the explanation's embedding ranks activating over other windows (ROC AUC)."),
    ]
}


def scorer_settings(overrides: dict[str, dict] | None = None) -> dict[str, ScorerSettings]:
    """Every scorer's settings: defaults, updated by `overrides` ({scorer: {setting: value}})."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(SCORERS)
    if unknown:
        raise ValueError(f"Unknown scorer(s) {sorted(unknown)} in the scorer settings. Fix: use any of {sorted(SCORERS)}.")
    settings = {}
    for name, spec in SCORERS.items():
        try:
            settings[name] = spec.settings(**overrides.get(name, {}))
        except ValidationError as error:
            problems = "; ".join(f"[{name}] {'.'.join(map(str, e['loc']))} = {e.get('input')!r}: {e['msg']}" for e in error.errors())
            raise ValueError(f"{problems}. Fix: give each setting a value of its type (see the README's scorer table).") from None
    return settings
