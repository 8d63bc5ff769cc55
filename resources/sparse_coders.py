"""Sparse coders (SAEs, transcoders, MLP neurons) in every format users bring, and the registry.

Registry layout: `<registry>/<coder name>/<hookpoint>/` holding one coder in its own format; the
partition key of a coder is `<coder name>/<hookpoint>`. The format is told by the files:

| files | format | encode |
| --- | --- | --- |
| `cfg.json` + `sae.safetensors` | sparsify SAE / transcoder | TopK of ReLU(W_enc (x - b_dec) + b_enc) |
| `cfg.json` + `sae_weights.safetensors` | SAELens (standard/ReLU, TopK, JumpReLU) | as its `architecture` says |
| `params.npz` | GemmaScope JumpReLU | pre · 1[pre > threshold], pre = x W_enc + b_enc |
| `*.pth` | Goodfire ReLU SAE (`encoder_linear`, `decoder_linear`) | ReLU(encoder_linear(x)) |
| `cfg.json` with `"format": "neurons"` | plain MLP neurons | top-k per token of `down_proj`'s input |

Transcoders and neurons read their module's input, SAEs its output; a sparsify transcoder skips the
`- b_dec`, and neurons are the input of `down_proj` (the gated MLP's post-nonlinearity activations).
Every coder encodes to sparse (row, latent, value) triples: TopK coders and neurons keep k values a
token, ReLU and JumpReLU coders are encoded in token chunks so the dense block stays bounded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from storage.atomic import atomic_path

ENCODE_CHUNK_TOKENS = 4096

Activation = Literal["topk", "relu", "jumprelu", "neurons"]


class RegistryError(FileNotFoundError):
    pass


class CoderShapeError(ValueError):
    pass


class CoderFormatError(ValueError):
    """A registry folder whose files cannot be read, or whose weights and config disagree or hold
    NaN/inf: the message names the file and the fix."""


@dataclass
class SparseCode:
    """Non-zero latent activations of a block of tokens as flat (row, latent, value) triples."""

    rows: torch.Tensor
    latents: torch.Tensor
    values: torch.Tensor


@dataclass
class SparseCoder:
    name: str
    hookpoint: str
    activation: Activation
    d_in: int
    width: int
    encoder_weight: torch.Tensor | None = None  # [width, d_in]
    encoder_bias: torch.Tensor | None = None  # [width]
    decoder_weight: torch.Tensor | None = None  # [width, d_in]
    decoder_bias: torch.Tensor | None = None  # [d_in]
    k: int | None = None
    threshold: torch.Tensor | None = None  # [width], JumpReLU
    subtract_decoder_bias: bool = False
    transcode: bool = False
    source_format: str = "sparsify"
    _folded: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.hookpoint}"

    @property
    def reads(self) -> str:
        """Transcoders and neurons read the hooked module's input, SAEs its output."""
        return "input" if self.transcode or self.activation == "neurons" else "output"

    @property
    def reconstructs(self) -> bool:
        """Whether the coder has a decoder whose reconstruction of its input is meaningful (SAEs)."""
        return self.decoder_weight is not None and not self.transcode

    def decoder_directions(self) -> torch.Tensor | None:
        """Unit-norm decoder rows `[width, d_in]`, float32 (None without a decoder): each latent's direction,
        which decoder neighbours (cosines) and the logit lens read."""
        if self.decoder_weight is None:
            return None
        return torch.nn.functional.normalize(self.decoder_weight.detach().float(), dim=1, eps=1e-12)

    def to(self, device: str | torch.device, dtype: torch.dtype) -> SparseCoder:
        moved = {
            f: getattr(self, f).to(device=device, dtype=dtype)
            for f in (
                "encoder_weight",
                "encoder_bias",
                "decoder_weight",
                "decoder_bias",
                "threshold",
            )
            if getattr(self, f) is not None
        }
        return replace(self, **moved)

    def check_input_width(self, d_model: int, model_name: str) -> None:
        if d_model != self.d_in:
            raise CoderShapeError(
                f"Sparse coder '{self.key}' expects inputs of width {self.d_in}, but hookpoint "
                f"'{self.hookpoint}' of model '{model_name}' gives width {d_model}. Fix: register a "
                f"coder trained on this model and hookpoint, or set the subject model it was trained on."
            )

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "neurons":
            return x
        return torch.nn.functional.linear(x, self.encoder_weight, self._folded_bias())

    def _folded_bias(self) -> torch.Tensor:
        """b_enc - W_enc b_dec, so that subtracting b_dec from the input costs nothing per token."""
        if not self.subtract_decoder_bias:
            return self.encoder_bias
        if self._folded is None:
            self._folded = self.encoder_bias - self.encoder_weight @ self.decoder_bias
        return self._folded

    def encode(self, x: torch.Tensor) -> SparseCode:
        """Sparse code of `x` `[tokens, d_in]`, built chunk by chunk of `ENCODE_CHUNK_TOKENS` tokens."""
        rows, latents, values = [], [], []
        for start in range(0, x.shape[0], ENCODE_CHUNK_TOKENS):
            pre = self.pre_activations(x[start : start + ENCODE_CHUNK_TOKENS])
            if self.activation in ("topk", "neurons"):
                # ReLU commutes with top-k, so it is applied to the k survivors only.
                top = pre.topk(self.k, dim=-1, sorted=False)
                keep = top.values > 0
                rows.append(keep.nonzero()[:, 0] + start)
                latents.append(top.indices[keep])
                values.append(top.values[keep])
                continue
            if self.activation == "jumprelu":
                pre = pre * (pre > self.threshold)
            r, lat = torch.nonzero(pre > 0, as_tuple=True)
            rows.append(r + start)
            latents.append(lat)
            values.append(pre[r, lat])
        return SparseCode(torch.cat(rows), torch.cat(latents), torch.cat(values))

    def decode(self, code: SparseCode, n_tokens: int) -> torch.Tensor:
        """Reconstruction from a row-sorted sparse code, as a weighted bag of decoder rows per token."""
        offsets = torch.zeros(n_tokens, dtype=torch.long, device=code.rows.device)
        offsets[1:] = torch.bincount(code.rows, minlength=n_tokens).cumsum(0)[:-1]
        summed = torch.nn.functional.embedding_bag(
            code.latents,
            self.decoder_weight,
            offsets,
            mode="sum",
            per_sample_weights=code.values.to(self.decoder_weight.dtype),
        )
        return summed + self.decoder_bias


