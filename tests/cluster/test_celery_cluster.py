"""The cluster deployment end to end: the instance on PostgreSQL, Redis as broker, one `autointerp worker`
process per queue; every step runs on a worker of its queue and the tables equal a single-machine run's."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import DagsterEventType, DagsterInstance, materialize

from autointerp_defs.definitions import definitions_for
from autointerp_defs.deployments import load_deployment
from autointerp_defs.instance import write_instance
from storage.activations import read_shard, shard_keys
from storage.layout import DataRoot
from storage.store import TableStore
from tests.cluster.conftest import needs_the_cluster_extra
from tests.cluster.services import cluster_env, start_worker, stop, tiny_cluster_deployment, wait_until_ready
from tests.conftest import TEST_LATENTS_PER_SHARD, TINY_CODER, add_coders
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt

needs_the_cluster_extra()

REPO = Path(__file__).resolve().parents[2]
PARTITION = f"{TINY_CODER}|00"
RUNS = [("corpus", None), ("activations", PARTITION), ("exemplars,explanations,scores/detection", PARTITION)]
QUEUE_OF_STEP = {"corpus": "cpu", "activations": "gpu", "exemplars": "cpu", "explanations": "llm", "scores__detection": "llm"}


def workers_of_steps(instance: DagsterInstance) -> dict[str, str]:
    """Which celery worker ran each step, from the engine event each worker writes as it starts one."""
    ran = {}
    for run in instance.get_runs():
        for record in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT):
            metadata = record.dagster_event.engine_event_data.metadata
            if "Celery worker" in metadata:
                ran[record.step_key] = metadata["Celery worker"].value
    return ran


def tables(root: Path) -> dict[str, object]:
    """Every table the runs wrote, in comparable form."""
    data, store = DataRoot.at(root), TableStore.at(root)
    coder, shard = TINY_CODER, "00"
    found = {"corpus": data.corpus_tokens_path.read_bytes()}
    for key in shard_keys(1152 // TEST_LATENTS_PER_SHARD):
        pairs = read_shard(data.activations_dir(coder), key)
        found[f"activations {key}"] = (pairs.locations, pairs.activations)
    found.update(exemplars=store.exemplars(coder, shard).read(), latent_profiles=store.latent_profiles(coder, shard).read(),
                 explanations=store.explanations(coder, shard).read(), scores=store.scores(coder, shard, "detection").read(),
                 scored_examples=store.scored_examples(coder, shard, "detection").read())
    return found


def assert_same_tables(cluster: dict, single: dict) -> None:
    assert cluster.keys() == single.keys()
    for name, table in cluster.items():
        if isinstance(table, pd.DataFrame):
            pd.testing.assert_frame_equal(table, single[name], obj=name)
        elif isinstance(table, tuple):
            assert all(np.array_equal(a, b) for a, b in zip(table, single[name])), name
        else:
            assert table == single[name], name


def test_cluster_runs_each_step_on_its_queue_and_matches_a_single_machine_run(registered, tmp_path_factory, monkeypatch, postgres_url, redis_url,
                                                                              coordination_url):
    home, logs, reference = (tmp_path_factory.mktemp(name) for name in ("dagster_home", "worker_logs", "reference"))
    shutil.copytree(registered / "registry", reference / "registry")
    workers = []
    with ScriptedLLMServer(answer_by_prompt) as server:
        deployment_file = tiny_cluster_deployment(home, registered, server.base_url, coordination_url)
        env = cluster_env(REPO, home, deployment_file, postgres_url, redis_url)
        monkeypatch.setenv("AUTOINTERP_POSTGRES_URL", postgres_url)  # what the instance's dagster.yaml reads in this process too
        try:
            write_instance(home, max_runs=2, llm_runs=2, gpus=1)
            instance = DagsterInstance.from_config(str(home))
            add_coders(instance, registered, TINY_CODER)
            for queue in ("gpu", "cpu", "llm"):
                log = logs / f"{queue}.log"
                workers.append((log, start_worker(queue, env, log)))
            for log, worker in workers:
                wait_until_ready(log, worker)
            for selection, partition in RUNS:
                command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "autointerp_defs", "--select", selection]
                done = subprocess.run(command + (["--partition", partition] if partition else []), env=env, cwd=home, capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            ran = workers_of_steps(instance)
        finally:
            for _, worker in workers:
                stop(worker)

        assert {step: worker.split("@")[0] for step, worker in ran.items()} == QUEUE_OF_STEP
        single = definitions_for(load_deployment(str(tiny_cluster_deployment(reference, reference, server.base_url, None))))
        on_one_machine = DagsterInstance.ephemeral()
        add_coders(on_one_machine, reference, TINY_CODER)
        for selection, partition in RUNS:
            materialize(list(single.assets), selection=selection.split(","), partition_key=partition, resources=single.resources, instance=on_one_machine)
    assert_same_tables(tables(registered), tables(reference))
    assert not list(registered.rglob("*.sqlite")) and not (registered / "llm_cache" / "slots").exists()  # no coordination through the data root's files
