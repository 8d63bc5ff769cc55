"""One async LLM client interface, three backends, and what production use needs around them.

Explainers and scorers only ever call `await client.complete(messages, ...)`. Backends:
embedded llama.cpp (in-process GGUF), any OpenAI-compatible HTTP endpoint through the `openai`
SDK (OpenAI, OpenRouter, vLLM's or llama.cpp's server), and vLLM offline in-process (GPU only,
optional extra `[vllm]`, imported lazily). `LLMResource.client()` wraps the backend in
`ProductionClient`: a content-addressed response cache on disk, a bounded number of requests in
flight, retries with exponential backoff and jitter on 429 / 5xx / timeouts / connection errors
(none on other 4xx), and a ledger of requests, tokens, cache hits, failures and cost with an
optional budget. The cache and the bound on requests in flight are shared by every run on the data
root, or by every node of a cluster through PostgreSQL (`[settings] coordination_url`). API keys
come from the environment (Dagster `EnvVar`) and are never stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import socket
import sqlite3
import threading
import uuid
import weakref
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

from dagster import ConfigurableResource, EnvVar
from pydantic import Field, PrivateAttr

from resources.engines import engine
from resources.subject_model import embedded_gguf_path
from storage.coordination import Session, advisory_key, create_table
from storage.identity import content_digest

T = TypeVar("T")


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


def int_list_schema(n: int, lo: int, hi: int) -> dict:
    """JSON schema of `{"values": [v, ..., v]}` with exactly n integers in [lo, hi] (OpenAI and vLLM
    structured outputs need an object at the root). The range is an enum: llama.cpp's schema-to-grammar
    converter enforces enums but ignores minimum/maximum."""
    values = {
        "type": "array",
        "items": {"type": "integer", "enum": list(range(lo, hi + 1))},
        "minItems": n,
        "maxItems": n,
    }
    return {
        "type": "object",
        "properties": {"values": values},
        "required": ["values"],
        "additionalProperties": False,
    }


def estimated_prompt_tokens(messages: list[dict]) -> int:
    """A deliberately high count of a chat prompt's tokens: BPE tokenizers take about 4 bytes of
    English per token, 3 leaves room for markup and symbols, plus each message's template tokens."""
    return sum(len(m["content"].encode()) // 3 + 8 for m in messages)


# ---- backends -----------------------------------------------------------------------------------


def use_plain_cpu_buffers() -> None:
    """Load llama.cpp models without ggml's CPU "extra buffer types" (AMX tiles, repacked weights).

    On CPUs with AMX (Sapphire Rapids and later), llama-cpp-python 0.3.36 built natively segfaults on
    the first decode through the AMX buffers; plain buffers work everywhere and the embedded model is
    Q4_1, which the repacking does not speed up. Patches the default parameters Llama() starts from."""
    import llama_cpp.llama_cpp as bindings

    if getattr(bindings.llama_model_default_params, "plain_buffers", False):
        return
    defaults = bindings.llama_model_default_params

    def plain():
        params = defaults()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    plain.plain_buffers = True
    bindings.llama_model_default_params = plain


def _llama(model_path: str, digest: str, n_ctx: int, seed: int, logits_all: bool):
    """The process's llama.cpp model for these settings (`resources/engines.py`); `digest`, the file's
    content, so that a file replaced at the same path is loaded afresh."""

    def build():
        from llama_cpp import Llama

        use_plain_cpu_buffers()
        threads = os.cpu_count() or 1
        return Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            seed=seed,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            verbose=False,
        )

    return engine("llama.cpp", (model_path, digest, n_ctx, seed, logits_all), build)


