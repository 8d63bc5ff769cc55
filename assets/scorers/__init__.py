"""The scorers: one module per scorer, each a `Scorer` subclass (see `base.py`); `SCORERS` finds them."""

from __future__ import annotations

from pydantic import ValidationError

import assets.scorers as _package
from assets.plugins import plugin_classes
from assets.scorers.base import Job, JobResult, Scorer, ScorerDeps, ScorerSettings


def scorer_classes(extra_modules: tuple[str, ...] = ()) -> dict[str, type[Scorer]]:
    """The built-in scorers and those of the deployment's plugin modules, by name."""
    return plugin_classes(Scorer, _package, extra_modules)


def loaded_scorers() -> dict[str, type[Scorer]]:
    """Every scorer class imported in this process, by name: the built-ins and the plugins of the deployment
    loaded here (the CLI loads it before `view` or `export`), for readers of tables whatever scorer wrote them."""
    found, pending = {}, [Scorer]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if "name" in vars(cls):
            found[cls.name] = cls
    return found


def scorer_settings(
    overrides: dict[str, dict] | None = None, scorers: dict[str, type[Scorer]] | None = None
) -> dict[str, ScorerSettings]:
    """Every scorer's settings: defaults, updated by `overrides` ({scorer: {setting: value}})."""
    scorers = scorers or SCORERS
    overrides = dict(overrides or {})
    if unknown := set(overrides) - set(scorers):
        raise ValueError(
            f"Unknown scorer(s) {sorted(unknown)} in the scorer settings. Fix: use any of {sorted(scorers)}."
        )
    settings = {}
    for name, scorer in scorers.items():
        try:
            settings[name] = scorer.Settings(**overrides.get(name, {}))
        except ValidationError as error:
            problems = "; ".join(
                f"[{name}] {'.'.join(map(str, e['loc']))} = {e.get('input')!r}: {e['msg']}"
                for e in error.errors()
            )
            raise ValueError(
                f"{problems}. Fix: give each setting a value of its type (see the README's scorer table)."
            ) from None
    return settings


SCORERS: dict[str, type[Scorer]] = scorer_classes()

__all__ = [
    "SCORERS",
    "Job",
    "JobResult",
    "Scorer",
    "ScorerDeps",
    "ScorerSettings",
    "loaded_scorers",
    "scorer_classes",
    "scorer_settings",
]
