"""Finding a hookpoint (the module whose input or output a coder reads) in the subject model, by name.

Its own module because both the subject model (caching) and the steerer (nnsight) resolve names,
and the subject model builds the steerer: here, below both, no import runs in a circle."""

from __future__ import annotations

import difflib

import torch


class UnknownHookpointError(ValueError):
    pass


def resolve_hookpoint(lm: torch.nn.Module, hookpoint: str) -> torch.nn.Module:
    """The module named `hookpoint`; sparsify-style names relative to the base model (`layers.3` for
    Llama's `model.layers.3`, GPT-NeoX's `gpt_neox.layers.3`) work too."""
    modules = dict(lm.named_modules())
    base = getattr(lm, "base_model_prefix", "") or "model"
    for candidate in (
        hookpoint,
        f"{base}.{hookpoint}",
        f"model.{hookpoint}",
        hookpoint.removeprefix("model."),
    ):
        if candidate and candidate in modules:
            return modules[candidate]
    close = difflib.get_close_matches(hookpoint, [n for n in modules if n], n=3, cutoff=0.5)
    raise UnknownHookpointError(
        f"Unknown hookpoint '{hookpoint}': the subject model has no module of that name. "
        f"Closest module names: {close or 'none'}. Fix: name the coder's registry folder after a "
        f"module of the model (e.g. 'model.layers.15'; list them with `model.named_modules()`)."
    )