class LlamaCppClient:
    """The embedded backend: a GGUF model in-process through llama-cpp-python, one call at a time."""

    def __init__(self, model_path: str | None = None, n_ctx: int = 2048, seed: int = 0):
        self.model_path = model_path or str(embedded_gguf_path())
        self.model_name = os.path.basename(self.model_path)
        self.digest = content_digest(Path(self.model_path))
        self.n_ctx = n_ctx
        self.seed = seed
        self._lock = threading.Lock()

    async def check(self) -> None:
        await asyncio.to_thread(_llama, self.model_path, self.digest, self.n_ctx, self.seed, False)

    async def aclose(self) -> None:
        return None  # the model stays loaded for the next materialization in this process

    def _complete_sync(
        self, messages, max_tokens, temperature, top_logprobs, int_list, seed
    ) -> Completion:
        from llama_cpp import LlamaGrammar

        llm = _llama(
            self.model_path, self.digest, self.n_ctx, self.seed, bool(top_logprobs)
        )  # logprobs need every position's logits
        grammar = (
            LlamaGrammar.from_string(int_list_grammar(*int_list), verbose=False)
            if int_list
            else None
        )
        extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
        with self._lock:
            out = llm.create_chat_completion(
                messages=messages,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=self.seed if seed is None else seed,
                grammar=grammar,
                **extra,
            )
        return completion_from_json(out)  # llama.cpp answers in OpenAI's chat-completion format

    async def complete(
        self, messages, *, max_tokens, temperature=0.0, top_logprobs=0, int_list=None, seed=None
    ) -> Completion:
        return await asyncio.to_thread(
            self._complete_sync, messages, max_tokens, temperature, top_logprobs, int_list, seed
        )


StructuredOutput = Literal["json_schema", "json_object", "off"]