# ---- formats ------------------------------------------------------------------------------------


def load_sparsify(folder: Path, name: str, hookpoint: str) -> SparseCoder:
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(str(folder / "sae.safetensors"))
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{folder}: sparsify activation {activation!r} is not supported; TopK is.")
    encoder = weights["encoder.weight"].float()
    transcode = bool(cfg.get("transcode", False))
    return SparseCoder(
        name,
        hookpoint,
        "topk",
        d_in=encoder.shape[1],
        width=encoder.shape[0],
        encoder_weight=encoder,
        encoder_bias=weights["encoder.bias"].float(),
        decoder_weight=weights["W_dec"].float(),
        decoder_bias=weights["b_dec"].float(),
        k=int(cfg["k"]),
        subtract_decoder_bias=not transcode,
        transcode=transcode,
        source_format="sparsify",
    )


def save_sparsify(coder: SparseCoder, folder: Path) -> None:
    """Write a TopK coder the way sparsify's `save_to_disk` does (config fields plus `d_in`)."""
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


def load_saelens(folder: Path, name: str, hookpoint: str) -> SparseCoder:
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(str(folder / "sae_weights.safetensors"))
    architecture = cfg.get("architecture", "standard")
    if cfg.get("normalize_activations", "none") != "none" or cfg.get(
        "rescale_acts_by_decoder_norm"
    ):
        raise ValueError(
            f"{folder}: SAELens input normalization / decoder-norm rescaling is not supported yet."
        )
    activation = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(
        architecture
    )
    if activation is None:
        raise ValueError(
            f"{folder}: SAELens architecture {architecture!r} is not supported (standard, topk, jumprelu are)."
        )
    threshold = weights.get("threshold")
    if threshold is None and "log_threshold" in weights:
        threshold = weights["log_threshold"].exp()
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    w_enc = weights["W_enc"].float()  # [d_in, d_sae]
    return SparseCoder(
        name,
        hookpoint,
        activation,
        d_in=w_enc.shape[0],
        width=w_enc.shape[1],
        encoder_weight=w_enc.T.contiguous(),
        encoder_bias=weights["b_enc"].float(),
        decoder_weight=weights["W_dec"].float(),
        decoder_bias=weights["b_dec"].float(),
        k=int(k) if k else None,
        threshold=None if threshold is None else threshold.float(),
        subtract_decoder_bias=bool(cfg.get("apply_b_dec_to_input", False)),
        source_format="saelens",
    )


