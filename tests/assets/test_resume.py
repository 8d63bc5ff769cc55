"""A killed explanations or scores run keeps the latents it finished (on disk, not in the response
cache, which is off here) and the next run asks only for the rest."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from tests.conftest import (
    TINY_CODER,
    add_coders,
    all_assets,
    make_resources,
    pipeline_until_exemplars,
)
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt

REPO = Path(__file__).resolve().parents[2]
N_LATENTS = 24
PARTITION = f"{TINY_CODER}|00"
RUN = """
import sys
from pathlib import Path
from dagster import DagsterInstance, materialize
from resources.llm import LLMResource
from tests.conftest import TINY_CODER, add_coders, all_assets, make_resources

root, url, n, asset = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
instance = DagsterInstance.ephemeral()
add_coders(instance, root, TINY_CODER)
llm = LLMResource(backend="openai", base_url=url, model="scripted", max_concurrency=2, cache_dir="")
materialize(
    all_assets(),
    selection=[asset],
    partition_key=f"{TINY_CODER}|00",
    resources=make_resources(root, max_latents=n, llm=llm),
    instance=instance,
)
"""


def materialize_with(server, root: Path, instance, asset: str):
    from resources.llm import LLMResource

    llm = LLMResource(
        backend="openai",
        base_url=server.base_url,
        model="scripted",
        max_concurrency=2,
        cache_dir="",
    )
    return materialize(
        all_assets(),
        selection=[asset],
        partition_key=PARTITION,
        resources=make_resources(root, max_latents=N_LATENTS, llm=llm),
        instance=instance,
    )


@pytest.mark.parametrize(
    "asset, table, requests_per_latent",
    [
        ("explanations", "explanations/{coder}/00.parquet", 1),
        (
            "scores/detection",
            "scores/{coder}/00/detection.parquet",
            2,
        ),  # one prompt of 10 windows for the explanation, one for the control
    ],
)
def test_killed_run_resumes_with_the_latents_it_had_not_finished(
    registered, asset, table, requests_per_latent
):
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    table = registered / table.format(coder=TINY_CODER)
    partial = table.with_name(table.name + ".partial")
    last_part = "rows" if asset == "explanations" else "scores"
    with ScriptedLLMServer(answer_by_prompt, delay_s=0.4) as server:
        if asset != "explanations":
            assert materialize_with(server, registered, instance, "explanations").success
        proc = subprocess.Popen(
            [sys.executable, "-c", RUN, str(registered), server.base_url, str(N_LATENTS), asset],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.time() + 240
        while (
            time.time() < deadline
            and proc.poll() is None
            and not list(partial.glob(f"part-*.{last_part}.parquet"))
        ):
            time.sleep(0.05)
        assert proc.poll() is None, (
            f"the run ended before it was killed: {proc.stderr.read()[-3000:]}"
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
        assert not table.exists()
        kept = pd.concat([pd.read_parquet(p) for p in partial.glob(f"part-*.{last_part}.parquet")])
        assert 0 < len(kept) < N_LATENTS

        sent_before = len(server.requests)
        assert materialize_with(server, registered, instance, asset).success
        sent_after = len(server.requests) - sent_before
    frame = pd.read_parquet(table)
    assert len(frame) == N_LATENTS
    assert sent_after == requests_per_latent * (
        N_LATENTS - len(kept)
    )  # only the latents the killed run had not finished were asked
    column = "explanation" if asset == "explanations" else "balanced_accuracy"
    assert (
        frame.set_index("latent").loc[kept["latent"], column].tolist() == kept[column].tolist()
    )  # the kept rows are the table's rows
    if (
        asset != "explanations"
    ):  # every scored latent has its example rows once: kept ones from the journal, the others fresh
        examples = pd.read_parquet(table.with_name("detection.examples.parquet"))
        per_latent = examples.groupby("latent").size()
        scored = frame.set_index("latent")[["n_scored", "control_n_scored"]].sum(axis=1).astype(int)
        assert per_latent.sort_index().to_dict() == scored.sort_index().to_dict()
    assert not partial.exists()  # the table replaces the partial rows
