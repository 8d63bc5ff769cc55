"""The LLM as explainers and scorers use it; they only ever call `await client.complete(messages, ...)`
or `client.ask(...)`. `LLMResource` (the `[llm]` settings) makes a `ProductionClient` around one
backend (`resources/llm_backends.py`), which adds a content-addressed response cache
(`resources/response_cache.py`), a bounded number of requests in flight shared by every run on the
data root or every node of a cluster (`resources/endpoint_slots.py`), retries with exponential
backoff and jitter on 429 / 5xx / timeouts / connection errors (none on other 4xx), and a ledger of
requests, tokens, cache hits, failures and cost with an optional budget
(`resources/llm_accounting.py`). API keys come from the environment (Dagster `EnvVar`) and are
never stored.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from dagster import ConfigurableResource, EnvVar
from pydantic import Field, PrivateAttr

from resources.endpoint_slots import EndpointSlots, SharedEndpointSlots, Slots
from resources.engines import engine
from resources.llm_accounting import BudgetExceeded, Ledger
from resources.llm_backends import (
    LlamaCppClient,
    OpenAICompatibleClient,
    StructuredOutput,
    VLLMOfflineClient,
)
from resources.llm_protocol import Completion, LLMClient, LLMEndpointError, TransientLLMError
from resources.response_cache import ResponseCache, SharedResponseCache
from resources.subject_model import embedded_gguf_path
from storage.content_identity import content_digest
from storage.layout import DataRoot, response_cache_file

T = TypeVar("T")


def estimated_prompt_tokens(messages: list[dict]) -> int:
    """A deliberately high count of a chat prompt's tokens: BPE tokenizers take about 4 bytes of
    English per token, 3 leaves room for markup and symbols, plus each message's template tokens."""
    return sum(len(m["content"].encode()) // 3 + 8 for m in messages)


@dataclass(frozen=True)
class Refusal:
    """What a reader of answers (`ProductionClient.ask`'s `read`) returns for an answer it will not read,
    and why: the reason is stored with the failure, beside the raw answer."""

    reason: str


UNREADABLE = "unreadable answer"
BUDGET_STOPPED = "budget stopped"
REQUEST_FAILED = "request failed"
"""How `Asked.failure` starts: every question lost to unreadable answers, the budget or a failed request
is stored as `<kind>: <detail>`, the answers received following with the reader's reasons."""


def failure(kind: str, detail: str, answers: list[Completion], reasons: list[str]) -> str:
    """`<kind>: <detail>, after 'answer' (reason) then 'answer' (reason)`: the one format of a lost question."""
    said = " then ".join(
        f"{a.text[:300]!r} ({why})" for a, why in zip(answers, reasons, strict=False)
    )  # each answer was refused, for its reason
    return f"{kind}: {detail}{', after ' if detail and said else ''}{said}"


def stopped_by_budget(reason: str) -> bool:
    """Whether a stored failure is the budget's: such a latent was not finished and is asked next time."""
    return reason.startswith(BUDGET_STOPPED)


@dataclass
class Asked(Generic[T]):
    """One question's outcome: the value read, every answer received, and why there is no value."""

    value: T | None
    answers: list[Completion] = field(default_factory=list)
    failure: str = ""

    @property
    def answer(self) -> Completion | None:
        """The answer the value was read from."""
        return self.answers[-1] if self.value is not None else None

    @property
    def prompt_tokens(self) -> int:
        return sum(a.prompt_tokens for a in self.answers)

    @property
    def completion_tokens(self) -> int:
        return sum(a.completion_tokens for a in self.answers)


class ProductionClient:
    """Cache → budget → bounded concurrency (this process, and across processes with `slots`) → retries →
    backend, recording everything in the ledger."""

    def __init__(
        self,
        inner: LLMClient,
        model_id: str,
        cache: ResponseCache | SharedResponseCache | None,
        ledger: Ledger,
        max_concurrency: int,
        max_attempts: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        context_window: int | None = None,
        slots: Slots | None = None,
        identity: str | None = None,
    ):
        self.inner = inner
        self.model_name = inner.model_name
        self.model_id = model_id
        """What the response cache keys answers by: backend, endpoint, model and answer format."""
        self.identity = identity or model_id
        """What the results name as their model (`LLMResource.identity`): no endpoint, no key."""
        self.cache = cache
        self.ledger = ledger
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.context_window = context_window
        """The judge's context in tokens, if known: prompts are cut to fit it (`fits`)."""
        self.max_concurrency = max(1, max_concurrency)
        self._semaphore = asyncio.Semaphore(self.max_concurrency)
        self._slots = slots
        self._in_flight: dict[str, asyncio.Future] = {}
        self._first_answered = False
        self._first_lock: asyncio.Lock | None = None
        self._fatal: LLMEndpointError | None = None

    def fits(self, messages: list[dict], max_tokens: int) -> bool:
        """Whether the prompt and its answer fit the judge's context (always, when it is unknown)."""
        return (
            self.context_window is None
            or estimated_prompt_tokens(messages) + max_tokens <= self.context_window
        )

    def fitting(
        self, build: Callable[[list], list[dict]], items: list, max_tokens: int
    ) -> tuple[list[dict] | None, int]:
        """The prompt `build` makes of as many leading `items` as fit the judge's context, and how many
        were dropped; None when not even one fits."""
        for keep in range(len(items), 0, -1):
            messages = build(items[:keep])
            if self.fits(messages, max_tokens):
                return messages, len(items) - keep
        return None, len(items)

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
        return {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_logprobs": top_logprobs,
            "int_list": tuple(int_list) if int_list else None,
            "seed": seed,
        }

    async def forget(self, messages, **params) -> None:
        """Drop a cached answer that turned out unusable, so the next materialization asks again."""
        if self.cache is not None:
            await asyncio.to_thread(
                self.cache.forget,
                ResponseCache.key(self.model_id, messages, self._request(**params)),
            )

    async def ask(
        self, messages: list[dict], read: Callable[[str], T | Refusal], reask: dict, **params
    ) -> Asked[T]:
        """The one way an answer that must be read is asked: what `read` makes of the answer, or why
        there is none (`Asked.failure`). An answer `read` refuses is asked again once, as a follow-up turn
        `reask` that says what was wrong. The refused answer stays in the cache while the question is open:
        the follow-up is cached under a key that holds it, so a question answered on the follow-up is
        answered from the cache next time. A question that ends without a value forgets every turn, so the
        next run asks it afresh. Budget stops and failed requests lose this question, not the run;
        `LLMEndpointError` (a whole-run error) propagates, the question still open."""
        answers, reasons, conversation, turns = [], [], messages, []
        try:
            for _ in range(2):
                answer = await self.complete(conversation, **params)
                answers.append(answer)
                turns.append(conversation)
                value = read(answer.text)
                if not isinstance(value, Refusal):
                    return Asked(value, answers)
                reasons.append(value.reason)
                conversation = messages + [{"role": "assistant", "content": answer.text}, reask]
            lost = failure(UNREADABLE, "", answers, reasons)
        except LLMEndpointError:
            raise
        except BudgetExceeded as stop:
            lost = failure(BUDGET_STOPPED, str(stop), answers, reasons)
        except Exception as error:  # retries exhausted, a request the endpoint rejected
            lost = failure(
                REQUEST_FAILED, f"{type(error).__name__}: {str(error)[:300]}", answers, reasons
            )
        for turn in turns:
            await self.forget(turn, **params)
        return Asked(None, answers, lost)

    async def complete(self, messages, **params) -> Completion:
        params = self._request(**params)
        key = ResponseCache.key(self.model_id, messages, params)
        if (
            self.cache is not None
            and (hit := await asyncio.to_thread(self.cache.get, key)) is not None
        ):  # a database's wait must not stop the loop
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

    @asynccontextmanager
    async def _held(self):
        """A request's place in flight: one of this run's `max_concurrency`, and one of the endpoint's slots."""
        async with self._semaphore, self._slots.hold() if self._slots else nullcontext():
            yield

    async def _send(self, key: str, messages, params: dict) -> Completion:
        completion = None
        if not self._first_answered and getattr(self.inner, "remote", False):
            # The first request to a remote endpoint goes alone: a wrong key, model or format then costs
            # one request, and every other request of the run fails with that error without being sent.
            # The others wait here holding nothing, so other runs on the endpoint are not held up by them.
            self._first_lock = self._first_lock or asyncio.Lock()
            async with self._first_lock:
                if not self._first_answered:
                    async with self._held():
                        completion = await self._attempt(messages, params)
                    self._first_answered = True
        if completion is None:
            async with self._held():
                completion = await self._attempt(messages, params)
        self.ledger.prompt_tokens += completion.prompt_tokens
        self.ledger.completion_tokens += completion.completion_tokens
        if self.cache is not None:
            await asyncio.to_thread(self.cache.put, key, completion)
        return completion

    async def _attempt(self, messages, params: dict) -> Completion:
        if self._fatal is not None:
            raise self._fatal
        self.ledger.check_budget()
        self.ledger.requests += 1
        try:
            return await self._with_retries(messages, params)
        except LLMEndpointError as error:
            self._fatal = error
            raise
        except Exception:
            self._first_answered = (
                True  # the endpoint answered: this request's own problem, not the run's
            )
            raise

    async def _with_retries(self, messages, params) -> Completion:
        connected = (
            False  # whether any attempt reached the server: if none did, the endpoint is gone
        )
        for attempt in range(1, self.max_attempts + 1):
            try:
                return await self.inner.complete(messages, **params)
            except TransientLLMError as error:
                connected = connected or not error.unreachable
                # an endpoint that never answered this run is down, not busy: no point in trying again
                if attempt == self.max_attempts or (error.down and not self._first_answered):
                    self.ledger.failures += 1
                    if not connected:
                        raise LLMEndpointError(str(error)) from error
                    raise
                self.ledger.retries += 1
                delay = min(
                    self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)
                ) * random.uniform(0.5, 1.0)  # jitter spreads clients apart
                if (
                    error.retry_after_s is not None
                ):  # the server said when: wait at least that long (within our cap)
                    delay = max(delay, min(error.retry_after_s, self.max_backoff_s))
                await asyncio.sleep(delay)
            except Exception:
                self.ledger.failures += 1
                raise
        raise AssertionError("unreachable")


