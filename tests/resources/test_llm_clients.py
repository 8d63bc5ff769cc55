"""Both LLM backends through the one async interface, against real processes on 127.0.0.1."""

import asyncio
import os
import subprocess
import sys
import time

import pytest

from autointerp_defs.ui import free_port
from resources.llm import LLMResource
from resources.llm_backends import OpenAICompatibleClient
from resources.llm_protocol import LLMEndpointError
from resources.subject_model import embedded_gguf_path
from storage.layout import DataRoot
from tests.conftest import in_session, open_engines
from tests.scripted_llm_server import ScriptedLLMServer

MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_openai_backend_sends_model_and_key(monkeypatch):
    monkeypatch.setenv("MY_TEST_KEY", "sk-test-123")
    with ScriptedLLMServer(lambda messages: "Explanation: greetings") as server:
        llm = LLMResource(
            backend="openai",
            base_url=server.base_url,
            model="my-model",
            api_key=os.environ["MY_TEST_KEY"],
        )
        client = llm.client()
        out = in_session(client, lambda: client.complete(MESSAGES, max_tokens=5))
    assert out.text == "Explanation: greetings" and out.prompt_tokens == 10
    assert server.requests[0]["model"] == "my-model" and server.requests[0]["max_tokens"] == 5
    assert (
        server.headers[0]["authorization"] == "Bearer sk-test-123"
    )  # leaks: see test_llm_production


def test_bounded_client_keeps_requests_in_flight_under_the_limit():
    in_flight, peak = 0, 0

    def reply(messages):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        time.sleep(0.05)
        in_flight -= 1
        return "ok"

    with ScriptedLLMServer(reply) as server:
        client = LLMResource(
            backend="openai", base_url=server.base_url, model="m", max_concurrency=3
        ).client()

        async def many():
            return await asyncio.gather(
                *(
                    client.complete([{"role": "user", "content": f"Say {i}."}], max_tokens=2)
                    for i in range(12)
                )
            )

        assert len(in_session(client, many)) == 12
    assert 1 < peak <= 3


def test_unreachable_endpoint_names_url_and_fix():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = LLMResource(backend="openai", base_url=url, model="m", timeout_s=2).client()
    with pytest.raises(
        LLMEndpointError, match=rf"Cannot reach the LLM endpoint at {url}.*Fix: start the server"
    ):
        in_session(
            client, lambda: client.complete(MESSAGES, max_tokens=2)
        )  # the session's check fails first


def test_embedded_llama_cpp_backend_answers():
    out = asyncio.run(LLMResource().client().complete(MESSAGES, max_tokens=8))
    assert out.text.strip() and out.completion_tokens > 0


def test_embedded_llama_cpp_simulation_answer_is_a_grammar_bound_list_with_aligned_logprobs():
    from assets.prompts import parse_int_list, simulation_messages
    from assets.scorers.simulation import expected_values
    from resources.llm_backends import LlamaCppClient

    tokens = [" The", " cat", " sat", " on", " the", " mat"]
    out = asyncio.run(
        LlamaCppClient().complete(
            simulation_messages("the word cat", tokens),
            max_tokens=40,
            int_list=(6, 0, 10),
            top_logprobs=5,
        )
    )
    values = parse_int_list(out.text, 6, 0, 10)
    assert values is not None, out.text  # the grammar holds the 135M model to the format
    assert "".join(out.tokens) == out.text and len(out.tokens) == len(out.top_logprobs)
    expected = expected_values(out, values)
    assert expected is not None and all(0 <= v <= 10 for v in expected)


def test_embedded_llama_cpp_answers_with_logprobs_go_into_the_response_cache(tmp_path):
    """Its logprobs are numpy float32, which the JSON response cache once refused on every answer."""
    from assets.prompts import simulation_messages

    messages = simulation_messages("the word cat", [" The", " cat", " sat"])
    client, fresh = (
        LLMResource().client(DataRoot(tmp_path)),
        LLMResource().client(DataRoot(tmp_path)),
    )
    first = in_session(
        client,
        lambda: client.complete(messages, max_tokens=20, int_list=(3, 0, 10), top_logprobs=5),
    )
    again = in_session(
        fresh, lambda: fresh.complete(messages, max_tokens=20, int_list=(3, 0, 10), top_logprobs=5)
    )
    assert (
        first.top_logprobs
        and again == first
        and fresh.ledger.requests == 0
        and fresh.ledger.cache_hits == 1
    )


