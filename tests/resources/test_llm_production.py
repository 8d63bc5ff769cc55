"""The production client around any backend: retries, cache, budget, cost, failures, secrets."""

import asyncio
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance, EnvVar, materialize

from resources.llm import (
    BUDGET_STOPPED,
    REQUEST_FAILED,
    UNREADABLE,
    LLMResource,
    Refusal,
    stopped_by_budget,
)
from resources.llm_accounting import BudgetExceeded
from resources.llm_backends import completion_from_json
from resources.llm_protocol import Completion, LLMEndpointError
from resources.response_cache import ResponseCache
from storage.layout import DataRoot
from tests.conftest import (
    TINY_CODER,
    add_coders,
    all_assets,
    in_session,
    make_resources,
    pipeline_until_exemplars,
)
from tests.conftest import llm_resource as resource
from tests.scripted_llm_server import Fault, ScriptedLLMServer

ALL_ASSETS = all_assets()

MESSAGES = [{"role": "user", "content": "Say hello."}]


def scripted(statuses):
    """Reply with the given statuses in turn, then 'ok'."""
    queue = list(statuses)
    return lambda messages: queue.pop(0) if queue else "ok"


@pytest.mark.parametrize("statuses", [[429, 429], [500, 503], [502]])
def test_rate_limits_and_server_errors_are_retried_with_backoff(statuses):
    with ScriptedLLMServer(scripted(statuses)) as server:
        client = resource(server).client()
        client.backoff_s = 0.01
        out = in_session(client, lambda: client.complete(MESSAGES, max_tokens=2))
    assert out.text == "ok" and len(server.requests) == len(statuses) + 1
    assert client.ledger.retries == len(statuses) and client.ledger.requests == 1


@pytest.mark.parametrize("header", [{"Retry-After": "1"}, {"retry-after-ms": "1000"}])
def test_rate_limit_waits_as_long_as_the_server_asks(header):
    with ScriptedLLMServer(scripted([(429, header)])) as server:
        client = resource(server).client()
        client.backoff_s = 0.01  # our own backoff alone would retry after ~10 ms
        out = in_session(client, lambda: client.complete(MESSAGES, max_tokens=2))
    assert out.text == "ok" and len(server.requests) == 2 and client.ledger.retries == 1
    assert 1.0 <= server.arrivals[1] - server.arrivals[0] < 3.0


@pytest.mark.parametrize(
    "fault", [Fault("reset"), Fault("truncated"), Fault("not_json"), Fault("stall", 1.0)]
)
def test_broken_transports_are_retried(fault):
    with ScriptedLLMServer(scripted([fault])) as server:
        client = resource(server, timeout_s=0.5).client()
        client.backoff_s = 0.01
        out = in_session(client, lambda: client.complete(MESSAGES, max_tokens=2))
    assert out.text == "ok" and len(server.requests) == 2 and client.ledger.retries == 1


def test_identical_requests_in_flight_are_sent_once():
    with ScriptedLLMServer(lambda m: "ok", delay_s=0.2) as server:
        client = resource(server).client()

        async def both():
            return await asyncio.gather(
                client.complete(MESSAGES, max_tokens=2),
                client.complete(MESSAGES, max_tokens=2),
                client.complete(MESSAGES, max_tokens=3),
            )

        answers = in_session(client, both)
    assert [a.text for a in answers] == ["ok"] * 3
    assert (
        len(server.requests) == 2 and client.ledger.requests == 2 and client.ledger.cache_hits == 1
    )  # max_tokens 3 is another request


def test_other_client_errors_are_not_retried():
    import openai

    with ScriptedLLMServer(scripted([400])) as server:
        client = resource(server).client()
        with pytest.raises(openai.BadRequestError):
            in_session(client, lambda: client.complete(MESSAGES, max_tokens=2))
    assert len(server.requests) == 1 and client.ledger.failures == 1


def test_timeouts_are_retried():
    calls = []

    def slow_first(messages):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return "ok"

    with ScriptedLLMServer(slow_first) as server:
        client = resource(server, timeout_s=0.3).client()
        client.backoff_s = 0.01
        assert in_session(client, lambda: client.complete(MESSAGES, max_tokens=2)).text == "ok"
    assert client.ledger.retries == 1 and len(calls) == 2