class OpenAICompatibleClient:
    """Any OpenAI-compatible chat endpoint (OpenAI, OpenRouter, vLLM or llama.cpp servers) via the `openai` SDK.

    The SDK's own retries are off: `ProductionClient` retries, so that every attempt is counted.
    Value-list answers are constrained by the endpoint's structured output: `json_schema` (OpenAI,
    vLLM, llama.cpp's llama-server), `json_object` with a schema (llama-cpp-python's server) or `off`.
    Errors that concern the whole run (key, model, payment, request format) raise `LLMEndpointError`
    naming the setting to fix; `key_setting` and `model_setting` say where the user sets them.
    """

    remote = True
    """Its first request of a run is sent alone (see `ProductionClient._send`)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        timeout_s: float = 120.0,
        transport: Literal["aiohttp", "httpx"] = "aiohttp",
        structured_output: StructuredOutput = "json_schema",
        key_setting: str = "llm.api_key",
        model_setting: str = "llm.model",
    ):
        self.base_url = base_url
        self.model_name = model
        self._api_key = api_key or "EMPTY"
        self._has_key = bool(api_key)
        self._timeout_s = timeout_s
        self.transport = transport
        self.structured_output = structured_output
        self.key_setting = key_setting
        self.model_setting = model_setting
        self.listed_models: list[str] | None = None
        """Model ids the endpoint lists, if it lists any: named in the error when the model is not served."""
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
                except (
                    AttributeError,
                    RuntimeError,
                ):  # an openai without the `aiohttp` extra: its httpx client works too
                    pass
            self._sdk_client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._api_key,
                timeout=self._timeout_s,
                max_retries=0,
                http_client=http_client,
            )
            self._sdk_loop = loop
        return self._sdk_client

    async def aclose(self) -> None:
        if self._sdk_client is not None and self._sdk_loop is asyncio.get_running_loop():
            await self._sdk_client.close()
        self._sdk_client = self._sdk_loop = None

    def _unreachable(self, error: Exception) -> LLMEndpointError:
        return LLMEndpointError(
            f"Cannot reach the LLM endpoint at {self.base_url}: "
            f"{connection_failure(error, self._timeout_s)}. "
            "Fix: start the server or correct `llm.base_url`, "
            "or use the embedded model with `llm.backend: embedded`."
        )

    def whole_run_error(self, error, sent_format: bool = False) -> LLMEndpointError | None:
        """The run-stopping meaning of an HTTP error status, or None when it concerns this request only.
        `sent_format`: the request carried a `response_format`, which some servers reject with a 4xx and
        others (llama-cpp-python's) with a 500 naming it."""
        status, said = error.status_code, server_message(error)
        where = f"The LLM endpoint at {self.base_url} answered HTTP {status} ({said[:300]})"
        if status in (401, 403):
            key = "no API key was set" if not self._has_key else "it rejects the API key"
            return LLMEndpointError(f"{where}: {key}. Fix: put a valid key in {self.key_setting}.")
        if status == 402:
            return LLMEndpointError(
                f"{where}: the account cannot pay for requests. "
                f"Fix: add credit with the provider, or point {self.key_setting} at another account."
            )
        if status == 404 or (status in (400, 422) and _MODEL_MISSING.search(said)):
            served = (
                f" It lists: {', '.join(self.listed_models[:20])}." if self.listed_models else ""
            )
            if status == 404 and not re.search(r"model", said, re.IGNORECASE):
                return LLMEndpointError(
                    f"{where}: no chat endpoint at {self.base_url}/chat/completions. "
                    "Fix: correct `llm.base_url` (most servers want it to end in /v1)."
                )
            return LLMEndpointError(
                f"{where}: it does not serve the model {self.model_name!r}.{served} "
                f"Fix: set {self.model_setting} to a model it serves."
            )
        if (
            sent_format
            and (status in (400, 422) or status >= 500)
            and _FORMAT_REJECTED.search(said)
        ):
            return LLMEndpointError(
                f"{where}: it does not accept structured output {self.structured_output!r}. "
                "Fix: set `llm.structured_output` to 'json_object' (llama-cpp-python's server) "
                "or 'off' (answers are then parsed strictly from text)."
            )
        return None

    async def check(self) -> None:
        """Reachable, and the key accepted where the endpoint lists models; whether the model is served is
        told by the first real request (`ProductionClient` sends it alone)."""
        import openai

        try:
            listed = await self._sdk().models.list()
            self.listed_models = [m.id for m in listed.data]
        except openai.APIConnectionError as error:
            raise self._unreachable(error) from error
        except openai.APIStatusError as error:
            if error.status_code in (401, 402, 403):
                raise self.whole_run_error(error) from error
            # other statuses: some servers do not list models; the first real request will tell

    async def complete(
        self, messages, *, max_tokens, temperature=0.0, top_logprobs=0, int_list=None, seed=None
    ) -> Completion:
        import openai

        extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
        if seed is not None:
            extra["seed"] = seed
        if int_list and self.structured_output == "json_schema":
            extra["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "values",
                    "schema": int_list_schema(*int_list),
                    "strict": True,
                },
            }
        elif int_list and self.structured_output == "json_object":
            extra["response_format"] = {"type": "json_object", "schema": int_list_schema(*int_list)}
        body = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            **extra,
        }
        try:
            # The SDK's typed `create` re-walks every message against its TypedDicts, and building its typed
            # response costs about as much again; posting the same body through the SDK's client with
            # `cast_to=object` keeps its transport, errors and JSON decoding and returns the plain answer.
            out = await self._sdk().post("/chat/completions", cast_to=object, body=body)
        except openai.APITimeoutError as error:
            raise TransientLLMError(
                f"timed out after {self._timeout_s:g} s waiting for {self.base_url}"
            ) from error
        except openai.APIConnectionError as error:
            unreachable = self._unreachable(error)
            down = any(
                word in str(unreachable) for word in ("connection refused", "does not resolve")
            )
            raise TransientLLMError(str(unreachable), unreachable=True, down=down) from error
        except openai.APIStatusError as error:
            if (
                whole_run := self.whole_run_error(error, sent_format="response_format" in body)
            ) is not None:
                raise whole_run from error
            if error.status_code == 429 or error.status_code >= 500:
                raise TransientLLMError(
                    f"HTTP {error.status_code} from {self.base_url}: {server_message(error)[:200]}",
                    retry_after_s=retry_after(error.response.headers),
                ) from error
            raise
        if not isinstance(out, dict) or not isinstance(out.get("choices"), list):
            # a 200 whose body is not a chat completion (cut off, HTML from a proxy): the server's fault, try again
            raise TransientLLMError(
                f"{self.base_url} answered 200 with a body that is not a chat completion: {str(out)[:200]!r}"
            )
        return completion_from_json(out)


_MODEL_MISSING = re.compile(
    r"model.{0,80}(not found|does not exist|not a valid|no such|not available|not served)"
    r"|(invalid|unknown|no such|not a valid) model|model_not_found",
    re.IGNORECASE | re.DOTALL,
)
_FORMAT_REJECTED = re.compile(
    r"response_format|json_schema|structured output|guided", re.IGNORECASE
)


