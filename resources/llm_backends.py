"""The LLM backends behind `LLMClient`: embedded llama.cpp (in-process GGUF), any OpenAI-compatible
HTTP endpoint through the `openai` SDK (OpenAI, OpenRouter, vLLM's or llama.cpp's server), and vLLM
offline in-process (GPU only, optional extra `[vllm]`, imported lazily); with how each constrains
value-list answers and how an endpoint's errors are told apart (whole run, retry, this request)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from pathlib import Path
from typing import Literal

from resources.engines import engine
from resources.llm_protocol import Completion, LLMEndpointError, TransientLLMError
from resources.subject_model import embedded_gguf_path
from storage.content_identity import content_digest


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
