"""The explainers: one module per explainer, each an `Explainer` subclass (see `base.py`); `EXPLAINERS` finds them."""

from __future__ import annotations

import assets.explainers as _package
from assets.explainers.base import Explainer, ExplainerDeps, ExplainerSettings
from assets.plugins import plugin_classes


def explainer_classes(extra_modules: tuple[str, ...] = ()) -> dict[str, type[Explainer]]:
    """The built-in explainers and those of the deployment's plugin modules, by name."""
    return plugin_classes(Explainer, _package, extra_modules)


EXPLAINERS: dict[str, type[Explainer]] = explainer_classes()

__all__ = ["EXPLAINERS", "Explainer", "ExplainerDeps", "ExplainerSettings", "explainer_classes"]