def test_gives_up_after_max_attempts():
    from resources.llm_protocol import TransientLLMError

    with ScriptedLLMServer(lambda m: 503) as server:
        client = resource(server, max_attempts=3).client()
        client.backoff_s = 0.01
        with pytest.raises(TransientLLMError):
            in_session(client, lambda: client.complete(MESSAGES, max_tokens=2))
    assert len(server.requests) == 3 and client.ledger.failures == 1


def test_response_cache_is_content_addressed(tmp_path):
    with ScriptedLLMServer(lambda m: "cached answer") as server:

        async def run(client):
            first = await client.complete(MESSAGES, max_tokens=5)
            again = await client.complete(MESSAGES, max_tokens=5)
            other = await client.complete(MESSAGES, max_tokens=6)
            return first, again, other

        root = DataRoot(tmp_path)
        client = resource(server).client(root)
        first, again, other = in_session(client, lambda: run(client))
        fresh = resource(server).client(root)  # a later materialization, same cache on disk
        in_session(fresh, lambda: fresh.complete(MESSAGES, max_tokens=5))
    assert first.text == again.text == "cached answer"
    assert (
        len(server.requests) == 2 and client.ledger.cache_hits == 1 and fresh.ledger.requests == 0
    )


def test_a_client_keeps_its_cache_and_endpoint_slots_where_the_data_roots_layout_says(tmp_path):
    root = DataRoot(tmp_path)
    llm = LLMResource(backend="openai", base_url="http://127.0.0.1:9/v1", model="m")
    client = llm.client(root)
    assert client.cache.path == root.response_cache_path and root.response_cache_path.exists()
    assert {path.parent for path in client._slots.paths} == {
        root.endpoint_slots_dir(llm.model_id())
    }
    assert root.endpoint_slots_dir(llm.model_id()).is_dir()
    elsewhere = LLMResource(
        backend="openai",
        base_url="http://127.0.0.1:9/v1",
        model="m",
        cache_dir=str(tmp_path / "mine"),
    ).client(root)
    assert elsewhere.cache.path == tmp_path / "mine" / "responses.sqlite"
    for opened in (client, elsewhere):
        opened.cache.close()


def test_an_answer_with_numpy_logprobs_round_trips_through_the_response_cache(tmp_path):
    """llama-cpp-python gives logprobs as numpy float32 (and the cache writes JSON): they become floats."""

    def step(token, *alternatives):
        return {
            "token": token,
            "logprob": alternatives[0][1],
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alternatives],
        }

    answer = {
        "choices": [
            {
                "message": {"content": "[5]"},
                "logprobs": {
                    "content": [
                        step("[", ("[", np.float32(0.0))),
                        step("5", ("5", np.float32(-0.25)), ("6", np.float32(-1.5))),
                        step("]", ("]", np.float32(-0.125))),
                    ]
                },
            }
        ],
        "usage": {"prompt_tokens": np.int64(12), "completion_tokens": 3},
    }
    completion = completion_from_json(answer)
    assert (
        completion.top_logprobs[1] == {"5": -0.25, "6": -1.5}
        and type(completion.top_logprobs[1]["6"]) is float
    )
    cache = ResponseCache(tmp_path / "responses.sqlite")
    cache.put("answer", completion)
    assert cache.get("answer") == completion and completion.prompt_tokens == 12
    cache.put(
        "numpy", Completion("[5]", top_logprobs=[{"5": np.float32(-0.25)}], tokens=["5"])
    )  # whatever a backend left numpy
    assert cache.get("numpy").top_logprobs == [{"5": -0.25}]


def test_budget_stops_sending_and_cost_is_counted():
    with ScriptedLLMServer(lambda m: "ok") as server:
        client = resource(
            server, max_requests=3, prompt_price_per_million=2.0, completion_price_per_million=10.0
        ).client()

        async def many():
            return await asyncio.gather(
                *(
                    client.complete([{"role": "user", "content": str(i)}], max_tokens=2)
                    for i in range(5)
                ),
                return_exceptions=True,
            )

        results = in_session(client, many)
    assert len(server.requests) == 3 and sum(isinstance(r, BudgetExceeded) for r in results) == 2
    assert client.ledger.cost == pytest.approx((3 * 10 * 2.0 + 3 * 3 * 10.0) / 1e6)
    assert client.ledger.as_metadata()["llm_cost"] > 0


def number(text: str):
    """A reader for `ProductionClient.ask`: an integer, or why not."""
    return int(text) if text.strip().isdigit() else Refusal("not a number")


REASK = {"role": "user", "content": "A number, please."}


