"""Whole-run errors of a remote endpoint stop the run at once, before anything is written, naming the fix.

A wrong key, a model the endpoint does not serve, an unpaid account or a request format it rejects
concern every latent alike: the run must fail after at most one request, mark no latent failed and
leave the previous materialization exactly as it was.
"""

import asyncio
import socket
import threading

import pytest
from dagster import DagsterInstance, materialize

from autointerp_defs.ui import free_port
from resources.llm import LLMResource
from resources.llm_protocol import LLMEndpointError
from tests.conftest import (
    TINY_CODER,
    add_coders,
    all_assets,
    in_session,
    make_resources,
    pipeline_until_exemplars,
)
from tests.scripted_llm_server import ScriptedLLMServer, good_answers

ALL_ASSETS = all_assets()

PARTITION = f"{TINY_CODER}|00"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def llm(server, **kwargs):
    return LLMResource(
        backend="openai",
        base_url=server.base_url,
        model="gpt-wrong",
        api_key="sk-not-valid",
        key_setting="OPENAI_API_KEY",
        model_setting="AUTOINTERP_LLM_MODEL",
        **kwargs,
    )


# (case, server's /models status, chat reply, asset, what the error must say, chat requests at most)
CASES = [
    (
        "key rejected everywhere",
        401,
        lambda m: 401,
        "explanations",
        r"rejects the API key\. Fix: put a valid key in OPENAI_API_KEY",
        0,
    ),
    (
        "key rejected on chat",
        200,
        lambda m: (401, {}, "Incorrect API key provided"),
        "explanations",
        r"HTTP 401 \(Incorrect API key.*Fix: put a valid key in OPENAI_API_KEY",
        1,
    ),
    (
        "model not served",
        200,
        lambda m: (404, {}, "The model `gpt-wrong` does not exist."),
        "explanations",
        r"does not serve the model 'gpt-wrong'\. It lists: scripted\. Fix: set AUTOINTERP_LLM_MODEL",
        1,
    ),
    (
        "model id invalid (OpenRouter)",
        200,
        lambda m: (400, {}, "gpt-wrong is not a valid model ID"),
        "scores/detection",
        r"does not serve the model 'gpt-wrong'",
        1,
    ),
    (
        "account unpaid",
        200,
        lambda m: (402, {}, "Insufficient credits"),
        "scores/detection",
        r"cannot pay.*Fix: add credit",
        1,
    ),
    (
        "structured output rejected",
        200,
        lambda m: (400, {}, "response_format of type json_schema is not supported"),
        "scores/detection",
        r"does not accept structured output 'json_schema'\. Fix: set `llm\.structured_output`",
        1,
    ),
]


def finished(registered, selection: list[str]):
    """An instance whose partition has `selection` materialized from a well-behaved endpoint, and
    that endpoint's requests."""
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    with ScriptedLLMServer(good_answers) as server:
        resources = make_resources(registered, max_latents=3, llm=llm(server))
        assert materialize(
            ALL_ASSETS,
            selection=selection,
            partition_key=PARTITION,
            resources=resources,
            instance=instance,
        ).success
    return instance, server.requests


def test_whole_run_errors_fail_before_writing_and_keep_the_previous_results(registered):
    instance, requests = finished(registered, ["explanations", "scores/detection"])
    assert not any(
        "<|" in m["content"] for r in requests for m in r["messages"]
    )  # no control token reaches a prompt
    written = {
        name: path.read_bytes()
        for name, path in {
            "explanations": registered / "explanations" / TINY_CODER / "00.parquet",
            "scores/detection": registered / "scores" / TINY_CODER / "00" / "detection.parquet",
        }.items()
    }
    for case, models_status, reply, asset, message, most in CASES:
        with ScriptedLLMServer(reply, models_status=models_status) as server:
            resources = make_resources(registered, max_latents=3, llm=llm(server, cache_dir=""))
            with pytest.raises(Exception, match=message):
                materialize(
                    ALL_ASSETS,
                    selection=[asset],
                    partition_key=PARTITION,
                    resources=resources,
                    instance=instance,
                    raise_on_error=True,
                )
        assert len(server.requests) <= most, case
        for name, content in written.items():
            path = (
                registered / ("explanations" if name == "explanations" else "scores") / TINY_CODER
            )
            path = (
                path / "00.parquet" if name == "explanations" else path / "00" / "detection.parquet"
            )
            assert path.read_bytes() == content, f"{case}: {name} was rewritten"


