"""The one configuration rule for settings that define results (corpus, exemplars, explainer, scorers).

They are Dagster `Config` classes whose defaults are the deployment file's values (`with_defaults`),
and the digest of those values is part of the asset's code version (`settings_digest`): editing
the deployment file makes exactly the affected assets stale, and automation re-runs them. A run
config set by hand in the launchpad overrides them for that run only; its values are recorded in
the run's metadata (`settings`), and they are not what staleness is measured against.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pydantic import BaseModel, Field, ValidationError, create_model


def problems(error: ValidationError, section: str) -> str:
    """A pydantic error as `[section] key = value: why`, one per bad key."""
    return "; ".join(
        f"[{section}] {'.'.join(map(str, e['loc']))} = {e.get('input')!r}: {e['msg']}"
        for e in error.errors()
    )


def with_defaults(config: type[BaseModel], values: dict, section: str) -> type[BaseModel]:
    """`config` with `values` as its defaults, checked now (a bad or unknown key raises ValueError naming it)."""
    if unknown := set(values) - set(config.model_fields):
        raise ValueError(
            f"[{section}] has unknown key(s) {sorted(unknown)}; known: {sorted(config.model_fields)}"
        )
    try:
        checked = config(**values)
    except ValidationError as error:
        raise ValueError(problems(error, section)) from None
    fields = {
        key: (
            config.model_fields[key].annotation,
            Field(
                default=getattr(checked, key),
                description=config.model_fields[key].description,
                json_schema_extra=config.model_fields[key].json_schema_extra,
            ),
        )
        for key in values
    }
    return create_model(config.__name__, __base__=config, **fields) if fields else config


def added_later(before, *, default=None, **field_options):
    """A setting added after results were made: at `before` (the behaviour before it existed) it is left out
    of `settings_digest`, so an upgrade re-runs nothing that the new setting does not change. Its default is
    `before` unless a `default` measured better replaced it, which re-runs what the old default made."""
    return Field(
        default=before if default is None else default,
        json_schema_extra={"digest_omits": before},
        **field_options,
    )


def digest_values(settings: BaseModel) -> dict:
    """The settings' values as the digest sees them: settings `added_later` and still at their old
    behaviour left out."""

    def omitted(key: str, value) -> bool:
        extra = type(settings).model_fields[key].json_schema_extra
        return (
            isinstance(extra, dict) and "digest_omits" in extra and value == extra["digest_omits"]
        )

    return {key: value for key, value in settings.model_dump().items() if not omitted(key, value)}


def settings_digest(*settings: BaseModel | dict) -> str:
    """Short hash of settings values: part of a code version, so a changed value makes the asset stale."""
    return short_digest([digest_values(s) if isinstance(s, BaseModel) else s for s in settings])


def short_digest(values) -> str:
    """The 10-hex-digit hash of JSON values that every settings digest is: one rule, so that equal values
    give equal digests wherever they are taken."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


class SteeringStrength(BaseModel):
    """The per-latent strength search of the plugins that steer (the steering explainer, the intervention
    and output_judge scorers): one definition of what it aims at."""

    target_kl: float = Field(
        default=1.0,
        gt=0,
        description="KL divergence (nats) of the steered next-token distributions from the "
        "unsteered ones that the strength search aims at.",
    )
    kl_tolerance: float = Field(
        default=0.05, gt=0, lt=1, description="Relative tolerance of the strength search."
    )


@dataclass(frozen=True)
class Models:
    """The models of a deployment, each named by its resource's `identity()`: they define results as much
    as the stage tables do. Each stage's code version carries the identities of the models it uses
    (`version_part`), so changing the judge re-runs only the LLM scorers, the explainer model the
    explanations and everything scored from them, the subject model the corpus, the activations and
    everything below; endpoint, key, concurrency and timeouts are in no identity and re-run nothing."""

    subject_model: str = ""
    """Weights and dtype: what the activations are computed by."""
    tokenizer: str = ""
    """The subject model's weights without the dtype: what the corpus is tokenized by."""
    explainer: str = ""
    judge: str = ""
    embedder: str = ""

    def used(self, *roles: str) -> dict[str, str]:
        """The identities of `roles` (empty ones left out: a stage built without a deployment's models)."""
        return {role: getattr(self, role) for role in roles if getattr(self, role)}

    def version_part(self, *roles: str) -> str:
        """The code-version suffix for the models of `roles`: empty when none is known."""
        used = self.used(*roles)
        return f"-m{settings_digest(used)}" if used else ""


NO_MODELS = Models()
"""A stage built without a deployment's models: the asset factories' default (frozen, so one is shared)."""


SCORER_ROLES = {"llm": "judge", "embedder": "embedder", "subject_model": "subject_model"}
"""A scorer's `uses` → the model role it names in results."""
