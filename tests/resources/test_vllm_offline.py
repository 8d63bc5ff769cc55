"""The vLLM offline backend's adapter, against a stand-in for the edge we do not own.

vLLM needs a GPU, which CI and this workplace lack, so `vllm` here is a small stand-in module with
the interface vLLM documents for offline use: `LLM(model=...)`, `LLM.chat(conversations,
sampling_params, use_tqdm=...)` returning one `RequestOutput` per conversation (`prompt_token_ids`,
`outputs[0]` with `text`, `token_ids` and `logprobs`: per generated token a dict token id → `Logprob`
with `logprob`, `rank` and `decoded_token`, which always holds the sampled token), and
`SamplingParams(max_tokens, temperature, logprobs, seed)`. What is tested is ours: the lazy import,
gathering concurrent requests into batches, and turning vLLM's outputs into `Completion`s.
"""

import asyncio
import sys
import types
from dataclasses import dataclass

import pytest

from resources.llm import LLMResource
from storage.layout import DataRoot


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class SamplingParams:
    def __init__(
        self, max_tokens=16, temperature=1.0, logprobs=None, seed=None, structured_outputs=None
    ):
        self.max_tokens, self.temperature, self.logprobs, self.seed = (
            max_tokens,
            temperature,
            logprobs,
            seed,
        )
        self.structured_outputs = structured_outputs


@dataclass
class StructuredOutputsParams:
    json: dict | None = None


class LLM:
    """Answers each conversation with its last message reversed, as two tokens, with top alternatives."""

    def __init__(self, model, **engine_args):
        self.model, self.engine_args = model, engine_args
        self.batches: list[int] = []
        self.params: list[SamplingParams] = []
        self.asked: dict[str, SamplingParams] = {}
        """Each conversation's last message → the sampling parameters it came with."""

    def chat(self, messages, sampling_params=None, use_tqdm=True):
        assert isinstance(messages[0], list), "offline batches are lists of conversations"
        self.batches.append(len(messages))
        self.params.extend(sampling_params)
        self.asked.update(
            (conversation[-1]["content"], params)
            for conversation, params in zip(messages, sampling_params, strict=False)
        )
        outputs = []
        for conversation, params in zip(messages, sampling_params, strict=False):
            word = conversation[-1]["content"][::-1]
            steps = None
            if params.logprobs:
                # the sampled token (ids 11, 12) and, ranked first at the second step, a different alternative
                steps = [
                    {11: Logprob(-0.1, 1, word[:2]), 90: Logprob(-2.4, 2, "zz")},
                    {91: Logprob(-0.3, 1, "yy"), 12: Logprob(-1.5, 2, word[2:])},
                ]
            first = types.SimpleNamespace(text=word, token_ids=[11, 12], logprobs=steps)
            outputs.append(
                types.SimpleNamespace(
                    prompt_token_ids=list(range(len(conversation[-1]["content"]))), outputs=[first]
                )
            )
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    import resources.engines

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(
        resources.engines, "_ENGINES", {}
    )  # engines live for the process: start each test without one
    return module


def test_without_vllm_the_backend_names_the_extra(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "vllm", None
    )  # as on a machine without the extra: import fails
    with pytest.raises(RuntimeError, match=r"pip install 'autointerp\[vllm\]'"):
        LLMResource(backend="vllm", model="HuggingFaceTB/SmolLM2-135M-Instruct").client()