def test_a_lost_question_says_why_in_one_format_with_the_answers_and_the_readers_reasons():
    with ScriptedLLMServer(lambda m: "Hmm" if m[-1] != REASK else "maybe 3") as server:
        client = resource(server, cache_dir="").client()
        unreadable = in_session(client, lambda: client.ask(MESSAGES, number, REASK, max_tokens=4))
    assert (
        unreadable.value is None and len(unreadable.answers) == 2 and unreadable.prompt_tokens > 0
    )
    assert unreadable.failure == f"{UNREADABLE}: 'Hmm' (not a number) then 'maybe 3' (not a number)"

    with ScriptedLLMServer(lambda m: "Hmm") as server:
        client = resource(server, max_requests=1, cache_dir="").client()
        stopped = in_session(client, lambda: client.ask(MESSAGES, number, REASK, max_tokens=4))
    assert (
        stopped.failure
        == f"{BUDGET_STOPPED}: request budget of 1 reached, after 'Hmm' (not a number)"
        and stopped_by_budget(stopped.failure)
    )

    with ScriptedLLMServer(scripted([400])) as server:
        client = resource(server, cache_dir="").client()
        failed = in_session(client, lambda: client.ask(MESSAGES, number, REASK, max_tokens=4))
    assert (
        failed.failure.startswith(f"{REQUEST_FAILED}: BadRequestError: ")
        and not stopped_by_budget(failed.failure)
        and failed.answers == []
    )

    with ScriptedLLMServer(lambda m: "7") as server:
        client = resource(server, cache_dir="").client()
        read = in_session(client, lambda: client.ask(MESSAGES, number, REASK, max_tokens=4))
    assert read.value == 7 and read.failure == "" and read.answer.text == "7"


def test_a_question_answered_on_its_follow_up_is_answered_from_the_cache_next_time(tmp_path):
    """The refused first answer stays cached while the question is open: the follow-up's key holds it."""
    with ScriptedLLMServer(lambda m: "7" if m[-1] == REASK else "Hmm") as server:
        first = resource(server).client(DataRoot(tmp_path))
        asked = in_session(first, lambda: first.ask(MESSAGES, number, REASK, max_tokens=4))
        again = resource(server).client(DataRoot(tmp_path))
        replayed = in_session(again, lambda: again.ask(MESSAGES, number, REASK, max_tokens=4))
    assert asked.value == replayed.value == 7 and len(server.requests) == 2
    assert again.ledger.requests == 0 and [a.text for a in replayed.answers] == ["Hmm", "7"]


def test_a_lost_question_is_asked_afresh_next_time(tmp_path):
    """Unreadable twice, or cut short by the budget after a refused answer: no turn of it is kept in the cache."""
    with ScriptedLLMServer(lambda m: "maybe 3" if m[-1] == REASK else "Hmm") as server:
        for _ in range(2):
            client = resource(server).client(DataRoot(tmp_path))
            lost = in_session(
                client, lambda client=client: client.ask(MESSAGES, number, REASK, max_tokens=4)
            )
            assert lost.failure.startswith(UNREADABLE) and client.ledger.requests == 2
    with ScriptedLLMServer(lambda m: "7" if m[-1] == REASK else "Hmm") as server:
        stopped = resource(server, max_requests=1).client(DataRoot(tmp_path / "budget"))
        lost = in_session(stopped, lambda: stopped.ask(MESSAGES, number, REASK, max_tokens=4))
        again = resource(server).client(DataRoot(tmp_path / "budget"))
        read = in_session(again, lambda: again.ask(MESSAGES, number, REASK, max_tokens=4))
    assert stopped_by_budget(lost.failure) and read.value == 7 and again.ledger.requests == 2


def test_a_whole_run_error_is_raised_not_stored_as_a_lost_question():
    with ScriptedLLMServer(scripted([401])) as server:
        client = resource(server, cache_dir="").client()
        with pytest.raises(LLMEndpointError, match="API key"):
            in_session(client, lambda: client.ask(MESSAGES, number, REASK, max_tokens=4))


