"""One async LLM client interface with two backends: embedded llama.cpp and OpenAI-compatible HTTP.

Explainers and scorers only ever call `await client.complete(messages, ...)`, so a vLLM server,
OpenRouter, OpenAI or the embedded SmolLM2 are interchangeable. API keys are read from the
environment when a client is built and never stored in config, metadata or files.
"""
from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Literal, Protocol, TypeVar

from dagster import ConfigurableResource
from pydantic import Field

from resources.subject_model import embedded_gguf_path

T = TypeVar("T")


class LLMEndpointError(RuntimeError):
    pass


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    """Per generated token, the top alternatives and their log-probabilities, when the backend gives them."""


class LLMClient(Protocol):
    model_name: str

    async def check(self) -> None:
        """Fail fast, with the endpoint and the fix in the message, when the backend is unusable."""

    async def complete(
        self,
        messages: list[dict],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_logprobs: int = 0,
        binary_list: int | None = None,
    ) -> Completion:
        """`binary_list=n` says the answer must be a list of n 0/1 labels; backends that can constrain
        decoding (llama.cpp grammars) enforce the format, which fixes the form, never the content."""


def binary_list_grammar(n: int) -> str:
    """GBNF for exactly `[d, d, ..., d]` with n digits in {0, 1}."""
    items = ' ", " '.join(["label"] * n)
    return f'root ::= "[" {items} "]"\nlabel ::= "0" | "1"\n'



@functools.lru_cache(maxsize=2)
def _llama(model_path: str, n_ctx: int, seed: int):
    from llama_cpp import Llama

    threads = os.cpu_count() or 1
    return Llama(model_path=model_path, n_ctx=n_ctx, seed=seed, n_threads=threads, n_threads_batch=threads, verbose=False)


class LlamaCppClient:
    """The embedded backend: a GGUF model in-process through llama-cpp-python, one call at a time."""

    def __init__(self, model_path: str | None = None, n_ctx: int = 2048, seed: int = 0):
        self.model_path = model_path or str(embedded_gguf_path())
        self.model_name = os.path.basename(self.model_path)
        self.n_ctx = n_ctx
        self.seed = seed
        self._lock = threading.Lock()

    async def check(self) -> None:
        await asyncio.to_thread(_llama, self.model_path, self.n_ctx, self.seed)

    def _complete_sync(self, messages, max_tokens, temperature, top_logprobs, binary_list) -> Completion:
        from llama_cpp import LlamaGrammar

        llm = _llama(self.model_path, self.n_ctx, self.seed)
        grammar = LlamaGrammar.from_string(binary_list_grammar(binary_list), verbose=False) if binary_list else None
        with self._lock:
            out = llm.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=temperature, seed=self.seed, grammar=grammar
            )
        usage = out.get("usage", {})
        return Completion(
            text=out["choices"][0]["message"]["content"] or "",
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
        )

    async def complete(self, messages, *, max_tokens, temperature=0.0, top_logprobs=0, binary_list=None) -> Completion:
        return await asyncio.to_thread(self._complete_sync, messages, max_tokens, temperature, top_logprobs, binary_list)


class OpenAICompatibleClient:
    """Any OpenAI-compatible chat endpoint (OpenAI, OpenRouter, vLLM or llama.cpp servers) via the `openai` SDK."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout_s: float = 120.0):
        from openai import AsyncOpenAI

        self.base_url = base_url
        self.model_name = model
        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=2)

    def _unreachable(self, error: Exception) -> LLMEndpointError:
        return LLMEndpointError(
            f"Cannot reach the LLM endpoint at {self.base_url} ({type(error).__name__}: {error}). Fix: start "
            f"the server or correct `llm.base_url`, or use the embedded model with `llm.backend: embedded`."
        )

    async def check(self) -> None:
        import openai

        try:
            await self._client.models.list()
        except openai.APIConnectionError as error:
            raise self._unreachable(error) from error
        except openai.APIStatusError:
            pass  # some servers do not list models; a real request will tell

    async def complete(self, messages, *, max_tokens, temperature=0.0, top_logprobs=0, binary_list=None) -> Completion:
        import openai

        extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
        try:
            out = await self._client.chat.completions.create(
                model=self.model_name, messages=messages, max_tokens=max_tokens, temperature=temperature, **extra
            )
        except openai.APIConnectionError as error:
            raise self._unreachable(error) from error
        choice = out.choices[0]
        alternatives = []
        if choice.logprobs and choice.logprobs.content:
            alternatives = [{alt.token: alt.logprob for alt in tok.top_logprobs} for tok in choice.logprobs.content]
        return Completion(
            text=choice.message.content or "",
            prompt_tokens=out.usage.prompt_tokens if out.usage else 0,
            completion_tokens=out.usage.completion_tokens if out.usage else 0,
            top_logprobs=alternatives,
        )


class BoundedClient:
    """Wraps a client so that at most `limit` of its requests are in flight, however many are awaited."""

    def __init__(self, inner: LLMClient, limit: int):
        self.inner = inner
        self.model_name = inner.model_name
        self._semaphore = asyncio.Semaphore(max(1, limit))

    async def check(self) -> None:
        await self.inner.check()

    async def complete(self, messages, *, max_tokens, temperature=0.0, top_logprobs=0, binary_list=None) -> Completion:
        async with self._semaphore:
            return await self.inner.complete(
                messages, max_tokens=max_tokens, temperature=temperature, top_logprobs=top_logprobs, binary_list=binary_list
            )


async def gather_with_progress(jobs: list[Awaitable[T]], report: Callable[[str], None] | None, label: str) -> list[T]:
    """Await all `jobs` (results in order), reporting roughly every tenth of them as they finish."""
    done, step, started = 0, max(1, len(jobs) // 10), time.perf_counter()

    async def tracked(job: Awaitable[T]) -> T:
        nonlocal done
        result = await job
        done += 1
        if report and (done % step == 0 or done == len(jobs)):
            report(f"{label}: {done}/{len(jobs)} done, {time.perf_counter() - started:.0f} s")
        return result

    return await asyncio.gather(*(tracked(job) for job in jobs))


class LLMResource(ConfigurableResource):
    """The explainer/scorer LLM. Keys are read from the environment variable named by `api_key_env`."""

    backend: Literal["embedded", "openai"] = Field(default="embedded", description="'embedded' = SmolLM2-135M-Instruct via llama-cpp-python; 'openai' = any OpenAI-compatible HTTP endpoint.")
    base_url: str | None = Field(default=None, description="Endpoint for backend 'openai', e.g. http://127.0.0.1:8000/v1 (vLLM) or https://openrouter.ai/api/v1.")
    model: str = Field(default="embedded", description="Model name sent to the endpoint; for 'embedded' a GGUF path or 'embedded'.")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Name of the environment variable holding the API key (never the key itself).")
    max_concurrency: int = Field(default=8, description="Requests in flight at once.")
    n_ctx: int = Field(default=2048, description="Context window of the embedded model.")

    def client(self) -> LLMClient:
        if self.backend == "embedded":
            inner = LlamaCppClient(None if self.model == "embedded" else self.model, n_ctx=self.n_ctx)
        elif not self.base_url:
            raise ValueError("llm.backend is 'openai' but llm.base_url is not set. Fix: set it, e.g. http://127.0.0.1:8000/v1.")
        else:
            inner = OpenAICompatibleClient(self.base_url, self.model, os.environ.get(self.api_key_env))
        return BoundedClient(inner, self.max_concurrency)
