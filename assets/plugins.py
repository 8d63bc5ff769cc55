"""Finding plugins: every explainer and scorer is a class in one module of its package
(`assets/explainers/`, `assets/scorers/`), or of a module a deployment lists under `plugins`.
Dropping a module in is the whole registration: nothing else names it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType


def plugin_classes(
    base: type, package: ModuleType, extra_modules: tuple[str, ...] = ()
) -> dict[str, type]:
    """`name` → class, for each subclass of `base` defined in a module of `package` or in `extra_modules`
    (sorted by name, so tables and the UI list them the same way every time)."""
    modules = [
        importlib.import_module(f"{package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(package.__path__)
        if info.name != "base"
    ]
    for name in extra_modules:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as error:
            raise ValueError(
                f"Cannot import the plugin module {name!r}: {error}. "
                "Fix: list importable module names under `plugins` in the deployment file."
            ) from error
    found: dict[str, type] = {}
    for module in modules:
        for cls in vars(module).values():
            if (
                inspect.isclass(cls)
                and issubclass(cls, base)
                and cls.__module__ == module.__name__
                and "name" in vars(cls)
            ):
                if cls.name in found and found[cls.name] is not cls:
                    raise ValueError(
                        f"Two {base.__name__} plugins are named {cls.name!r}: "
                        f"{found[cls.name].__module__} and {module.__name__}. Fix: rename one."
                    )
                found[cls.name] = cls
    return dict(sorted(found.items()))