def server_message(error) -> str:
    """What the server said in an error answer (OpenAI's {"error": {"message": ...}} or any body), on one line."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict):
            body = body.get("message") or body.get("detail") or body
    return " ".join(
        str(body if body is not None else error).split()
    )  # one line, however the server laid it out


def connection_failure(error: BaseException, timeout_s: float) -> str:
    """Why a connection failed, in words a user can act on: refused, name not found, timed out."""
    import socket

    seen, chain = set(), [error]
    while chain:
        e = chain.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError) or "refused" in str(e).lower():
            return "connection refused (nothing listens at that host and port)"
        if isinstance(e, socket.gaierror) or "name or service not known" in str(e).lower():
            return "the host name does not resolve"
        chain += [e.__cause__, e.__context__, getattr(e, "os_error", None)]
    import openai

    if isinstance(error, (openai.APITimeoutError, TimeoutError)):
        return f"timed out after {timeout_s:g} s"
    return f"{type(error).__name__}: {error}"


def retry_after(headers) -> float | None:
    """Seconds a rate-limited server asks us to wait: `retry-after-ms` (OpenAI) or `retry-after` in seconds."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) * scale)
        except (
            KeyError,
            TypeError,
            ValueError,
        ):  # absent, or an HTTP date: fall back to our own backoff
            continue
    return None


def completion_from_json(out: object) -> Completion:
    """An OpenAI-format chat-completion answer (HTTP endpoints, embedded llama.cpp) as a `Completion`;
    absent or null fields (servers differ) count as empty. Numbers become plain Python ones:
    llama-cpp-python gives numpy float32 logprobs, which JSON (the response cache) cannot write."""
    if not isinstance(out, dict):
        return Completion(
            ""
        )  # not a chat completion at all: an empty answer, which marks the latent failed
    usage = out.get("usage") or {}
    choice = (out.get("choices") or [{}])[0] or {}
    steps = (choice.get("logprobs") or {}).get("content") or []
    return Completion(
        text=(choice.get("message") or {}).get("content") or "",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        top_logprobs=[
            {alt["token"]: float(alt["logprob"]) for alt in step.get("top_logprobs") or []}
            for step in steps
        ],
        tokens=[step["token"] for step in steps],
    )


def vllm_engine(vllm, model: str, engine_args: dict):
    """One vLLM engine per model and engine settings for the whole process (`resources/engines.py`): an
    engine holds the GPU's memory, so a second one for the next materialization would not fit, and
    loading takes minutes."""
    return engine(
        "vllm",
        (json.dumps({"model": model, **engine_args}, sort_keys=True, default=str),),
        lambda: vllm.LLM(model=model, **engine_args),
    )


class VLLMOfflineClient:
    """vLLM in-process on a GPU (`pip install 'autointerp[vllm]'`). Concurrent requests are gathered
    into one `LLM.chat` batch, which is how offline vLLM reaches its throughput. Value lists are
    constrained by vLLM's structured outputs (a JSON schema) where the installed vLLM has them."""

    def __init__(self, model: str, max_batch: int = 256, **engine_args):
        try:
            import vllm
        except ImportError as error:
            raise RuntimeError(
                "llm.backend 'vllm' needs vLLM on a GPU machine: pip install 'autointerp[vllm]'"
            ) from error
        self._vllm = vllm
        self.model_name = model
        self._engine = vllm_engine(vllm, model, engine_args)
        self._queue: list[tuple[list[dict], object, asyncio.Future]] = []
        self._max_batch = max_batch
        self._flusher: asyncio.Task | None = None

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def _sampling_params(self, max_tokens, temperature, top_logprobs, int_list, seed):
        params = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "logprobs": top_logprobs or None,
            "seed": seed,
        }
        if int_list:
            module = getattr(self._vllm, "sampling_params", None)
            if (
                structured := getattr(module, "StructuredOutputsParams", None)
            ) is not None:  # vLLM >= 0.11
                params["structured_outputs"] = structured(json=int_list_schema(*int_list))
            elif (
                guided := getattr(module, "GuidedDecodingParams", None)
            ) is not None:  # older vLLM
                params["guided_decoding"] = guided(json=int_list_schema(*int_list))
        return self._vllm.SamplingParams(**params)

    async def complete(
        self, messages, *, max_tokens, temperature=0.0, top_logprobs=0, int_list=None, seed=None
    ) -> Completion:
        future = asyncio.get_running_loop().create_future()
        self._queue.append(
            (
                messages,
                self._sampling_params(max_tokens, temperature, top_logprobs, int_list, seed),
                future,
            )
        )
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0.01)  # let concurrent callers join the batch
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            try:
                outputs = await asyncio.to_thread(
                    self._engine.chat,
                    [m for m, _, _ in batch],
                    [p for _, p, _ in batch],
                    use_tqdm=False,
                )
                if len(outputs) != len(batch):
                    raise RuntimeError(
                        f"vLLM answered {len(outputs)} of {len(batch)} conversations"
                    )
            except (
                BaseException
            ) as error:  # the engine failed: so does every request waiting on it, at once
                failed, self._queue = batch + self._queue, []
                for _, _, future in failed:
                    if not future.done():
                        future.set_exception(
                            error
                            if isinstance(error, Exception)
                            else RuntimeError(f"vLLM engine stopped: {error!r}")
                        )
                if not isinstance(error, Exception):
                    raise
                return
            for (_, _, future), out in zip(batch, outputs, strict=False):
                first = out.outputs[0]
                steps = first.logprobs or []
                alternatives = [
                    {lp.decoded_token: lp.logprob for lp in step.values()} for step in steps
                ]
                chosen = [
                    step[token].decoded_token
                    for step, token in zip(steps, first.token_ids, strict=False)
                ]
                if not future.done():
                    future.set_result(
                        Completion(
                            first.text,
                            len(out.prompt_token_ids),
                            len(first.token_ids),
                            alternatives,
                            chosen,
                        )
                    )