ROLES = ("explainer", "judge")
"""What an LLM is asked for: writing explanations, or judging them (every LLM scorer)."""


class LLMResource(ConfigurableResource):
    """The explainer and judge LLM: `[llm]`, with `[llm.explainer]` / `[llm.judge]` overriding any of its
    settings for that role (a strong explainer and a cheap judge, each on its own endpoint). The API key
    is read from the variable `api_key_env` when a client is made, at run time, and never shown."""

    backend: Literal["embedded", "openai", "vllm"] = Field(
        default="embedded",
        description="'embedded' = SmolLM2-135M-Instruct via llama-cpp-python; "
        "'openai' = any OpenAI-compatible HTTP endpoint; 'vllm' = vLLM offline on a GPU.",
    )
    base_url: str | None = Field(
        default=None,
        description="Endpoint for backend 'openai', e.g. http://127.0.0.1:8000/v1 (vLLM) or "
        "https://openrouter.ai/api/v1.",
    )
    model: str = Field(
        default="embedded",
        description="Model name sent to the endpoint; for 'embedded' a GGUF path or 'embedded'; "
        "for 'vllm' a HF id or path.",
    )
    api_key: str | None = Field(
        default=None,
        description="Set with EnvVar('OPENAI_API_KEY') (or your provider's variable); "
        "never a literal. Deployments use `api_key_env` instead.",
    )
    api_key_env: str | None = Field(
        default=None,
        description="The environment variable holding the API key, "
        "read when the run makes its client (unset is fine for local servers).",
    )
    max_concurrency: int | None = Field(
        default=None,
        description="Requests in flight at once; default 8 for 'embedded' and 'openai', "
        "256 for 'vllm' (its batch size: offline vLLM is fast only in large batches). "
        "For 'openai' it is the endpoint's limit shared by every run on the data root "
        "(EndpointSlots), or on every node with [settings] coordination_url, not a per-run one.",
    )
    max_attempts: int = Field(
        default=6,
        description="Attempts per request on 429 / 5xx / timeouts / connection errors "
        "(backoff doubles from 0.5 s, with jitter).",
    )
    timeout_s: float = Field(default=120.0, description="Per-request timeout of HTTP backends.")
    n_ctx: int = Field(default=2048, description="Context window of the embedded model.")
    context_window: int | None = Field(
        default=None,
        description="The judge's context in tokens; prompts that would not fit drop examples "
        "(and record how many). Default: n_ctx for 'embedded', max_model_len for 'vllm', unknown "
        "(nothing dropped) for 'openai'.",
    )
    structured_output: StructuredOutput = Field(
        default="json_schema",
        description="How an 'openai' endpoint is made to answer value lists: 'json_schema' "
        "(OpenAI, vLLM, llama.cpp's llama-server), 'json_object' with a schema "
        "(llama-cpp-python's server), 'off' (parsed strictly from text). "
        "The embedded model always uses a grammar, 'vllm' its structured outputs.",
    )
    key_setting: str = Field(
        default="llm.api_key",
        description="Where the user sets the API key (e.g. the environment variable), "
        "named in the error when the endpoint rejects it.",
    )
    model_setting: str = Field(
        default="llm.model",
        description="Where the user sets the model name, named in the error when the endpoint does not serve it.",
    )
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to vllm.LLM for backend 'vllm', e.g. {tensor_parallel_size: 2, "
        "gpu_memory_utilization: 0.85, max_model_len: 4096}.",
    )
    cache_dir: str | None = Field(
        default=None,
        description="Response cache directory; default <data>/llm_cache. '' disables the cache. "
        "With [settings] coordination_url the cache is in that database instead.",
    )
    prompt_price_per_million: float | None = Field(
        default=None, description="Price per million prompt tokens, to report cost."
    )
    completion_price_per_million: float | None = Field(
        default=None, description="Price per million completion tokens, to report cost."
    )
    max_requests: int | None = Field(
        default=None,
        description="Stop sending after this many requests in one materialization (finished work is kept).",
    )
    max_cost: float | None = Field(
        default=None,
        description="Stop sending once this cost is reached in one materialization (needs prices).",
    )
    explainer: dict[str, Any] = Field(
        default_factory=dict,
        description="[llm.explainer]: settings that differ for the explainer (e.g. "
        "model, base_url, api_key_env); the rest come from [llm].",
    )
    judge: dict[str, Any] = Field(
        default_factory=dict,
        description="[llm.judge]: settings that differ for the LLM scorers' judge; the rest come from [llm].",
    )

    def for_role(self, role: str | None) -> LLMResource:
        """The settings of `role` ('explainer' or 'judge'): these, with the role's table on top."""
        if role is None or not getattr(self, role):
            return self
        if role not in ROLES:
            raise ValueError(f"unknown LLM role {role!r}; known: {ROLES}")
        values = {
            name: getattr(self, name) for name in type(self).model_fields if name not in ROLES
        }
        return type(self)(**{**values, **getattr(self, role)})

    def identity(self, role: str | None = None) -> str:
        """What names the model that answers `role` in the results it shapes: the backend and the model (the
        embedded GGUF by content). Endpoint URL, key, concurrency, timeouts and budgets are operational:
        they change no answer, so they are not part of it."""
        chosen = self.for_role(role)
        if chosen.backend == "embedded":
            path = Path(chosen.model) if chosen.model != "embedded" else embedded_gguf_path()
            return f"embedded:{path.name}@{content_digest(path)}"
        local = Path(chosen.model).expanduser()
        return f"{chosen.backend}:{chosen.model}" + (
            f"@{content_digest(local)}" if chosen.backend == "vllm" and local.exists() else ""
        )

    def key(self) -> str | None:
        """The API key: `api_key`, else the value of `api_key_env` now (not when the definitions were loaded)."""
        return self.api_key or (EnvVar(self.api_key_env).get_value() if self.api_key_env else None)

    def backend_client(self) -> LLMClient:
        if self.backend == "embedded":
            return LlamaCppClient(
                None if self.model == "embedded" else self.model, n_ctx=self.n_ctx
            )
        if self.backend == "vllm":
            return VLLMOfflineClient(
                self.model, max_batch=self.concurrency(), **self.vllm_engine_args
            )
        if not self.base_url:
            raise ValueError(
                "llm.backend is 'openai' but llm.base_url is not set. Fix: set it, e.g. http://127.0.0.1:8000/v1."
            )
        key = self.key()
        key_setting = self.key_setting + (
            f"; {self.api_key_env} is not set" if self.api_key_env and not key else ""
        )
        return OpenAICompatibleClient(
            self.base_url,
            self.model,
            key,
            self.timeout_s,
            structured_output=self.structured_output,
            key_setting=key_setting,
            model_setting=self.model_setting,
        )

    def concurrency(self) -> int:
        return self.max_concurrency or (256 if self.backend == "vllm" else 8)

    def model_id(self) -> str:
        """What identifies the answers' source in the cache: backend, endpoint, model and how answers are
        constrained (never the key). A model in local files (the embedded GGUF, a vLLM folder) is named
        by its content, as in `identity`: another file at the same path must be asked, not answered from
        the old one's cache."""
        constrained = (
            f"|{self.structured_output}"
            if self.backend == "openai" and self.structured_output != "off"
            else ""
        )
        model = self.model if self.backend == "openai" else self.identity().split(":", 1)[1]
        return f"{self.backend}|{self.base_url or ''}|{model}{constrained}"

    _opened_caches: list = PrivateAttr(default_factory=list)

    def teardown_after_execution(self, context) -> None:
        """Close the response caches this run opened (the model engines and a cluster's coordination
        sessions stay for the process: `resources/engines.py`)."""
        while self._opened_caches:
            self._opened_caches.pop().close()

    def client(
        self,
        root: DataRoot | None = None,
        role: str | None = None,
        coordination_url: str = "",
    ) -> ProductionClient:
        """The production client of `role` (None: the `[llm]` settings alone). Its cache and endpoint
        slots are under the data root `root` (the cache in `llm.cache_dir` if set), or in the database
        of `coordination_url`."""
        chosen = self.for_role(role)
        prices = None
        if (
            chosen.prompt_price_per_million is not None
            or chosen.completion_price_per_million is not None
        ):
            prices = (
                chosen.prompt_price_per_million or 0.0,
                chosen.completion_price_per_million or 0.0,
            )
        if chosen.cache_dir:
            cache_path = response_cache_file(Path(chosen.cache_dir))
        elif chosen.cache_dir is None and root is not None:
            cache_path = root.response_cache_path
        else:  # '' turns the cache off; without a data root there is no default
            cache_path = None
        cache = None
        if cache_path is not None:
            if coordination_url:
                cache = engine(
                    "response cache",
                    (coordination_url,),
                    lambda: SharedResponseCache(coordination_url),
                )
            else:
                cache = ResponseCache(cache_path)
                self._opened_caches.append(
                    cache
                )  # closed at this resource's teardown, whichever role opened it
        ledger = Ledger(prices, chosen.max_requests, chosen.max_cost)
        slots = None
        if (
            chosen.backend == "openai" and root is not None
        ):  # one limit per endpoint and model for every run on this data root (or cluster)
            if coordination_url:
                name, n = f"endpoint {chosen.model_id()}", chosen.concurrency()
                slots = engine(
                    "endpoint slots",
                    (coordination_url, name, n),
                    lambda: SharedEndpointSlots(coordination_url, name, n),
                )
            else:
                slots = EndpointSlots(
                    root.endpoint_slots_dir(chosen.model_id()), chosen.concurrency()
                )
        return ProductionClient(
            chosen.backend_client(),
            chosen.model_id(),
            cache,
            ledger,
            chosen.concurrency(),
            chosen.max_attempts,
            context_window=chosen.judge_context(),
            slots=slots,
            identity=chosen.identity(),
        )

    def judge_context(self) -> int | None:
        if self.context_window is not None:
            return self.context_window
        return {"embedded": self.n_ctx, "vllm": self.vllm_engine_args.get("max_model_len")}.get(
            self.backend
        )
