"""Reading and steering the subject model through nnsight, at any registered coder's hookpoint.

A steer edits one latent in the coder's latent space and keeps everything the coder does not
explain, as Goodfire's SAE card does: with f = encode(x),

    x' = decode(f + delta * e_latent) + (x - decode(f)) = x + delta * W_dec[latent]

(decode is linear), so the reconstruction error goes back in and a zero edit leaves the model's
output as it was. An SAE and a transcoder both write their module's output (what a transcoder
reads, the module's input, cancels out); MLP neurons are their own latent space, so the edit adds
delta to the neuron's input of `down_proj`. The edit is applied at every position
of the prompt and of every generated token. Many latents are steered in one batch: each steer
edits its own block of rows (the same prompts repeated), so their reads, searches and continuations
share every forward pass.

Strength is given in units of the latent's largest activation in the activation cache
(`latent_stats.safetensors`, written by `assets/activations.py`), so "2" means twice the most the
latent ever fired on the corpus, whatever the coder's scale. `strengths_for_kl` instead finds the
value whose next-token distributions are a fixed KL divergence away from the unsteered ones, which
is how the intervention score compares latents of different scales (Paulo et al. 2024).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from resources.hookpoints import resolve_hookpoint
from resources.sparse_coders import SparseCoder

NEUTRAL_PROMPTS = (
    "The",
    "I think that",
    "In the morning,",
    "Here is",
    "One day,",
    "It was",
    "We",
    "After a while, the",
)
"""Prompts that say nothing in particular: what a latent makes the model write after them is its own doing."""


class SteeringError(ValueError):
    """A steer that cannot be done as asked; the message names the input and the fix."""


@functools.lru_cache(maxsize=2)
def _wrapped(lm: torch.nn.Module, tokenizer) -> object:
    # nnsight 0.8 names nnsight.LanguageModel a deprecated alias of TransformersModel with the
    # text-generation task; this is that class, without the warning
    from nnsight import TransformersModel

    kept = (
        tokenizer.padding_side,
        tokenizer.pad_token,
    )  # nnsight sets both; caching shares this tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformersModel(lm, tokenizer=tokenizer, task="text-generation")
    tokenizer.padding_side, tokenizer.pad_token = kept
    return model


def module_name(lm: torch.nn.Module, hookpoint: str) -> str:
    """The full module name of a hookpoint (sparsify-style names resolve as for caching)."""
    module = resolve_hookpoint(lm, hookpoint)
    return next(name for name, m in lm.named_modules() if m is module)


@functools.lru_cache(maxsize=4)
def execution_order(lm: torch.nn.Module) -> dict[tuple[str, str], int]:
    """When each module's input and output appear in a forward pass, learnt once from a one-token run:
    nnsight serves a trace's reads in that order only (registration order differs, e.g. for norms)."""
    events: dict[tuple[str, str], int] = {}

    def seen(name: str, side: str) -> None:  # a hook that returns nothing changes nothing
        events.setdefault((name, side), len(events))

    handles = []
    for name, module in lm.named_modules():
        handles.append(
            module.register_forward_pre_hook(lambda m, a, name=name: seen(name, "input"))
        )
        handles.append(
            module.register_forward_hook(lambda m, a, o, name=name: seen(name, "output"))
        )
    try:
        with torch.inference_mode():
            lm(
                input_ids=torch.zeros(
                    (1, 1), dtype=torch.long, device=next(lm.parameters()).device
                ),
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    return events


def layers_below(lm: torch.nn.Module, hookpoint: str) -> list[str]:
    """The names of the decoder layers that run before the one holding the hookpoint (the outermost
    numbered `ModuleList` on its path), in order; none when the hookpoint is in no such list."""
    parts = module_name(lm, hookpoint).split(".")
    modules = dict(lm.named_modules())
    for k in range(1, len(parts)):
        if parts[k].isdigit() and isinstance(modules.get(".".join(parts[:k])), torch.nn.ModuleList):
            return [f"{'.'.join(parts[:k])}.{j}" for j in range(int(parts[k]))]
    return []


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _repack(original, first: torch.Tensor):
    return (first, *original[1:]) if isinstance(original, tuple) else first


def steered_value(coder: SparseCoder, latent, delta, write: torch.Tensor) -> torch.Tensor:
    """What the written side becomes: decode(f + delta e_latent) + (write - decode(f)), which is
    write + delta W_dec[latent] because decode is linear; f (and so what the coder reads) cancels,
    and no step encodes or decodes. `latent` and `delta` are one value for every row of `write`, or
    one per row (a batch of steers); a neuron's direction is its own unit vector."""
    latents = torch.as_tensor(latent, device=write.device).reshape(-1)
    deltas = torch.as_tensor(delta, dtype=torch.float32, device=write.device).reshape(-1, 1)
    if coder.activation == "neurons":
        directions = torch.nn.functional.one_hot(latents, write.shape[-1]).float()
    else:
        directions = coder.decoder_weight[latents]
    edit = (deltas * directions).reshape(len(latents), *([1] * (write.dim() - 2)), -1)
    return (write.float() + edit).to(write.dtype)


@dataclass(frozen=True)
class Steer:
    """Add `delta` (in the coder's own latent units) to `latent` at every position."""

    coder: SparseCoder
    latent: int
    delta: float


class Steerer:
    """The subject model driven through nnsight: reads hookpoints, steers latents, generates."""

    def __init__(self, lm: torch.nn.Module, tokenizer):
        self.lm = lm
        self.tokenizer = tokenizer
        self.model = _wrapped(lm, tokenizer)
        self._coders: dict[int, tuple[SparseCoder, SparseCoder]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def _coder(self, coder: SparseCoder) -> SparseCoder:
        """The coder on the model's device, in float32, moved once (kept beside the original, so a
        reused object id can never stand for another coder)."""
        original, moved = self._coders.get(id(coder), (None, None))
        if original is not coder:
            moved = coder.to(self.device, torch.float32)
            self._coders[id(coder)] = (coder, moved)
        return moved

    def check(self, steers: Sequence[Steer]) -> None:
        """Steers that can be done in one batch: one coder (one hookpoint), each latent a steerable latent of it."""
        coder = steers[0].coder
        if any(steer.coder is not coder for steer in steers):
            raise SteeringError(
                "A batch of steers edits one coder's latents. Fix: steer each coder's latents in batches of their own."
            )
        for steer in steers:
            if not 0 <= steer.latent < coder.width:
                raise SteeringError(
                    f"Latent {steer.latent} is not a latent of coder '{coder.key}' "
                    f"(width {coder.width}). Fix: pick one in 0..{coder.width - 1}."
                )
        if coder.activation != "neurons" and coder.decoder_weight is None:
            raise SteeringError(
                f"Coder '{coder.key}' has no decoder, so its latents cannot be steered. "
                "Fix: steer an SAE or a transcoder."
            )
        module_name(self.lm, coder.hookpoint)  # an unknown hookpoint names its fix here

    def _intervene(self, steers: Sequence[Steer], rows: int) -> None:
        """Inside a trace: apply each steer at its hookpoint to its own block of `rows // len(steers)` rows."""
        coder = self._coder(steers[0].coder)
        block = rows // len(steers)
        latents = torch.tensor(
            [steer.latent for steer in steers], device=self.device
        ).repeat_interleave(block)
        deltas = torch.tensor(
            [steer.delta for steer in steers], dtype=torch.float32, device=self.device
        ).repeat_interleave(block)
        envoy = self.model.get(module_name(self.lm, coder.hookpoint))
        if coder.activation == "neurons":
            envoy.input = steered_value(coder, latents, deltas, envoy.input)
            return
        output = envoy.output
        envoy.output = _repack(output, steered_value(coder, latents, deltas, _first(output)))

    def read(
        self, input_ids: torch.Tensor, sites: set[tuple[str, str]]
    ) -> dict[tuple[str, str], torch.Tensor]:
        """The tensor at each (hookpoint, "input" | "output") site, read through nnsight (what
        `capture_hookpoints` reads with forward hooks). The trace stops after the deepest site."""
        order = execution_order(self.lm)
        named = sorted(
            ((module_name(self.lm, h), side, (h, side)) for h, side in sites),
            key=lambda s: order[(s[0], s[1])],
        )
        saved = {}
        with (
            torch.inference_mode(),
            self.model.trace(input_ids.to(self.device), use_cache=False) as tracer,
        ):
            for name, side, key in named:
                envoy = self.model.get(name)
                saved[key] = _first(envoy.input if side == "input" else envoy.output).save()
            tracer.stop()
        return saved

    def below(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, coder: SparseCoder
    ) -> tuple[list[str], object] | None:
        """What the layers below the coder's (unsteered, so the same for every steer) hand on for these
        rows, for `logits(below=...)`; None when the model has no layer list to skip."""
        names = layers_below(self.lm, coder.hookpoint)
        if not names:
            return None
        with (
            torch.inference_mode(),
            self.model.trace(
                input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                use_cache=False,
            ) as tracer,
        ):
            value = self.model.get(names[-1]).output.save()
            tracer.stop()
        return names, value

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        steers: Sequence[Steer] = (),
        last_only: bool = False,
        below: tuple[list[str], object] | None = None,
    ) -> torch.Tensor:
        """Logits `[batch, tokens, vocab]` (float32, on the CPU; `tokens` is 1 with `last_only`), each
        steer applied to its own block of rows (`len(input_ids) // len(steers)` rows each). `below`
        (from `below`, for the first block's rows): those layers are skipped, their output repeated
        for every block, so a pass runs only the layers from the steered one up."""
        if steers:
            self.check(steers)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        keep = logits_to_keep(self.lm, 1) if last_only else {}
        with (
            torch.inference_mode(),
            self.model.trace(
                input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                use_cache=False,
                **keep,
            ),
        ):
            if below is not None:
                names, value = below
                blocks = len(input_ids) // len(_first(value))
                repeated = _repack(
                    value, _first(value).repeat(blocks, *[1] * (_first(value).dim() - 1))
                )
                for name in names:
                    self.model.get(name).skip(repeated)
            if steers:
                self._intervene(steers, len(input_ids))
            logits = self.model.output.logits.save()
        return (logits[:, -1:] if last_only else logits).float().cpu()

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of prompts, left-padded (so every prompt ends at the last column)."""
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = side
        return batch["input_ids"], batch["attention_mask"]

    def generate(
        self, prompts: list[str], max_new_tokens: int, steers: Sequence[Steer] = ()
    ) -> list[list[int]]:
        """Greedy continuations of exactly `max_new_tokens` tokens per prompt (so steered and unsteered
        texts have the same length): unsteered ones on transformers alone, one per prompt; with steers,
        the prompts once per steer (steer-major rows) through nnsight, with the edits at every step."""
        ids, mask = self.encode_prompts(prompts)
        ids, mask = (
            ids.repeat(max(1, len(steers)), 1).to(self.device),
            mask.repeat(max(1, len(steers)), 1).to(self.device),
        )
        settings = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id,
            "attention_mask": mask,
        }
        with torch.inference_mode():
            if not steers:
                out = self.lm.generate(ids, **settings)
            else:
                self.check(steers)
                with self.model.generate(ids, **settings) as tracer:
                    for _ in tracer.iter[:max_new_tokens]:
                        self._intervene(steers, len(ids))
                    result = tracer.result.save()
                out = result
        return out[:, ids.shape[1] :].cpu().tolist()

    def next_token_logprobs(
        self,
        prompts: list[str],
        steers: Sequence[Steer] = (),
        below: tuple[list[str], object] | None = None,
    ) -> torch.Tensor:
        """Log-probabilities `[prompts, vocab]` of the token after each prompt; with steers,
        `[steers × prompts, vocab]`, steer-major."""
        ids, mask = self.encode_prompts(prompts)
        blocks = max(1, len(steers))
        return torch.log_softmax(
            self.logits(
                ids.repeat(blocks, 1), mask.repeat(blocks, 1), steers, last_only=True, below=below
            )[:, -1],
            dim=-1,
        )

    def kl_divergences(
        self,
        prompts: list[str],
        steers: Sequence[Steer],
        clean: torch.Tensor | None = None,
        below: tuple[list[str], object] | None = None,
    ) -> list[float]:
        """Per steer, the mean over prompts of KL(unsteered || steered) of the next-token distributions,
        in nats: every steer in one forward pass. `clean`: the unsteered log-probabilities, if made
        already; `below`: the prompts' unsteered state below the steered layer (`Steerer.below`)."""
        clean = self.next_token_logprobs(prompts) if clean is None else clean
        steered = self.next_token_logprobs(prompts, steers, below).view(
            len(steers), len(prompts), -1
        )
        return (clean.exp() * (clean - steered)).sum(-1).mean(-1).tolist()

    def strengths_for_kl(
        self,
        prompts: list[str],
        coder: SparseCoder,
        latents: Sequence[int],
        target_kl: float,
        units: Sequence[float],
        tolerance: float = 0.05,
        max_steps: int = 24,
        clean: torch.Tensor | None = None,
    ) -> list[tuple[float, float]]:
        """Per latent, the delta (latent units) whose steer moves the next-token distributions
        `target_kl` nats from the unsteered ones, within `tolerance` (relative), and the KL it reached
        (`kl_search`, from the latent's `unit`). The latents search together: each step is one forward
        pass with every unfinished latent at its own next try, so a latent's search is what it is alone;
        the layers below the steered one run once, not once per try."""
        if target_kl <= 0 or min(units, default=1.0) <= 0:
            raise SteeringError(
                f"target_kl ({target_kl}) and the starting units ({min(units)} the least) "
                "must be positive. Fix: pass positive values."
            )
        clean = self.next_token_logprobs(prompts) if clean is None else clean
        below = self.below(*self.encode_prompts(prompts), coder)
        searches = [kl_search(unit, target_kl, tolerance, max_steps) for unit in units]
        tries = {i: next(search) for i, search in enumerate(searches)}
        found: dict[int, tuple[float, float]] = {}
        while tries:
            trying = list(tries.items())
            reached = self.kl_divergences(
                prompts, [Steer(coder, latents[i], delta) for i, delta in trying], clean, below
            )
            for (i, _), kl in zip(trying, reached, strict=False):
                try:
                    tries[i] = searches[i].send(kl)
                except StopIteration as done:
                    found[i] = done.value
                    del tries[i]
        return [found[i] for i in range(len(latents))]


def kl_search(
    unit: float, target_kl: float, tolerance: float, max_steps: int
) -> Generator[float, float, tuple[float, float]]:
    """One latent's strength search, driven from outside so that many latents advance in one batch:
    it yields each delta to try, is sent the KL that delta reached, and returns (delta, KL). Doubling
    from `unit` until the target is passed, then bisecting; a latent that cannot reach the target
    returns its largest try."""
    lo, hi = 0.0, unit
    reached, steps = (yield hi), 1
    while reached < target_kl and steps < max_steps // 2:
        lo, hi = hi, hi * 2
        reached, steps = (yield hi), steps + 1
    if reached < target_kl:
        return hi, reached
    best = (hi, reached)
    while steps < max_steps and abs(best[1] - target_kl) > tolerance * target_kl:
        middle = (lo + hi) / 2
        value, steps = (yield middle), steps + 1
        if value < target_kl:
            lo = middle
        else:
            hi = middle
        if abs(value - target_kl) < abs(best[1] - target_kl):
            best = (middle, value)
    return best


@functools.lru_cache(maxsize=4)
def _keeps_logits(lm: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(lm.forward).parameters


def logits_to_keep(lm: torch.nn.Module, positions: int) -> dict:
    """The forward argument that computes logits for the last `positions` positions only (the LM head
    is a fifth of a small model's work), for models whose forward takes it; else nothing."""
    return {"logits_to_keep": positions} if _keeps_logits(lm) else {}


@dataclass(frozen=True)
class SideBySide:
    """A prompt's greedy continuation without and with one steer, and the steer's next-token KL (nats)."""

    prompt: str
    unsteered: str
    steered: str
    delta: float
    kl: float


def continue_side_by_side(
    steerer: Steerer, coder: SparseCoder, latent: int, prompt: str, delta: float, tokens: int
) -> SideBySide:
    """Continue `prompt` `tokens` tokens as it is and with `delta` added to `latent` at every position:
    what `autointerp steer` prints and the browser's steering box shows."""
    edit = [Steer(coder, latent, delta)]
    steerer.check(edit)
    kl = steerer.kl_divergences([prompt], edit)[0]
    plain, steered = (
        steerer.tokenizer.decode(ids[0])
        for ids in (steerer.generate([prompt], tokens), steerer.generate([prompt], tokens, edit))
    )
    return SideBySide(prompt, plain, steered, delta, kl)


def max_activation(activations_dir: Path, latent: int) -> float:
    """The latent's largest activation in the cache: the unit of steering strength."""
    from storage.activations import LATENT_STATS_FILE, load_latent_stats

    path = Path(activations_dir) / LATENT_STATS_FILE
    if not path.exists():
        raise SteeringError(
            f"No cached activations at {activations_dir} (no latent_stats.safetensors), so strength has no unit. "
            f"Fix: run `autointerp cache <coder>` first, or give the strength in the coder's own units (--absolute)."
        )
    maxima = load_latent_stats(path)["max"]
    if not 0 <= latent < len(maxima):
        raise SteeringError(
            f"Latent {latent} is outside the cached coder's {len(maxima)} latents. "
            f"Fix: pick one in 0..{len(maxima) - 1}."
        )
    value = float(maxima[latent])
    if not math.isfinite(value) or value <= 0:
        raise SteeringError(
            f"Latent {latent} never fired in the cached corpus (max activation {value}), so strength has no unit. "
            f"Fix: steer a live latent, or give the strength in the coder's own units (--absolute)."
        )
    return value
