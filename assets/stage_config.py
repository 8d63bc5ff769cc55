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

from pydantic import BaseModel, Field, ValidationError, create_model


def problems(error: ValidationError, section: str) -> str:
    """A pydantic error as `[section] key = value: why`, one per bad key."""
    return "; ".join(f"[{section}] {'.'.join(map(str, e['loc']))} = {e.get('input')!r}: {e['msg']}" for e in error.errors())


def with_defaults(config: type[BaseModel], values: dict, section: str) -> type[BaseModel]:
    """`config` with `values` as its defaults, checked now (a bad or unknown key raises ValueError naming it)."""
    if unknown := set(values) - set(config.model_fields):
        raise ValueError(f"[{section}] has unknown key(s) {sorted(unknown)}; known: {sorted(config.model_fields)}")
    try:
        checked = config(**values)
    except ValidationError as error:
        raise ValueError(problems(error, section)) from None
    fields = {key: (config.model_fields[key].annotation, Field(default=getattr(checked, key), description=config.model_fields[key].description)) for key in values}
    return create_model(config.__name__, __base__=config, **fields) if fields else config


def settings_digest(*settings: BaseModel | dict) -> str:
    """Short hash of settings values: part of a code version, so a changed value makes the asset stale."""
    values = [s.model_dump() if isinstance(s, BaseModel) else s for s in settings]
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]
