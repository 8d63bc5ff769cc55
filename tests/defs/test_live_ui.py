"""The README's way, live: `autointerp ui` (what `make ui` runs: Dagster's webserver and daemon) on
a fresh instance, a coder dropped into the registry, and everything down to `score_summary`
happens by itself, within the run limits; then nothing more happens, and Ctrl-C leaves no process
behind."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from autointerp_defs.instance import write_instance
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt

CODER = "small-topk/model.layers.3"
SHARDS = ("00", "01")  # 48 latents, 24 per shard
SCORERS = ("detection", "fuzzing")
MAX_RUNS, LLM_RUNS = 3, 1
TIME_LIMIT_S = 900
TICK_S = 5
"""The sensors' tick (`[settings] sensor_interval_s`; 30 s by default), short so the test waits less."""
DEPLOYMENT = """
automated_scorers = {scorers}
[settings]
data_dir = "{data}"
latents_per_shard = 24
max_latents_per_shard = 3
sensor_interval_s = {tick}
[subject_model]
model = "embedded"
[llm]
backend = "openai"
base_url = "{url}"
model = "scripted"
[embedder]
device = "cpu"
[corpus]
n_tokens = 4096
[explanations]
explainer = "highlighted"
"""


@pytest.fixture(scope="module")
def small_sae(subject):
    """A TopK SAE of 48 latents (k 4) on layer-3 activations of the embedded corpus."""
    import torch

    from assets.corpus import embedded_documents, tokenize_documents
    from autointerp_defs.demo_sae import train_topk_sae
    from resources.subject_model import capture_hookpoints

    tokens = tokenize_documents(
        embedded_documents(),
        subject.tokenizer(),
        ctx_len=64,
        n_tokens=64 * 32,
        add_bos=True,
        seed=3,
    )
    site = ("model.layers.3", "output")
    hidden = capture_hookpoints(subject.causal_lm(), torch.from_numpy(tokens).long(), {site})[site]
    return train_topk_sae(
        hidden[:, 1:].flatten(0, 1),
        width=48,
        k=4,
        name="small-topk",
        hookpoint="model.layers.3",
        epochs=2,
        batch_size=256,
    )


class UI:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def query(self, text: str) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": text}).encode(),
            headers={"Content-Type": "application/json"},
        )
        body = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert "errors" not in body, body
        return body["data"]

    def runs(self) -> list[dict]:
        data = self.query(
            "{ runsOrError(limit: 1000) { ... on Runs { results "
            "{ runId status startTime endTime assetSelection { path } } } } }"
        )
        return data["runsOrError"]["results"]

    def backfills(self) -> list[dict]:
        data = self.query(
            "{ partitionBackfillsOrError(limit: 1000) { ... on PartitionBackfills { results { id } } } }"
        )
        return data["partitionBackfillsOrError"]["results"]

    def materialized(
        self, asset: str, partitions: list[str] | None = None
    ) -> dict[str | None, float]:
        """Partition (None: unpartitioned) → time of its latest materialization."""
        path = json.dumps(asset.split("/"))
        among = f"(partitions: {json.dumps(partitions)})" if partitions else ""
        data = self.query(
            f"{{ assetOrError(assetKey: {{path: {path}}}) {{ ... on Asset "
            f"{{ assetMaterializations{among} {{ partition timestamp }} }} }} }}"
        )
        found = {}
        for event in (data["assetOrError"] or {}).get("assetMaterializations", []):
            found[event["partition"]] = max(
                found.get(event["partition"], 0.0), float(event["timestamp"]) / 1000
            )
        return found


