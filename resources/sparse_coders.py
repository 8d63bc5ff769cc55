"""Sparse coders (SAEs, transcoders) in sparsify's on-disk layout, and the registry that holds them.

Registry layout: `<registry>/<coder name>/<hookpoint>/{cfg.json, sae.safetensors}`, exactly
sparsify's `save_to_disk` layout, so a folder trained by sparsify can be dropped in unchanged.
The partition key of a coder is `<coder name>/<hookpoint>`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from storage.atomic import atomic_path

ENCODE_CHUNK_TOKENS = 4096


class RegistryError(FileNotFoundError):
    pass


class CoderShapeError(ValueError):
    pass


@dataclass
class SparseCoder:
    """A TopK sparse coder: `encode` gives the k largest ReLU pre-activations of each token."""

    name: str
    hookpoint: str
    encoder_weight: torch.Tensor  # [width, d_in]
    encoder_bias: torch.Tensor  # [width]
    decoder_weight: torch.Tensor  # [width, d_in]
    decoder_bias: torch.Tensor  # [d_in]
    k: int
    transcode: bool = False

    @property
    def key(self) -> str:
        return f"{self.name}/{self.hookpoint}"

    @property
    def width(self) -> int:
        return self.encoder_weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.encoder_weight.shape[1]

    @property
    def reads(self) -> str:
        """Transcoders read the hooked module's input, SAEs its output."""
        return "input" if self.transcode else "output"

    def check_input_width(self, d_model: int, model_name: str) -> None:
        if d_model != self.d_in:
            raise CoderShapeError(
                f"Sparse coder '{self.key}' expects inputs of width {self.d_in}, but hookpoint "
                f"'{self.hookpoint}' of model '{model_name}' gives width {d_model}. Fix: register a "
                f"coder trained on this model and hookpoint, or set the subject model it was trained on."
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (values, indices) for `x` of shape `[tokens, d_in]`, encoded in bounded chunks."""
        values, indices = [], []
        weight, bias = self.encoder_weight.to(x.dtype), self.encoder_bias.to(x.dtype)
        offset = 0 if self.transcode else self.decoder_bias.to(x.dtype)
        for chunk in torch.split(x, ENCODE_CHUNK_TOKENS):
            pre = torch.relu(torch.nn.functional.linear(chunk - offset, weight, bias))
            top = pre.topk(self.k, dim=-1, sorted=False)
            values.append(top.values)
            indices.append(top.indices)
        return torch.cat(values), torch.cat(indices)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return torch.einsum("tk,tkd->td", values, self.decoder_weight[indices].to(values.dtype)) + self.decoder_bias


def load_sparsify(folder: Path, name: str, hookpoint: str) -> SparseCoder:
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(str(folder / "sae.safetensors"))
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{folder}: only TopK sparsify coders are supported so far (activation={activation!r}).")
    return SparseCoder(
        name=name,
        hookpoint=hookpoint,
        encoder_weight=weights["encoder.weight"].float(),
        encoder_bias=weights["encoder.bias"].float(),
        decoder_weight=weights["W_dec"].float(),
        decoder_bias=weights["b_dec"].float(),
        k=int(cfg["k"]),
        transcode=bool(cfg.get("transcode", False)),
    )


def save_sparsify(coder: SparseCoder, folder: Path) -> None:
    """Write `coder` the way sparsify's `save_to_disk` does (config fields plus `d_in`)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "activation": "topk",
        "expansion_factor": coder.width // coder.d_in,
        "normalize_decoder": True,
        "num_latents": coder.width,
        "k": coder.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": coder.transcode,
        "d_in": coder.d_in,
    }
    tensors = {
        "encoder.weight": coder.encoder_weight.contiguous(),
        "encoder.bias": coder.encoder_bias.contiguous(),
        "W_dec": coder.decoder_weight.contiguous(),
        "b_dec": coder.decoder_bias.contiguous(),
    }
    with atomic_path(folder / "sae.safetensors") as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(folder / "cfg.json") as tmp:
        tmp.write_text(json.dumps(cfg, indent=2))


def check_registry(registry: Path) -> None:
    if not registry.is_dir():
        raise RegistryError(
            f"Sparse-coder registry directory {registry} does not exist. Fix: run "
            f"`autointerp register-embedded` (trains and registers the demo SAE), or create it and "
            f"drop a coder in as <name>/<hookpoint>/cfg.json + sae.safetensors."
        )


def scan_registry(registry: Path) -> list[str]:
    """Partition keys (`<name>/<hookpoint>`) of every complete coder folder in the registry."""
    check_registry(registry)
    keys = []
    for cfg in sorted(registry.glob("*/*/cfg.json")):
        folder = cfg.parent
        if (folder / "sae.safetensors").exists():
            keys.append(f"{folder.parent.name}/{folder.name}")
    return keys


def load_registered(registry: Path, key: str) -> SparseCoder:
    check_registry(registry)
    name, _, hookpoint = key.partition("/")
    folder = registry / name / hookpoint
    if not (folder / "cfg.json").exists():
        raise RegistryError(
            f"Coder '{key}' is not in the registry {registry} (expected {folder}/cfg.json). "
            f"Registered coders: {scan_registry(registry) or 'none'}."
        )
    return load_sparsify(folder, name, hookpoint)