def load_gemmascope(folder: Path, name: str, hookpoint: str) -> SparseCoder:
    params = np.load(folder / "params.npz")
    w_enc = torch.from_numpy(params["W_enc"]).float()  # [d_in, d_sae]
    return SparseCoder(
        name,
        hookpoint,
        "jumprelu",
        d_in=w_enc.shape[0],
        width=w_enc.shape[1],
        encoder_weight=w_enc.T.contiguous(),
        encoder_bias=torch.from_numpy(params["b_enc"]).float(),
        decoder_weight=torch.from_numpy(params["W_dec"]).float(),
        decoder_bias=torch.from_numpy(params["b_dec"]).float(),
        threshold=torch.from_numpy(params["threshold"]).float(),
        source_format="gemmascope",
    )


def load_goodfire(path: Path, name: str, hookpoint: str) -> SparseCoder:
    state = torch.load(path, map_location="cpu", weights_only=True)
    encoder = state["encoder_linear.weight"].float()  # [d_hidden, d_in]
    return SparseCoder(
        name,
        hookpoint,
        "relu",
        d_in=encoder.shape[1],
        width=encoder.shape[0],
        encoder_weight=encoder,
        encoder_bias=state["encoder_linear.bias"].float(),
        decoder_weight=state["decoder_linear.weight"].float().T.contiguous(),
        decoder_bias=state["decoder_linear.bias"].float(),
        source_format="goodfire",
    )


def load_neurons(folder: Path, name: str, hookpoint: str) -> SparseCoder:
    cfg = json.loads((folder / "cfg.json").read_text())
    return SparseCoder(
        name,
        hookpoint,
        "neurons",
        d_in=int(cfg["d_in"]),
        width=int(cfg["d_in"]),
        k=int(cfg.get("k", 32)),
        source_format="neurons",
    )


FORMAT_FILES = {
    "sparsify": "sae.safetensors",
    "saelens": "sae_weights.safetensors",
    "gemmascope": "params.npz",
}
LOADERS = {
    "sparsify": load_sparsify,
    "saelens": load_saelens,
    "gemmascope": load_gemmascope,
    "goodfire": load_goodfire,
    "neurons": load_neurons,
}
KNOWN_FORMATS = (
    "sparsify cfg.json + sae.safetensors, SAELens cfg.json + sae_weights.safetensors, GemmaScope params.npz, "
    "Goodfire *.pth, or a neurons cfg.json"
)


def format_by_names(names: set[str]) -> tuple[str, str] | None:
    """The format of a coder folder holding the files `names`, and its weights file, told by the names
    alone (a hub listing has nothing else); None when no format matches. Neurons need their cfg.json read."""
    for fmt, name in FORMAT_FILES.items():
        if name in names and ("cfg.json" in names or fmt == "gemmascope"):
            return fmt, name
    pth = sorted(n for n in names if n.endswith(".pth"))
    return ("goodfire", pth[0]) if pth else None