# ---- production wrapper -------------------------------------------------------------------------


class ResponseCache:
    """Responses on disk (SQLite), keyed by a hash of the backend, model, messages and sampling parameters."""

    def __init__(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(path.parent, os.W_OK) or (
                path.exists() and not os.access(path, os.W_OK)
            ):
                raise PermissionError(13, "permission denied")
        except (
            PermissionError
        ) as error:  # else SQLite says only "attempt to write a readonly database"
            raise PermissionError(
                f"Cannot write the LLM response cache {path}: {error.strerror or error}. "
                "Fix: make the data root writable by this user, or set llm.cache_dir to a "
                "writable folder ('' turns the cache off)."
            ) from None
        self.path = path
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db as db:
            db.execute(
                "PRAGMA journal_mode=WAL"
            )  # readers never block the one writer; other processes share it safely
            db.execute(
                "PRAGMA synchronous=NORMAL"
            )  # no fsync per answer: a crash of the app loses nothing, a power cut the last few
            db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, completion TEXT NOT NULL)"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _connect(self):
        """A transaction on the one connection, serialized: SQLite connections are not safe to share unguarded."""
        with self._lock, self._db:
            yield self._db

    @staticmethod
    def key(model_id: str, messages: list[dict], params: dict) -> str:
        payload = json.dumps(
            {"model": model_id, "messages": messages, "params": params},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> Completion | None:
        with self._connect() as db:
            row = db.execute("SELECT completion FROM responses WHERE key = ?", (key,)).fetchone()
        return Completion(**json.loads(row[0])) if row else None

    def put(self, key: str, completion: Completion) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, completion_json(completion))
            )

    def forget(self, key: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM responses WHERE key = ?", (key,))


class SharedResponseCache:
    """The response cache of a cluster: the same keys and answers as `ResponseCache`, in the table
    `llm_responses` of the coordination database, so no node asks what another already asked. One
    per process (`resources/engines.py`): every run in the process shares its session, which
    reconnects when dropped (`Session`) so one lost connection does not fail every later step."""

    def __init__(self, url: str):
        self._session = Session(url, on_connect=self._create_table)

    @staticmethod
    def _create_table(db) -> None:
        create_table(db, "llm_responses", "key TEXT PRIMARY KEY, completion TEXT NOT NULL")

    def close(self) -> None:
        self._session.close()

    def get(self, key: str) -> Completion | None:
        row = self._session.run(
            lambda db: db.execute(
                "SELECT completion FROM llm_responses WHERE key = %s", (key,)
            ).fetchone()
        )
        return Completion(**json.loads(row[0])) if row else None

    def put(self, key: str, completion: Completion) -> None:
        self._session.run(
            lambda db: db.execute(
                "INSERT INTO llm_responses VALUES (%s, %s) ON CONFLICT (key) "
                "DO UPDATE SET completion = EXCLUDED.completion",
                (key, completion_json(completion)),
            )
        )

    def forget(self, key: str) -> None:
        self._session.run(lambda db: db.execute("DELETE FROM llm_responses WHERE key = %s", (key,)))


def completion_json(completion: Completion) -> str:
    """How a response cache stores an answer: its fields as asdict gives them, without its deep copy."""
    return json.dumps(vars(completion), default=_plain_number)


def _plain_number(value):
    """A numpy scalar (a backend's logprob or count) as the Python number JSON writes; anything else is
    still an error."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


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
        out = {
            f"llm_{name}": getattr(self, name)
            for name in (
                "requests",
                "cache_hits",
                "failures",
                "retries",
                "prompt_tokens",
                "completion_tokens",
            )
        }
        if self.cost is not None:
            out["llm_cost"] = round(self.cost, 6)
        return out


class Slots:
    """At most `n` requests in flight to one endpoint from every process that shares its slots: a
    request holds one of `n` locks while it is sent. Concurrent Dagster runs then share the endpoint's
    concurrency instead of multiplying it; a killed process's slots come back (a file lock at once, a
    cluster's slot when its lease runs out).

    While every slot is held, one request of an event loop (a run's) asks for a slot again, backing off
    from 2 to 50 ms, and at once when this process frees one; its other requests wait behind it in turn.
    Each waiting request asking on its own cost 29 coordination queries per request at 32 in flight and
    kept freed slots idle (README: Scale out)."""

    def __init__(self):
        self._queues: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        """Per event loop: the turn to ask for a slot, and the signal that this loop freed one."""

    def _try_take(self) -> int | None:
        """A free slot, now locked by this process; None when every slot is held."""
        raise NotImplementedError

    def _release(self, slot: int) -> None:
        raise NotImplementedError

    async def _take(self) -> int | None:
        return self._try_take()

    async def _give_back(self, slot: int) -> None:
        self._release(slot)

    def _queue(self) -> tuple[asyncio.Lock, asyncio.Event]:
        loop = asyncio.get_running_loop()
        if loop not in self._queues:
            self._queues[loop] = (asyncio.Lock(), asyncio.Event())
        return self._queues[loop]

    @asynccontextmanager
    async def hold(self):
        turn, freed = self._queue()
        async with turn:
            wait = 0.002
            while (slot := await self._take()) is None:
                freed.clear()
                try:
                    await asyncio.wait_for(freed.wait(), wait)
                except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11 on
                    pass
                wait = min(0.05, wait * 2)
        try:
            yield
        finally:
            await self._give_back(slot)
            freed.set()


class EndpointSlots(Slots):
    """The slots of every process on one machine that shares the folder (all runs on one data root):
    `n` slot files, and a request holds an exclusive lock on one of them."""

    def __init__(self, folder: Path, n: int):
        super().__init__()
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = [folder / f"slot-{i:04d}.lock" for i in range(max(1, n))]

    def _try_take(self) -> int | None:
        import fcntl

        for path in random.sample(
            self.paths, len(self.paths)
        ):  # random order: processes rarely try the same slot
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        return None

    def _release(self, fd: int) -> None:
        os.close(fd)  # closing the only descriptor releases its lock


class SharedEndpointSlots(Slots):
    """The slots of every node of a cluster: `n` rows named after the endpoint in the table
    `llm_endpoint_slots` of the coordination database, each held by one request of one process under a
    lease that the process renews while the request is out. A slot is free only when the server says
    so: its holder released it, or its lease ran out (a killed process's slots come back after
    `lease_s`). A dropped session frees nothing, so the limit holds while a node reconnects; advisory
    locks of the session would have been freed by the server at once, for other nodes to take while
    this node's requests were still out. One per process, endpoint and limit (`resources/engines.py`):
    every run in the process shares it. Its queries block, so they run on a thread."""

    def __init__(self, url: str, name: str, n: int, lease_s: float = 15.0):
        super().__init__()
        self.keys = [advisory_key(f"{name} slot {i}") for i in range(max(1, n))]
        self.lease_s = lease_s
        self.holder = (
            f"autointerp process {os.getpid()} on {socket.gethostname()} {uuid.uuid4().hex[:8]}"
        )
        self._out: set[int] = set()
        """Slots this process's requests hold: renewed until released, never given to a second request."""
        self._lost: set[int] = set()
        """Slots of requests still out whose lease ran out and another process took: nothing more is
        sent until they end."""
        self._lock = threading.Lock()
        self._session = Session(url, on_connect=self._create_rows)
        self._closed = threading.Event()
        threading.Thread(
            target=self._renew_until_closed, name="endpoint slot leases", daemon=True
        ).start()

    def _create_rows(self, db) -> None:
        with db.transaction():  # nodes starting together would race to create the table
            db.execute(
                "SELECT pg_advisory_xact_lock(%s)", (advisory_key("llm_endpoint_slots table"),)
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS llm_endpoint_slots (slot BIGINT PRIMARY KEY, "
                "holder TEXT, lease_end TIMESTAMPTZ)"
            )
            db.execute(
                "INSERT INTO llm_endpoint_slots (slot) SELECT unnest(%s::bigint[]) ON CONFLICT DO NOTHING",
                (self.keys,),
            )

    def _try_take(self) -> int | None:
        with self._lock:
            if self._lost:
                return None
            free = [
                key for key in self.keys if key not in self._out
            ]  # ours until released, even where its lease ran out unnoticed
            row = self._session.run(
                lambda db: db.execute(
                    "UPDATE llm_endpoint_slots "
                    "SET holder = %s, lease_end = now() + make_interval(secs => %s) "
                    "WHERE slot = (SELECT slot FROM llm_endpoint_slots "
                    "WHERE slot = ANY(%s) AND (holder IS NULL OR lease_end < now()) "
                    "ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING slot",
                    (self.holder, self.lease_s, free),
                ).fetchone()
            )
            if row is not None:
                self._out.add(row[0])
            return row[0] if row else None

    def _release(self, key: int) -> None:
        with self._lock:
            self._out.discard(key)
            self._lost.discard(key)
            try:
                self._session.run(
                    lambda db: db.execute(
                        "UPDATE llm_endpoint_slots SET holder = NULL WHERE slot = %s AND holder = %s",
                        (key, self.holder),
                    )
                )
            except ConnectionError:
                pass  # no longer renewed: the server frees it when its lease runs out; the answer is not lost for it

    async def _take(self) -> int | None:
        return await asyncio.to_thread(self._try_take)

    async def _give_back(self, key: int) -> None:
        await asyncio.to_thread(self._release, key)

    def _renew_until_closed(self) -> None:
        while not self._closed.wait(self.lease_s / 5):
            with self._lock:
                out = list(self._out)
                if not out:
                    continue
                try:
                    kept = self._extend(out)
                except ConnectionError:
                    continue  # again at the next beat; the leases last a few beats
                self._lost |= set(out) - {key for (key,) in kept}

    def _extend(self, slots: list[int]) -> list[tuple]:
        """Renew the leases of `slots`; the rows of those still ours (one missing was lost to another holder)."""
        return self._session.run(
            lambda db: db.execute(
                "UPDATE llm_endpoint_slots SET lease_end = now() + make_interval(secs => %s) "
                "WHERE holder = %s AND slot = ANY(%s) RETURNING slot",
                (self.lease_s, self.holder, slots),
            ).fetchall()
        )

    def close(self) -> None:
        self._closed.set()
        self._session.close()


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
        description="Endpoint for backend 'openai', e.g. http://127.0.0.1:8000/v1 (vLLM) or https://openrouter.ai/api/v1.",
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
        default_cache_dir: Path | None = None,
        role: str | None = None,
        coordination_url: str = "",
    ) -> ProductionClient:
        """The production client of `role` (None: the `[llm]` settings alone). Its cache and endpoint
        slots are under `default_cache_dir` (the data root's), or in the database of `coordination_url`."""
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
        cache_dir = Path(chosen.cache_dir) if chosen.cache_dir else default_cache_dir
        cache = None
        if cache_dir is not None and chosen.cache_dir != "":
            if coordination_url:
                cache = engine(
                    "response cache",
                    (coordination_url,),
                    lambda: SharedResponseCache(coordination_url),
                )
            else:
                cache = ResponseCache(cache_dir / "responses.sqlite")
                self._opened_caches.append(
                    cache
                )  # closed at this resource's teardown, whichever role opened it
        ledger = Ledger(prices, chosen.max_requests, chosen.max_cost)
        slots = None
        if (
            chosen.backend == "openai" and default_cache_dir is not None
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
                    default_cache_dir
                    / "slots"
                    / hashlib.sha256(chosen.model_id().encode()).hexdigest()[:16],
                    chosen.concurrency(),
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