LLAMA_SERVER = (
    "from resources.llm_backends import use_plain_cpu_buffers; use_plain_cpu_buffers(); "
    "import runpy; runpy.run_module('llama_cpp.server', run_name='__main__')"
)


def test_real_llama_cpp_server_through_the_openai_backend():
    """llama.cpp's own OpenAI-compatible server, serving the embedded GGUF on 127.0.0.1: plain answers, and
    value lists held to their JSON schema by the server (`structured_output='json_object'`)."""
    from assets.prompts import DETECTION_SYSTEM, parse_int_list, scorer_messages

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LLAMA_SERVER,
            "--model",
            str(embedded_gguf_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "1024",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = OpenAICompatibleClient(
            f"http://127.0.0.1:{port}/v1",
            "smollm2",
            None,
            timeout_s=60,
            structured_output="json_object",
        )
        judge = scorer_messages(
            DETECTION_SYSTEM,
            "the word cat",
            ["A cat sat.", "The river ran.", "My cat slept.", "Rain fell."],
        )

        async def wait_then_ask():
            deadline = time.time() + 60
            while True:
                try:
                    await client.check()
                    break
                except LLMEndpointError:
                    if time.time() > deadline or proc.poll() is not None:
                        raise
                    await asyncio.sleep(0.5)
            try:
                return await client.complete(MESSAGES, max_tokens=8), await client.complete(
                    judge, max_tokens=40, int_list=(4, 0, 1)
                )
            finally:
                await client.aclose()

        async def with_json_schema():  # what OpenAI and vLLM take; this server answers 500 naming response_format
            schema_client = OpenAICompatibleClient(
                client.base_url, "smollm2", None, timeout_s=60, structured_output="json_schema"
            )
            try:
                return await schema_client.complete(judge, max_tokens=40, int_list=(4, 0, 1))
            finally:
                await schema_client.aclose()

        out, listed = asyncio.run(wait_then_ask())
        with pytest.raises(
            LLMEndpointError,
            match=r"HTTP 500 .*does not accept structured output 'json_schema'\. "
            r"Fix: set `llm\.structured_output` to 'json_object'",
        ):
            asyncio.run(with_json_schema())
        assert out.text.strip() and out.completion_tokens > 0
        assert parse_int_list(listed.text, 4, 0, 1) is not None, (
            listed.text
        )  # the 135M model kept to the schema
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_gguf_replaced_at_the_same_path_is_asked_not_answered_from_the_old_ones_cache(tmp_path):
    """The response cache names an embedded model by its content, as the results do: a GGUF replaced at the
    same path (another quantization, a fine-tune) re-runs the assets that name it, and answers their prompts
    itself instead of handing back what the file it replaced said."""

    original = embedded_gguf_path().read_bytes()
    path = tmp_path / "model.gguf"
    path.write_bytes(original)

    def ask():
        resource = LLMResource(
            backend="embedded", model=str(path), n_ctx=512, cache_dir=str(tmp_path / "cache")
        )
        client = resource.client()
        asyncio.run(client.complete(MESSAGES, max_tokens=4))
        return resource.identity(), client.ledger

    first_identity, first = ask()
    same_identity, again = ask()
    assert (
        first.requests == 1
        and (again.requests, again.cache_hits) == (0, 1)
        and same_identity == first_identity
    )
    at = original.index(b"Smollm2 135M")  # general.name in the header: another file, as loadable
    replacement = tmp_path / "replacement.gguf"
    replacement.write_bytes(original[:at] + b"Smollm2 136M" + original[at + 12 :])
    os.replace(replacement, path)
    identity, after = ask()
    assert identity != first_identity and (after.requests, after.cache_hits) == (1, 0)
    assert (
        len({key[2] for key in open_engines() if key[:2] == ("llama.cpp", str(path))}) == 2
    )  # the new file was loaded, not the old one's engine kept
