"""A killed explanations run keeps the latents it finished (on disk, not in the response cache, which
is off here) and the next run asks only for the rest."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from dagster import DagsterInstance, materialize

from tests.conftest import TINY_CODER, add_coders, all_assets, make_resources, pipeline_until_exemplars
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt

REPO = Path(__file__).resolve().parents[2]
N_LATENTS = 24
RUN = """
import sys
from pathlib import Path
from dagster import DagsterInstance, materialize
from resources.llm import LLMResource
from tests.conftest import TINY_CODER, add_coders, all_assets, make_resources

root, url = Path(sys.argv[1]), sys.argv[2]
instance = DagsterInstance.ephemeral()
add_coders(instance, root, TINY_CODER)
llm = LLMResource(backend="openai", base_url=url, model="scripted", max_concurrency=2, cache_dir="")
materialize(all_assets(), selection=["explanations"], partition_key=f"{TINY_CODER}|00", resources=make_resources(root, max_latents=int(sys.argv[3]), llm=llm), instance=instance)
"""


def test_killed_explanations_run_resumes_with_the_latents_it_had_not_finished(registered):
    from resources.llm import LLMResource

    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    table = registered / "explanations" / TINY_CODER / "00.parquet"
    partial = table.with_name(table.name + ".partial")
    with ScriptedLLMServer(answer_by_prompt, delay_s=0.4) as server:
        proc = subprocess.Popen([sys.executable, "-c", RUN, str(registered), server.base_url, str(N_LATENTS)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not list(partial.glob("part-*.parquet")):
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
        assert not table.exists()
        kept = pd.concat([pd.read_parquet(p) for p in partial.glob("part-*.parquet")])
        assert 0 < len(kept) < N_LATENTS and (kept["status"] == "ok").all()

        sent_before = len(server.requests)
        llm = LLMResource(backend="openai", base_url=server.base_url, model="scripted", max_concurrency=2, cache_dir="")
        resumed = materialize(all_assets(), selection=["explanations"], partition_key=f"{TINY_CODER}|00",
                              resources=make_resources(registered, max_latents=N_LATENTS, llm=llm), instance=instance)
        assert resumed.success
        sent_after = len(server.requests) - sent_before
    frame = pd.read_parquet(table)
    assert len(frame) == N_LATENTS and (frame["status"] == "ok").all()
    assert sent_after == N_LATENTS - len(kept)  # only the latents the killed run had not finished were asked
    merged = frame.set_index("latent").loc[kept["latent"], "explanation"]
    assert merged.tolist() == kept["explanation"].tolist()  # the kept rows are the table's rows
    assert not partial.exists()  # the table replaces the partial rows
