"""One async LLM client interface, three backends, and what production use needs around them.

Explainers and scorers only ever call `await client.complete(messages, ...)`. Backends:
embedded llama.cpp (in-process GGUF), any OpenAI-compatible HTTP endpoint through the `openai`
SDK (OpenAI, OpenRouter, vLLM's or llama.cpp's server), and vLLM offline in-process (GPU only,
optional extra `[vllm]`, imported lazily). `LLMResource.client()` wraps the backend in
`ProductionClient`: a content-addressed response cache on disk, a bounded number of requests in
flight, retries with exponential backoff and jitter on 429 / 5xx / timeouts / connection errors
(none on other 4xx), and a ledger of requests, tokens, cache hits, failures and cost with an
optional budget. API keys come from the environment (Dagster `EnvVar`) and are never stored.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, Protocol, TypeVar

from dagster import ConfigurableResource
from pydantic import Field

from resources.subject_model import embedded_gguf_path

T = TypeVar("T")


class LLMEndpointError(RuntimeError):
    """The backend cannot be reached at all: the partition stops, naming the endpoint and the fix."""


class TransientLLMError(RuntimeError):
    """A failure worth retrying: rate limit, server error, timeout, dropped connection."""

    def __init__(self, message: str, unreachable: bool = False, retry_after_s: float | None = None):
        super().__init__(message)
        self.unreachable = unreachable
        self.retry_after_s = retry_after_s
        """How long the server asked us to wait (Retry-After), if it said."""


class BudgetExceeded(RuntimeError):
    """The request or cost budget of this materialization is spent; finished work is kept."""


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


def int_list_grammar(n: int, lo: int, hi: int) -> str:
    """GBNF for exactly `[v, v, ..., v]` with n integers in [lo, hi]."""
    items = ' ", " '.join(["value"] * n)
    choices = " | ".join(f'"{v}"' for v in range(lo, hi + 1))
    return f'root ::= "[" {items} "]"\nvalue ::= {choices}\n'


# ---- backends -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _llama(model_path: str, n_ctx: int, seed: int, logits_all: bool):
    from llama_cpp import Llama

    threads = os.cpu_count() or 1
    return Llama(model_path=model_path, n_ctx=n_ctx, seed=seed, n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False)


class LlamaCppClient:
    """The embedded backend: a GGUF model in-process through llama-cpp-python, one call at a time."""

    def __init__(self, model_path: str | None = None, n_ctx: int = 2048, seed: int = 0):
        self.model_path = model_path or str(embedded_gguf_path())
        self.model_name = os.path.basename(self.model_path)
        self.n_ctx = n_ctx
        self.seed = seed
        self._lock = threading.Lock()

    async def check(self) -> None:
        await asyncio.to_thread(_llama, self.model_path, self.n_ctx, self.seed, False)

    async def aclose(self) -> None:
        return None  # the model stays loaded for the next materialization in this process

    def _complete_sync(self, messages, max_tokens, temperature, top_logprobs, int_list, seed) -> Completion:
        from llama_cpp import LlamaGrammar

        llm = _llama(self.model_path, self.n_ctx, self.seed, bool(top_logprobs))  # logprobs need every position's logits
        grammar = LlamaGrammar.from_string(int_list_grammar(*int_list), verbose=False) if int_list else None
        extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
        with self._lock:
            out = llm.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=temperature, seed=self.seed if seed is None else seed, grammar=grammar, **extra
            )
        return completion_from_json(out)  # llama.cpp answers in OpenAI's chat-completion format

    async def complete(self, messages, *, max_tokens, temperature=0.0, top_logprobs=0, int_list=None, seed=None) -> Completion:
        return await asyncio.to_thread(self._complete_sync, messages, max_tokens, temperature, top_logprobs, int_list, seed)


class OpenAICompatibleClient:
    """Any OpenAI-compatible chat endpoint (OpenAI, OpenRouter, vLLM or llama.cpp servers) via the `openai` SDK.

    The SDK's own retries are off: `ProductionClient` retries, so that every attempt is counted.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout_s: float = 120.0, transport: Literal["aiohttp", "httpx"] = "aiohttp"):
        self.base_url = base_url
        self.model_name = model
        self._api_key = api_key or "EMPTY"
        self._timeout_s = timeout_s
        self.transport = transport
        self._sdk_client = None
        self._sdk_loop = None

    def _sdk(self):
        """The SDK client of the running event loop: its connections (an aiohttp session) belong to one loop,
        and each materialization runs its own. aiohttp is the transport the SDK recommends for concurrency;
        bench/llm_throughput.py measures it against the SDK's default httpx."""
        import openai

        loop = asyncio.get_running_loop()
        if self._sdk_loop is not loop:
            http_client = None
            if self.transport == "aiohttp":
                try:
                    http_client = openai.DefaultAioHttpClient(timeout=self._timeout_s)
                except (AttributeError, RuntimeError):  # an openai without the `aiohttp` extra: its httpx client works too
                    pass
            self._sdk_client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self._timeout_s, max_retries=0, http_client=http_client)
            self._sdk_loop = loop
        return self._sdk_client

    async def aclose(self) -> None:
        if self._sdk_client is not None and self._sdk_loop is asyncio.get_running_loop():
            await self._sdk_client.close()
        self._sdk_client = self._sdk_loop = None

    def _unreachable(self, error: Exception) -> LLMEndpointError:
        return LLMEndpointError(
            f"Cannot reach the LLM endpoint at {self.base_url} ({type(error).__name__}: {error}). Fix: start "
            f"the server or correct `llm.base_url`, or use the embedded model with `llm.backend: embedded`."
        )

    async def check(self) -> None:
        import openai

        try:
            await self._sdk().models.list()
        except openai.APIConnectionError as error:
            raise self._unreachable(error) from error
        except openai.APIStatusError:
            pass  # some servers do not list models; a real request will tell

    async def complete(self, messages, *, max_tokens, temperature=0.0, top_logprobs=0, int_list=None, seed=None) -> Completion:
        import openai
        extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
        if seed is not None:
            extra["seed"] = seed
        body = {"model": self.model_name, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, **extra}
        try:
            # The SDK's typed `create` re-walks every message against its TypedDicts, and building its typed
            # response costs about as much again; posting the same body through the SDK's client with
            # `cast_to=object` keeps its transport, errors and JSON decoding and returns the plain answer.
            out = await self._sdk().post("/chat/completions", cast_to=object, body=body)
        except openai.APITimeoutError as error:
            raise TransientLLMError(f"timeout from {self.base_url}") from error
        except openai.APIConnectionError as error:
            raise TransientLLMError(str(self._unreachable(error)), unreachable=True) from error
        except openai.APIStatusError as error:
            if error.status_code == 429 or error.status_code >= 500:
                raise TransientLLMError(f"HTTP {error.status_code} from {self.base_url}", retry_after_s=retry_after(error.response.headers)) from error
            raise
        return completion_from_json(out)