def test_a_whole_run_error_fails_every_waiting_request_without_sending_it():
    with ScriptedLLMServer(lambda m: (401, {}, "invalid key"), delay_s=0.2) as server:
        client = LLMResource(
            backend="openai",
            base_url=server.base_url,
            model="m",
            api_key="sk-revoked",
            max_concurrency=8,
        ).client()

        async def many():
            return await asyncio.gather(
                *(
                    client.complete([{"role": "user", "content": str(i)}], max_tokens=2)
                    for i in range(20)
                ),
                return_exceptions=True,
            )

        results = in_session(client, many)
    assert len(server.requests) == 1
    assert all(isinstance(r, LLMEndpointError) and "rejects the API key" in str(r) for r in results)


def test_a_refusing_host_is_called_refused_and_is_not_retried():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = LLMResource(backend="openai", base_url=url, model="m", timeout_s=5).client()
    with pytest.raises(LLMEndpointError, match=r"connection refused") as error:
        in_session(client, lambda: client.complete(MESSAGES, max_tokens=2))
    assert "timed out" not in str(error.value) and client.ledger.retries == 0


def test_a_silent_host_is_called_timed_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():  # take connections and never answer
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        client = LLMResource(backend="openai", base_url=url, model="m", timeout_s=0.5).client()
        with pytest.raises(LLMEndpointError, match=r"timed out after 0\.5 s") as error:
            in_session(client, lambda: client.complete(MESSAGES, max_tokens=2))
        assert "refused" not in str(error.value)
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


def test_a_run_in_which_every_latent_failed_fails_and_keeps_the_finished_table(registered):
    """Not a whole-run error, yet nothing to show: every answer unreadable, even when asked again."""
    instance, _ = finished(registered, ["explanations"])
    path = registered / "explanations" / TINY_CODER / "00.parquet"
    before = path.read_bytes()
    with ScriptedLLMServer(lambda m: "Hmm.\nThese are hard to tell apart.") as server:
        resources = make_resources(registered, max_latents=3, llm=llm(server, cache_dir=""))
        with pytest.raises(
            Exception,
            match=r"explanations: all 3 latents failed, so nothing was written and the previous "
            r"results are kept\. Most common reasons: 3× unreadable answer",
        ):
            materialize(
                ALL_ASSETS,
                selection=["explanations"],
                partition_key=PARTITION,
                resources=resources,
                instance=instance,
                raise_on_error=True,
            )
    assert (
        len(server.requests) == 6 and path.read_bytes() == before
    )  # each latent asked twice, then given up


def test_scores_refuse_explanations_written_from_other_exemplars(registered):
    from tests.conftest import TINY_EXEMPLARS_CONFIG

    instance, _ = finished(registered, ["explanations", "scores/detection"])
    with ScriptedLLMServer(good_answers) as server:
        resources = make_resources(registered, max_latents=3, llm=llm(server))
        reseeded = {"ops": {"exemplars": {"config": {**TINY_EXEMPLARS_CONFIG, "seed": 1}}}}
        assert materialize(
            ALL_ASSETS,
            selection=["exemplars"],
            partition_key=PARTITION,
            resources=resources,
            instance=instance,
            run_config=reseeded,
        ).success
        with pytest.raises(
            Exception,
            match=r"explanations of .* shard 00 were written from other exemplars \(\w+\) than those "
            r"there now \(\w+\).*Fix: re-materialize `explanations`",
        ):
            materialize(
                ALL_ASSETS,
                selection=["scores/detection"],
                partition_key=PARTITION,
                resources=resources,
                instance=instance,
                raise_on_error=True,
            )
        assert materialize(
            ALL_ASSETS,
            selection=["explanations", "scores/detection"],
            partition_key=PARTITION,
            resources=resources,
            instance=instance,
        ).success
