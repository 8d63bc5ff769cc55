"""What every LLM backend is: the `LLMClient` interface, the `Completion` it answers with, and the
two errors it raises, one that stops the whole run and one worth retrying (`ProductionClient` tells
them apart)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class LLMEndpointError(RuntimeError):
    """A failure of the whole run, not of one latent: the endpoint is unreachable or rejects the key,
    the model name, the payment or the request format. The materialization stops before writing
    anything, naming the setting to fix; no latent is marked failed for it."""


class TransientLLMError(RuntimeError):
    """A failure worth retrying: rate limit, server error, timeout, dropped connection."""

    def __init__(
        self,
        message: str,
        unreachable: bool = False,
        retry_after_s: float | None = None,
        down: bool = False,
    ):
        super().__init__(message)
        self.unreachable = unreachable
        """No connection: after the last attempt the whole run stops."""
        self.down = down
        """Refused or no such host: nothing is listening, so a first request is not tried again."""
        self.retry_after_s = retry_after_s
        """How long the server asked us to wait (Retry-After), if it said."""


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    """Per generated token, the top alternatives and their log-probabilities, when the backend gives them."""
    tokens: list[str] = field(default_factory=list)
    """The generated tokens that `top_logprobs` belong to (same length), to find where a value was written."""


class LLMClient(Protocol):
    model_name: str

    async def check(self) -> None:
        """Fail fast, with the endpoint and the fix in the message, when the backend is unusable."""

    async def aclose(self) -> None:
        """Release what belongs to the running event loop (HTTP connections); the client can be used again later."""

    async def complete(
        self,
        messages: list[dict],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_logprobs: int = 0,
        int_list: tuple[int, int, int] | None = None,
        seed: int | None = None,
    ) -> Completion:
        """`seed` tells samples of the same prompt apart (best-of-N); `int_list=(n, lo, hi)` says the answer
        must be a list of n integers in [lo, hi] (0/1 labels, 0-10 activations, an example's number);
        backends that can constrain decoding (llama.cpp grammars) enforce the format, which fixes the
        form, never the content."""