def test_concurrent_requests_become_one_batch_with_logprobs_and_tokens(fake_vllm, tmp_path):
    client = LLMResource(
        backend="vllm",
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        vllm_engine_args={"gpu_memory_utilization": 0.8},
    ).client(DataRoot(tmp_path))
    engine = client.inner._engine
    assert engine.model == "HuggingFaceTB/SmolLM2-135M-Instruct" and engine.engine_args == {
        "gpu_memory_utilization": 0.8
    }
    words = [f"word{i:02d}" for i in range(40)]

    async def ask_all():
        async with client.session():
            return await asyncio.gather(
                *(
                    client.complete(
                        [{"role": "user", "content": w}], max_tokens=5, top_logprobs=2, seed=i
                    )
                    for i, w in enumerate(words)
                )
            )

    answers = asyncio.run(ask_all())
    assert engine.batches == [40]  # gathered into one `chat` call, not 40
    assert [a.text for a in answers] == [
        w[::-1] for w in words
    ]  # each answer went back to its own request
    first = answers[0]
    assert first.prompt_tokens == len(words[0]) and first.completion_tokens == 2
    assert first.tokens == [
        words[0][::-1][:2],
        words[0][::-1][2:],
    ]  # the sampled tokens, not the top-ranked ones
    assert first.top_logprobs == [
        {words[0][::-1][:2]: -0.1, "zz": -2.4},
        {"yy": -0.3, words[0][::-1][2:]: -1.5},
    ]
    # each request's own parameters reached the engine beside its own conversation (in the order the requests got
    # past the response cache, which is looked up on a thread: not always the order they were made in)
    assert {word: params.seed for word, params in engine.asked.items()} == {
        w: i for i, w in enumerate(words)
    }
    assert {p.max_tokens for p in engine.params} == {5}
    assert client.ledger.requests == 40

    again = LLMResource(backend="vllm", model="HuggingFaceTB/SmolLM2-135M-Instruct").client(
        DataRoot(tmp_path)
    )
    repeated = asyncio.run(
        again.complete(
            [{"role": "user", "content": words[3]}], max_tokens=5, top_logprobs=2, seed=3
        )
    )
    assert (
        repeated.text == words[3][::-1]
        and again.ledger.requests == 0
        and again.ledger.cache_hits == 1
    )


def test_batches_are_capped(fake_vllm):
    from resources.llm_backends import VLLMOfflineClient

    client = VLLMOfflineClient("m", max_batch=16)

    async def ask_all():
        return await asyncio.gather(
            *(
                client.complete([{"role": "user", "content": str(i)}], max_tokens=2)
                for i in range(40)
            )
        )

    answers = asyncio.run(ask_all())
    assert client._engine.batches == [16, 16, 8] and [a.text for a in answers] == [
        str(i)[::-1] for i in range(40)
    ]
    assert all(
        a.top_logprobs == [] and a.tokens == [] for a in answers
    )  # none asked for, none made up


def test_one_engine_serves_the_whole_process(fake_vllm):
    made = []
    fake_vllm.LLM = type(
        "CountingLLM",
        (LLM,),
        {
            "__init__": lambda self, model, **args: (
                made.append(model),
                LLM.__init__(self, model, **args),
            )[-1]
        },
    )
    first = LLMResource(
        backend="vllm", model="m", vllm_engine_args={"max_model_len": 2048}
    ).client()
    second = LLMResource(
        backend="vllm", model="m", vllm_engine_args={"max_model_len": 2048}
    ).client()
    assert first.inner._engine is second.inner._engine and made == ["m"]
    assert first.context_window == 2048  # prompts are cut to the engine's context


def test_an_engine_error_fails_every_pending_request_with_it(fake_vllm):
    class BrokenLLM(LLM):
        def chat(self, messages, sampling_params=None, use_tqdm=True):
            raise RuntimeError("CUDA error: out of memory")

    fake_vllm.LLM = BrokenLLM
    client = LLMResource(
        backend="vllm", model="m", max_concurrency=4
    ).client()  # batches of 4: 10 requests wait in line

    async def ask_all():
        jobs = [
            client.complete([{"role": "user", "content": str(i)}], max_tokens=2) for i in range(10)
        ]
        return await asyncio.wait_for(
            asyncio.gather(*jobs, return_exceptions=True), timeout=10
        )  # none may hang

    results = asyncio.run(ask_all())
    assert len(results) == 10 and all(
        isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results
    )


def test_value_lists_use_vllms_structured_outputs(fake_vllm):
    fake_vllm.sampling_params = types.SimpleNamespace(
        StructuredOutputsParams=StructuredOutputsParams
    )
    client = LLMResource(backend="vllm", model="m").client()
    asyncio.run(
        client.complete([{"role": "user", "content": "judge"}], max_tokens=20, int_list=(3, 0, 1))
    )
    params = client.inner._engine.params[-1]
    schema = params.structured_outputs.json["properties"]["values"]
    assert schema["minItems"] == schema["maxItems"] == 3 and schema["items"]["enum"] == [0, 1]