def read_cfg(folder: Path) -> dict:
    """`cfg.json` of a coder folder ({} if there is none), or a `CoderFormatError` naming the file."""
    path = folder / "cfg.json"
    if not path.exists():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CoderFormatError(
            f"{path} is not valid JSON ({error}). Fix: repair the file, or copy the coder's cfg.json again."
        ) from error
    if not isinstance(cfg, dict):
        raise CoderFormatError(
            f"{path} holds a {type(cfg).__name__}, not a JSON object of settings. Fix: copy the coder's cfg.json again."
        )
    return cfg


def coder_format(folder: Path) -> tuple[str, Path]:
    """The format of the coder in `folder` and the file that holds its weights (its cfg.json for neurons)."""
    cfg = read_cfg(folder)
    if cfg.get("format") == "neurons":
        return "neurons", folder / "cfg.json"
    names = {p.name for p in folder.iterdir() if p.is_file() and (p.name != "cfg.json" or cfg)}
    if (found := format_by_names(names)) is not None:
        return found[0], folder / found[1]
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise RegistryError(
        f"{folder} holds no sparse coder in a known format ({KNOWN_FORMATS}); it holds {present}."
    )


def check_coder(coder: SparseCoder, weights: Path, cfg: dict) -> None:
    """Weights that agree with each other and with cfg.json, all finite: otherwise latents would be
    silently dead or wrong, so loading stops, naming the file and what disagrees."""
    fix = "Fix: copy the coder again from where it was trained, or retrain it."
    if coder.activation == "neurons":
        return
    expected = {
        "encoder_weight": (coder.width, coder.d_in),
        "encoder_bias": (coder.width,),
        "decoder_weight": (coder.width, coder.d_in),
        "decoder_bias": (coder.d_in,),
        "threshold": (coder.width,),
    }
    for name, shape in expected.items():
        tensor = getattr(coder, name)
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            raise CoderFormatError(
                f"{weights}: {name} has shape {tuple(tensor.shape)}, "
                f"but the encoder says width {coder.width} and input width {coder.d_in} "
                f"({shape}). {fix}"
            )
        bad = ~torch.isfinite(tensor)
        if bad.any():
            rows = (
                torch.nonzero(bad.reshape(len(tensor), -1).any(dim=1) if tensor.dim() > 1 else bad)
                .flatten()
                .tolist()
            )
            where = (
                f"latents {rows[:8]}{' …' if len(rows) > 8 else ''} ({len(rows)} in all)"
                if name != "decoder_bias"
                else f"{len(rows)} of its {len(tensor)} entries"
            )
            raise CoderFormatError(
                f"{weights}: {name} holds NaN or inf at {where}; those latents would be silently dead or wrong. {fix}"
            )
    for key, actual in (("num_latents", coder.width), ("d_sae", coder.width), ("d_in", coder.d_in)):
        if isinstance(cfg.get(key), int) and cfg[key] and cfg[key] != actual:
            raise CoderFormatError(
                f"{weights.parent / 'cfg.json'} says {key} = {cfg[key]}, "
                f"but {weights.name} holds {actual}. Fix: copy the matching cfg.json and weights "
                "together."
            )
    wanted = SAFETENSORS_DTYPES.get(str(cfg.get("dtype", "")).removeprefix("torch."))
    if wanted and weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            stored = {f.get_slice(name).get_dtype() for name in f.keys()}
        if stored != {wanted}:
            raise CoderFormatError(
                f"{weights.parent / 'cfg.json'} says dtype = {cfg['dtype']!r}, "
                f"but {weights.name} stores {sorted(stored)}. "
                "Fix: copy the matching cfg.json and weights together."
            )


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def load_coder_folder(folder: Path, name: str, hookpoint: str) -> SparseCoder:
    """Load the coder in `folder`, telling its format by the files it holds; any unreadable or
    inconsistent file stops with its path and the fix instead of a library's traceback."""
    fmt, weights = coder_format(folder)
    try:
        coder = LOADERS[fmt](weights if fmt == "goodfire" else folder, name, hookpoint)
    except (CoderFormatError, RegistryError):
        raise
    except KeyError as missing:
        raise CoderFormatError(
            f"{weights}: the {fmt} format needs {missing} (in the weights or cfg.json), "
            "which it does not hold. Fix: copy the coder again, "
            f"or check that it is a {fmt} coder."
        ) from missing
    except Exception as error:  # safetensors, zip, pickle: a truncated or foreign file
        raise CoderFormatError(
            f"Cannot read {weights} as a {fmt} coder ({type(error).__name__}: "
            f"{str(error)[:200]}). Fix: the file may be truncated or of another format; "
            "copy it again."
        ) from error
    check_coder(coder, weights, read_cfg(folder))
    return coder