def most_at_once(runs: list[dict]) -> int:
    """The largest number of these runs that were in progress at the same moment."""
    edges = sorted(
        [(r["startTime"], 1) for r in runs] + [(r["endTime"], -1) for r in runs],
        key=lambda e: (e[0], e[1]),
    )
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def left_behind(home: Path) -> list[psutil.Process]:
    """Processes whose environment names this test's DAGSTER_HOME: what `autointerp ui` started."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("DAGSTER_HOME") == str(home):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.mark.slow(300)
def test_dropped_coder_runs_to_the_summary_by_itself_within_limits_then_stays_quiet(
    tmp_path, small_sae
):
    """Minutes, not seconds: the one test of the whole loop as `make ui` runs it, so it waits on Dagster's
    daemons (the sensors every TICK_S, the backfill daemon every 30 s) and starts five runs, each in processes of
    its own that load the code and the subject model; each stage's own behaviour is tested in-process elsewhere."""
    from resources.sparse_coders import save_sparsify

    home, data = tmp_path / "dagster_home", tmp_path / "data"
    write_instance(home, max_runs=MAX_RUNS, llm_runs=LLM_RUNS)  # what `make ui` writes
    (data / "registry").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ScriptedLLMServer(answer_by_prompt) as server:
        deployment = (
            tmp_path / "live.toml"
        )  # the remote deployment, pointed at the scripted server, sized for a CPU
        deployment.write_text(
            DEPLOYMENT.format(
                data=data, url=server.base_url, scorers=json.dumps(list(SCORERS)), tick=TICK_S
            )
        )
        env = {**os.environ, "DAGSTER_HOME": str(home), "AUTOINTERP_DEPLOYMENT": str(deployment)}
        log = tmp_path / "ui.log"
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "autointerp"),
                "ui",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        ui = UI(port)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None:
                try:
                    served = {
                        "/".join(n["assetKey"]["path"])
                        for n in ui.query("{ assetNodes { assetKey { path } } }")["assetNodes"]
                    }
                    if served >= {
                        "corpus",
                        "activations",
                        "exemplars",
                        "explanations",
                        "score_summary",
                    }:
                        break
                except OSError:
                    pass
                time.sleep(2)
            assert served >= {
                "corpus",
                "activations",
                "exemplars",
                "explanations",
                "score_summary",
            }, log.read_text()[-3000:]
            assert ui.query("{ shouldShowNux }")["shouldShowNux"] is False

            dropped = time.time()
            save_sparsify(small_sae, data / "registry" / CODER)
            shard_keys = [f"{CODER}|{shard}" for shard in SHARDS]
            while True:
                time.sleep(5)
                runs = ui.runs()
                assert not [r for r in runs if r["status"] == "FAILURE"], (
                    runs,
                    log.read_text()[-5000:],
                )
                summary = ui.materialized("score_summary")
                settled = not [
                    r for r in runs if r["status"] not in ("SUCCESS", "FAILURE", "CANCELED")
                ]
                if summary and settled:
                    break
                assert time.time() - dropped < TIME_LIMIT_S, (runs, log.read_text()[-5000:])
            took = time.time() - dropped
            print(f"\ndrop → score_summary, all runs settled: {took:.0f} s, {len(runs)} runs")

            assert ui.materialized("corpus")  # asked for by the registry sensor: there was none
            assert set(ui.materialized("activations", shard_keys)) == set(shard_keys)
            last_scored = 0.0
            for asset in ("exemplars", "explanations", *(f"scores/{n}" for n in SCORERS)):
                done = ui.materialized(asset, shard_keys)
                assert set(done) == set(shard_keys), asset
                last_scored = max(last_scored, *done.values())
            assert summary[None] >= last_scored  # the summary saw every shard's scores
            assert server.requests  # the explainer and the scorers were asked

            # the run limits held: one subject-model run at a time, LLM_RUNS LLM runs, MAX_RUNS in all
            def selecting(*assets):
                return [
                    r
                    for r in runs
                    if any("/".join(a["path"]) in assets for a in r["assetSelection"] or [])
                ]

            assert most_at_once(runs) <= MAX_RUNS
            assert most_at_once(selecting("activations", "scores/surprisal")) == 1
            assert (
                most_at_once(selecting("explanations", *(f"scores/{n}" for n in SCORERS)))
                <= LLM_RUNS
            )

            # three more sensor and automation ticks: no new run, backfill or request
            n_runs, n_backfills, n_requests = len(runs), len(ui.backfills()), len(server.requests)
            time.sleep(3 * TICK_S + 5)  # the daemon looks at its sensors every 5 s
            assert len(ui.runs()) == n_runs and len(server.requests) == n_requests
            assert len(ui.backfills()) == n_backfills
        finally:
            os.killpg(
                proc.pid, signal.SIGINT
            )  # Ctrl-C: the terminal signals the whole foreground group
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                raise
    deadline = time.time() + 20
    while left_behind(home) and time.time() < deadline:
        time.sleep(1)
    assert not left_behind(home)
    output = log.read_text()
    assert "Traceback" not in output and "Error loading" not in output, output[-3000:]
    assert "superseded" not in output.lower() and "deprecat" not in output.lower(), output[-3000:]
