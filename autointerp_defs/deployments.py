"""The one place that decides which models and endpoints a deployment uses (`$AUTOINTERP_DEPLOYMENT`).

- `local` (default): everything embedded, CPU only: SmolLM2-135M-Instruct via transformers and
  llama.cpp, all-MiniLM-L6-v2; explains a few latents per shard so a laptop finishes.
- `remote`: the explainer/scorer LLM is an OpenAI-compatible endpoint (`AUTOINTERP_LLM_BASE_URL`,
  `AUTOINTERP_LLM_MODEL`, key in `AUTOINTERP_LLM_API_KEY_ENV`'s variable, default OPENAI_API_KEY).
- `gpu`: as `remote`, and the subject model is `AUTOINTERP_SUBJECT_MODEL` on CUDA in bfloat16.
"""
from __future__ import annotations

import os

from dagster import EnvVar

from resources.embedder import EmbedderResource
from resources.llm import LLMResource
from resources.settings import AutointerpSettings
from resources.subject_model import SubjectModelResource

DEPLOYMENTS = ("local", "remote", "gpu")


def _remote_llm() -> LLMResource:
    key_variable = os.environ.get("AUTOINTERP_LLM_API_KEY_ENV", "OPENAI_API_KEY")
    return LLMResource(
        backend="openai",
        base_url=os.environ.get("AUTOINTERP_LLM_BASE_URL", "http://127.0.0.1:8000/v1"),
        model=os.environ.get("AUTOINTERP_LLM_MODEL", "default"),
        api_key=EnvVar(key_variable) if key_variable in os.environ else None,  # local servers need no key
        max_concurrency=int(os.environ.get("AUTOINTERP_LLM_CONCURRENCY", "32")),
    )


def resources_for(deployment: str | None = None) -> dict:
    deployment = deployment or os.environ.get("AUTOINTERP_DEPLOYMENT", "local")
    if deployment not in DEPLOYMENTS:
        raise ValueError(f"AUTOINTERP_DEPLOYMENT={deployment!r} is not one of {DEPLOYMENTS}.")
    default_max_latents = "6" if deployment == "local" else "0"
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