# ---- registry -----------------------------------------------------------------------------------


def check_registry(registry: Path) -> None:
    if not registry.is_dir():
        raise RegistryError(
            f"Sparse-coder registry directory {registry} does not exist. Fix: run "
            f"`autointerp register-embedded` (trains and registers the demo SAE), or create it and "
            f"drop a coder in as <name>/<hookpoint>/ (e.g. sparsify's cfg.json + sae.safetensors)."
        )


def coder_fingerprint(registry: Path, key: str) -> str:
    """Changes whenever a file of the coder's registry folder changes (name, size or modification time)."""
    folder = registry / key
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def inspect_registry(registry: Path) -> tuple[list[str], dict[str, str]]:
    """Partition keys (`<name>/<hookpoint>`) of the coder folders in the registry whose format is told
    by their files, and, by key, the folders that cannot be: one broken folder never hides the others.
    Cheap enough for every sensor tick: only cfg.json and the weights' headers are read."""
    check_registry(registry)
    keys, broken = [], {}
    for folder in sorted(f for f in registry.glob("*/*") if f.is_dir()):
        key = f"{folder.parent.name}/{folder.name}"
        if not any(folder.iterdir()):
            continue  # a folder still being created
        try:
            fmt, weights = coder_format(folder)
            if weights.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(weights), "pt"):
                    pass  # reads the header only: a truncated file fails here
            keys.append(key)
        except (RegistryError, CoderFormatError) as error:
            broken[key] = str(error)
        except Exception as error:
            broken[key] = (
                f"Cannot read {weights} as a {fmt} coder ({type(error).__name__}: "
                f"{str(error)[:200]}). Fix: the file may be truncated; copy it again."
            )
    return keys, broken


def scan_registry(registry: Path) -> list[str]:
    """Partition keys (`<name>/<hookpoint>`) of every readable coder folder in the registry."""
    return inspect_registry(registry)[0]


def load_registered(registry: Path, key: str) -> SparseCoder:
    check_registry(registry)
    name, _, hookpoint = key.partition("/")
    folder = registry / name / hookpoint
    if not folder.is_dir():
        raise RegistryError(
            f"Coder '{key}' is not in the registry {registry} (expected the folder {folder}). "
            f"Registered coders: {scan_registry(registry) or 'none'}."
        )
    return load_coder_folder(folder, name, hookpoint)


def registered_width(registry: Path, key: str) -> int:
    """Latents of a registered coder, from its weights' header where it has one (no tensor is read),
    else by loading it."""
    name, _, hookpoint = key.partition("/")
    folder = registry / name / hookpoint
    fmt, weights = coder_format(folder)
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            if "W_dec" in f.keys():
                return int(f.get_slice("W_dec").get_shape()[0])
    return load_registered(registry, key).width
