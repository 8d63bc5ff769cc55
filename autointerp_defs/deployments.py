"""The one place that decides which models and endpoints a deployment uses (`$AUTOINTERP_DEPLOYMENT`).

- `local` (default): everything embedded, CPU only: SmolLM2-135M-Instruct via transformers and
  llama.cpp, all-MiniLM-L6-v2; explains a few latents per shard so a laptop finishes.
- `remote`: the explainer/scorer LLM is an OpenAI-compatible endpoint (`AUTOINTERP_LLM_BASE_URL`,
  `AUTOINTERP_LLM_MODEL`, key in `AUTOINTERP_LLM_API_KEY_ENV`'s variable, default OPENAI_API_KEY).
- `gpu`: as `remote`, and the subject model is `AUTOINTERP_SUBJECT_MODEL` on CUDA in bfloat16.

Scorers: every scorer is an asset in every deployment; the automated ones (local: the three that
are cheap enough on a CPU; remote and gpu: all six; or `AUTOINTERP_AUTOMATED_SCORERS=a,b`) follow new
explanations by themselves, the others run when materialized. Their settings come from the TOML
file named by `AUTOINTERP_SCORERS` (one table per scorer, e.g. `[fuzzing] examples_per_prompt = 5`).
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

from dagster import EnvVar

from assets.scorers import SCORERS, ScorerSettings, scorer_settings

from resources.embedder import EmbedderResource
from resources.llm import LLMResource
from resources.settings import AutointerpSettings
from resources.subject_model import SubjectModelResource

DEPLOYMENTS = ("local", "remote", "gpu")
CPU_SCORERS = ("detection", "fuzzing", "embedding")


def _deployment(deployment: str | None) -> str:
    deployment = deployment or os.environ.get("AUTOINTERP_DEPLOYMENT", "local")
    if deployment not in DEPLOYMENTS:
        raise ValueError(f"AUTOINTERP_DEPLOYMENT={deployment!r} is not one of {DEPLOYMENTS}.")
    return deployment


def automated_scorers(deployment: str | None = None) -> tuple[str, ...]:
    chosen = os.environ.get("AUTOINTERP_AUTOMATED_SCORERS")
    if chosen is None:
        return CPU_SCORERS if _deployment(deployment) == "local" else tuple(SCORERS)
    names = tuple(n.strip() for n in chosen.split(",") if n.strip())
    if unknown := set(names) - set(SCORERS):
        raise ValueError(f"AUTOINTERP_AUTOMATED_SCORERS names unknown scorer(s) {sorted(unknown)}. Fix: use any of {sorted(SCORERS)}.")
    return names


def scorer_settings_for(overrides: dict[str, dict] | None = None) -> dict[str, ScorerSettings]:
    """`overrides` if given, else the TOML file `$AUTOINTERP_SCORERS` names, else the defaults."""
    source = "the given overrides"
    if overrides is None and (path := os.environ.get("AUTOINTERP_SCORERS")):
        source = f"AUTOINTERP_SCORERS={path}"
        try:
            overrides = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"Cannot read the scorer settings AUTOINTERP_SCORERS={path}: {error}. Fix: point it at a TOML file with one table per scorer.") from error
    try:
        return scorer_settings(overrides)
    except ValueError as error:
        raise ValueError(f"Bad scorer settings in {source}: {error}") from None


def _remote_llm() -> LLMResource:
    key_variable = os.environ.get("AUTOINTERP_LLM_API_KEY_ENV", "OPENAI_API_KEY")
    return LLMResource(
        backend="openai",
        base_url=os.environ.get("AUTOINTERP_LLM_BASE_URL", "http://127.0.0.1:8000/v1"),
        model=os.environ.get("AUTOINTERP_LLM_MODEL", "default"),
        api_key=EnvVar(key_variable) if key_variable in os.environ else None,  # local servers need no key
        max_concurrency=int(os.environ.get("AUTOINTERP_LLM_CONCURRENCY", "32")),
        structured_output=os.environ.get("AUTOINTERP_LLM_STRUCTURED_OUTPUT", "json_schema"),
        key_setting=f"the environment variable {key_variable} (named by AUTOINTERP_LLM_API_KEY_ENV)"
        + ("" if key_variable in os.environ else f"; {key_variable} is not set"),
        model_setting="AUTOINTERP_LLM_MODEL",
    )


def resources_for(deployment: str | None = None) -> dict:
    deployment = _deployment(deployment)
    default_max_latents = "3" if deployment == "local" else "0"
    settings = AutointerpSettings(max_latents_per_shard=int(os.environ.get("AUTOINTERP_MAX_LATENTS", default_max_latents)))
    if deployment == "local":
        return {
            "settings": settings,
            "subject_model": SubjectModelResource(),
            "llm": LLMResource(),
            "embedder": EmbedderResource(),
        }
    subject = SubjectModelResource()
    if deployment == "gpu":
        subject = SubjectModelResource(model=os.environ["AUTOINTERP_SUBJECT_MODEL"], device="cuda", dtype="bfloat16", batch_size=64)
    return {
        "settings": settings,
        "subject_model": subject,
        "llm": _remote_llm(),
        "embedder": EmbedderResource(device="cuda" if deployment == "gpu" else "cpu"),
    }