def test_malformed_answers_are_asked_again_once_then_fail_the_latent_not_the_partition_and_are_retried_next_time(
    registered,
):
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    # latent 2 answers nothing, then an unfinished reasoning when asked again: it fails with both raw answers
    answers = iter(
        ["Explanation: the word table", "", "Explanation: commas", "Explanation: numbers"]
    )
    with ScriptedLLMServer(
        lambda m: "<think>unfinished" if "could not be read" in m[-1]["content"] else next(answers)
    ) as server:
        resources = make_resources(
            registered, max_latents=3, llm=resource(server, max_concurrency=1)
        )
        first = materialize(
            ALL_ASSETS,
            selection=["explanations"],
            partition_key=f"{TINY_CODER}|00",
            resources=resources,
            instance=instance,
        )
        frame = pd.read_parquet(Path(registered) / "explanations" / TINY_CODER / "00.parquet")
        assert (
            list(frame.status) == ["ok", "failed", "ok"]
            and "unreadable" in frame.error[1]
            and "<think>unfinished" in frame.error[1]
        )
        # the re-ask, whichever of it and latent 3's question got the one slot first
        (reask,) = [
            r["messages"]
            for r in server.requests
            if "could not be read" in r["messages"][-1]["content"]
        ]
        assert reask[:-2] == server.requests[1]["messages"] and reask[-2] == {
            "role": "assistant",
            "content": "",
        }
        assert "could not be read" in reask[-1]["content"]
        second = materialize(
            ALL_ASSETS,
            selection=["explanations"],
            partition_key=f"{TINY_CODER}|00",
            resources=resources,
            instance=instance,
        )
        frame = pd.read_parquet(Path(registered) / "explanations" / TINY_CODER / "00.parquet")
    assert (
        first.success and second.success and len(server.requests) == 5
    )  # only the failed latent was asked again
    assert list(frame.status) == ["ok", "ok", "ok"] and frame.explanation[1] == "numbers"
    meta = second.asset_materializations_for_node("explanations")[0].metadata
    assert meta["llm_requests"].value == 1 and meta["llm_cache_hits"].value == 2


@pytest.mark.parametrize(
    "explainer, marker",
    [
        ("contrastive", "Counter-example 1:"),
        ("token_table", "\t"),
        ("top_tokens", "average strength"),
    ],
)
def test_every_explainer_and_best_of_n(registered, explainer, marker):
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    replies = iter([f"Explanation: candidate {i}" for i in range(100)])
    with ScriptedLLMServer(lambda m: next(replies)) as server:
        resources = make_resources(registered, max_latents=2, llm=resource(server))
        config = {"ops": {"explanations": {"config": {"explainer": explainer, "best_of_n": 3}}}}
        assert materialize(
            ALL_ASSETS,
            selection=["explanations"],
            partition_key=f"{TINY_CODER}|00",
            resources=resources,
            instance=instance,
            run_config=config,
        ).success
    assert len(server.requests) == 6 and all(
        marker in r["messages"][-1]["content"] for r in server.requests
    )
    assert {r["seed"] for r in server.requests} == {0, 1, 2}
    frame = pd.read_parquet(Path(registered) / "explanations" / TINY_CODER / "00.parquet")
    for row in frame.itertuples():
        assert len(row.candidates) == 3 and len(row.candidate_scores) == 3
        assert row.explanation == row.candidates[int(pd.Series(row.candidate_scores).idxmax())]


def test_api_key_never_reaches_metadata_logs_or_files(registered, tmp_path, monkeypatch, caplog):
    secret = "sk-autointerp-test-0123456789"
    monkeypatch.setenv("AUTOINTERP_TEST_SECRET", secret)
    home = tmp_path / "dagster_home"
    home.mkdir()
    with DagsterInstance.local_temp(str(home)) as instance:
        add_coders(instance, registered, TINY_CODER)
        pipeline_until_exemplars(registered, instance)

        def judge(messages):
            user = messages[-1]["content"]
            return (
                str([i % 2 for i in range(user.count("\nExample "))])
                if "Description" in user
                else "Explanation: x"
            )

        with ScriptedLLMServer(judge) as server:
            llm = LLMResource(
                backend="openai",
                base_url=server.base_url,
                model="m",
                api_key=EnvVar("AUTOINTERP_TEST_SECRET"),
            )
            resources = make_resources(registered, max_latents=2, llm=llm)
            result = materialize(
                ALL_ASSETS,
                selection=["explanations", "scores/detection", "scores/fuzzing"],
                partition_key=f"{TINY_CODER}|00",
                resources=resources,
                instance=instance,
            )
        assert result.success
        assert server.headers[0]["authorization"] == f"Bearer {secret}"  # it was used
        events = instance.all_logs(result.run_id)
        assert secret not in repr([e.dagster_event for e in events]) and secret not in repr(
            [e.user_message for e in events]
        )
    assert secret not in caplog.text
    for root in (Path(registered), home):
        for path in root.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