def retry_after(headers) -> float | None:
    """Seconds a rate-limited server asks us to wait: `retry-after-ms` (OpenAI) or `retry-after` in seconds."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) * scale)
        except (KeyError, TypeError, ValueError):  # absent, or an HTTP date: fall back to our own backoff
            continue
    return None


def completion_from_json(out: object) -> Completion:
    """An OpenAI-format chat-completion answer (HTTP endpoints, embedded llama.cpp) as a `Completion`;
    absent or null fields (servers differ) count as empty."""
    if not isinstance(out, dict):
        return Completion("")  # not a chat completion at all: an empty answer, which marks the latent failed
    usage = out.get("usage") or {}
    choice = (out.get("choices") or [{}])[0] or {}
    steps = (choice.get("logprobs") or {}).get("content") or []
    return Completion(
        text=(choice.get("message") or {}).get("content") or "",
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        top_logprobs=[{alt["token"]: alt["logprob"] for alt in step.get("top_logprobs") or []} for step in steps],
        tokens=[step["token"] for step in steps],
    )


class VLLMOfflineClient:
    """vLLM in-process on a GPU (`pip install 'autointerp[vllm]'`). Concurrent requests are gathered
    into one `LLM.chat` batch, which is how offline vLLM reaches its throughput."""

    def __init__(self, model: str, max_batch: int = 256, **engine_args):
        try:
            import vllm
        except ImportError as error:
            raise RuntimeError("llm.backend 'vllm' needs vLLM on a GPU machine: pip install 'autointerp[vllm]'") from error
        self._vllm = vllm
        self.model_name = model
        self._engine = vllm.LLM(model=model, **engine_args)
        self._queue: list[tuple[list[dict], object, asyncio.Future]] = []
        self._max_batch = max_batch
        self._flusher: asyncio.Task | None = None

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def complete(self, messages, *, max_tokens, temperature=0.0, top_logprobs=0, int_list=None, seed=None) -> Completion:
        params = self._vllm.SamplingParams(max_tokens=max_tokens, temperature=temperature, logprobs=top_logprobs or None, seed=seed)
        future = asyncio.get_running_loop().create_future()
        self._queue.append((messages, params, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0.01)  # let concurrent callers join the batch
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            outputs = await asyncio.to_thread(self._engine.chat, [m for m, _, _ in batch], [p for _, p, _ in batch], use_tqdm=False)
            for (_, _, future), out in zip(batch, outputs):
                first = out.outputs[0]
                steps = first.logprobs or []
                alternatives = [{lp.decoded_token: lp.logprob for lp in step.values()} for step in steps]
                chosen = [step[token].decoded_token for step, token in zip(steps, first.token_ids)]
                future.set_result(Completion(first.text, len(out.prompt_token_ids), len(first.token_ids), alternatives, chosen))


# ---- production wrapper -------------------------------------------------------------------------

class ResponseCache:
    """Responses on disk (SQLite), keyed by a hash of the backend, model, messages and sampling parameters."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the one writer; other processes share it safely
            db.execute("PRAGMA synchronous=NORMAL")  # no fsync per answer: a crash of the app loses nothing, a power cut the last few
            db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, completion TEXT NOT NULL)")

    @contextmanager
    def _connect(self):
        """A transaction on the one connection, serialized: SQLite connections are not safe to share unguarded."""
        with self._lock, self._db:
            yield self._db

    @staticmethod
    def key(model_id: str, messages: list[dict], params: dict) -> str:
        payload = json.dumps({"model": model_id, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> Completion | None:
        with self._connect() as db:
            row = db.execute("SELECT completion FROM responses WHERE key = ?", (key,)).fetchone()
        return Completion(**json.loads(row[0])) if row else None

    def put(self, key: str, completion: Completion) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(asdict(completion))))

    def forget(self, key: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM responses WHERE key = ?", (key,))


@dataclass
class Ledger:
    """What a materialization asked of its LLM, what it cost, and whether its budget allows more."""

    prices_per_million: tuple[float, float] | None = None
    """(prompt, completion) price per million tokens; None = cost unknown."""
    max_requests: int | None = None
    max_cost: float | None = None
    requests: int = 0
    cache_hits: int = 0
    failures: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def cost(self) -> float | None:
        if self.prices_per_million is None:
            return None
        prompt_price, completion_price = self.prices_per_million
        return (self.prompt_tokens * prompt_price + self.completion_tokens * completion_price) / 1e6

    def check_budget(self) -> None:
        if self.max_requests is not None and self.requests >= self.max_requests:
            raise BudgetExceeded(f"request budget of {self.max_requests} reached")
        if self.max_cost is not None and (self.cost or 0.0) >= self.max_cost:
            raise BudgetExceeded(f"cost budget of {self.max_cost} reached")

    def as_metadata(self) -> dict:
        out = {f"llm_{name}": getattr(self, name) for name in ("requests", "cache_hits", "failures", "retries", "prompt_tokens", "completion_tokens")}
        if self.cost is not None:
            out["llm_cost"] = round(self.cost, 6)
        return out


class ProductionClient:
    """Cache → budget → bounded concurrency → retries → backend, recording everything in the ledger."""

    def __init__(self, inner: LLMClient, model_id: str, cache: ResponseCache | None, ledger: Ledger, max_concurrency: int,
                 max_attempts: int = 6, backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        self.inner = inner
        self.model_name = inner.model_name
        self.model_id = model_id
        self.cache = cache
        self.ledger = ledger
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._semaphore = asyncio.Semaphore(max(1, max_concurrency))
        self._in_flight: dict[str, asyncio.Future] = {}

    @asynccontextmanager
    async def session(self):
        """Check the backend, do the work inside, then close its connections on this event loop."""
        try:
            await self.inner.check()
            yield self
        finally:
            await self.inner.aclose()

    @staticmethod
    def _request(max_tokens, temperature=0.0, top_logprobs=0, int_list=None, seed=None) -> dict:
        """Every parameter of a request, defaults filled in: what the cache key and the backend see."""
        return {"max_tokens": max_tokens, "temperature": temperature, "top_logprobs": top_logprobs, "int_list": tuple(int_list) if int_list else None, "seed": seed}

    def forget(self, messages, **params) -> None:
        """Drop a cached answer that turned out unusable, so the next materialization asks again."""
        if self.cache is not None:
            self.cache.forget(ResponseCache.key(self.model_id, messages, self._request(**params)))

    async def complete(self, messages, **params) -> Completion:
        params = self._request(**params)
        key = ResponseCache.key(self.model_id, messages, params)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.ledger.cache_hits += 1
            return hit
        if key in self._in_flight:  # the same request is already on its way: share its answer
            self.ledger.cache_hits += 1
            return await asyncio.shield(self._in_flight[key])
        self._in_flight[key] = asyncio.ensure_future(self._send(key, messages, params))
        try:
            return await asyncio.shield(self._in_flight[key])
        finally:
            self._in_flight.pop(key, None)

    async def _send(self, key: str, messages, params: dict) -> Completion:
        async with self._semaphore:
            self.ledger.check_budget()
            self.ledger.requests += 1
            completion = await self._with_retries(messages, params)
        self.ledger.prompt_tokens += completion.prompt_tokens
        self.ledger.completion_tokens += completion.completion_tokens
        if self.cache is not None:
            self.cache.put(key, completion)
        return completion

    async def _with_retries(self, messages, params) -> Completion:
        for attempt in range(1, self.max_attempts + 1):
            try:
                return await self.inner.complete(messages, **params)
            except TransientLLMError as error:
                if attempt == self.max_attempts:
                    self.ledger.failures += 1
                    if error.unreachable:
                        raise LLMEndpointError(str(error)) from error
                    raise
                self.ledger.retries += 1
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)  # jitter spreads clients apart
                if error.retry_after_s is not None:  # the server said when: wait at least that long (within our cap)
                    delay = max(delay, min(error.retry_after_s, self.max_backoff_s))
                await asyncio.sleep(delay)
            except Exception:
                self.ledger.failures += 1
                raise
        raise AssertionError("unreachable")


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
    """The explainer/scorer LLM. Set `api_key` with `EnvVar("...")`: Dagster resolves it at run time and never shows it."""

    backend: Literal["embedded", "openai", "vllm"] = Field(default="embedded", description="'embedded' = SmolLM2-135M-Instruct via llama-cpp-python; 'openai' = any OpenAI-compatible HTTP endpoint; 'vllm' = vLLM offline on a GPU.")
    base_url: str | None = Field(default=None, description="Endpoint for backend 'openai', e.g. http://127.0.0.1:8000/v1 (vLLM) or https://openrouter.ai/api/v1.")
    model: str = Field(default="embedded", description="Model name sent to the endpoint; for 'embedded' a GGUF path or 'embedded'; for 'vllm' a HF id or path.")
    api_key: str | None = Field(default=None, description="Set with EnvVar('OPENAI_API_KEY') (or your provider's variable); never a literal.")
    max_concurrency: int | None = Field(default=None, description="Requests in flight at once; default 8 for 'embedded' and 'openai', 256 for 'vllm' (its batch size: offline vLLM is fast only in large batches).")
    max_attempts: int = Field(default=6, description="Attempts per request on 429 / 5xx / timeouts / connection errors (backoff doubles from 0.5 s, with jitter).")
    timeout_s: float = Field(default=120.0, description="Per-request timeout of HTTP backends.")
    n_ctx: int = Field(default=2048, description="Context window of the embedded model.")
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict, description="Passed to vllm.LLM for backend 'vllm', e.g. {tensor_parallel_size: 2, gpu_memory_utilization: 0.85, max_model_len: 4096}.")
    cache_dir: str | None = Field(default=None, description="Response cache directory; default <data>/llm_cache. '' disables the cache.")
    prompt_price_per_million: float | None = Field(default=None, description="Price per million prompt tokens, to report cost.")
    completion_price_per_million: float | None = Field(default=None, description="Price per million completion tokens, to report cost.")
    max_requests: int | None = Field(default=None, description="Stop sending after this many requests in one materialization (finished work is kept).")
    max_cost: float | None = Field(default=None, description="Stop sending once this cost is reached in one materialization (needs prices).")

    def backend_client(self) -> LLMClient:
        if self.backend == "embedded":
            return LlamaCppClient(None if self.model == "embedded" else self.model, n_ctx=self.n_ctx)
        if self.backend == "vllm":
            return VLLMOfflineClient(self.model, max_batch=self.concurrency(), **self.vllm_engine_args)
        if not self.base_url:
            raise ValueError("llm.backend is 'openai' but llm.base_url is not set. Fix: set it, e.g. http://127.0.0.1:8000/v1.")
        return OpenAICompatibleClient(self.base_url, self.model, self.api_key, self.timeout_s)

    def concurrency(self) -> int:
        return self.max_concurrency or (256 if self.backend == "vllm" else 8)

    def model_id(self) -> str:
        """What identifies the answers' source in the cache: backend, endpoint and model (never the key)."""
        return f"{self.backend}|{self.base_url or ''}|{self.model}"

    def client(self, default_cache_dir: Path | None = None) -> ProductionClient:
        prices = None
        if self.prompt_price_per_million is not None or self.completion_price_per_million is not None:
            prices = (self.prompt_price_per_million or 0.0, self.completion_price_per_million or 0.0)
        cache_dir = Path(self.cache_dir) if self.cache_dir else default_cache_dir
        cache = ResponseCache(cache_dir / "responses.sqlite") if cache_dir is not None and self.cache_dir != "" else None
        ledger = Ledger(prices, self.max_requests, self.max_cost)
        return ProductionClient(self.backend_client(), self.model_id(), cache, ledger, self.concurrency(), self.max_attempts)
