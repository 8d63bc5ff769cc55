"""`autointerp worker` loads the code before celery forks its pool: a step on a pool process then finds the
definitions built and the stages' libraries imported, instead of loading them again on its first step."""

import subprocess
import sys
from pathlib import Path

from tests.cluster.conftest import needs_the_cluster_extra
from tests.cluster.services import tiny_cluster_deployment

needs_the_cluster_extra()

REPO = Path(__file__).resolve().parents[2]
POOL_PROCESS = """
import os, sys
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.definitions.reconstruct import reconstruct_repository_def_from_pointer
from autointerp_defs.cluster import load_code

load_code()  # the worker's main process
child = os.fork()  # as celery's prefork pool starts a pool process
if child == 0:
    loaded = set(sys.modules)
    import autointerp_defs
    # what a celery step does
    repository = reconstruct_repository_def_from_pointer(
        ModuleCodePointer("autointerp_defs", "defs", os.getcwd())
    )
    # the instance's storage; the explanations step's engines
    import dagster_postgres, sentence_transformers, openai, psycopg
    new = sorted(set(sys.modules) - loaded)
    print("same definitions" if repository is autointerp_defs.defs.get_repository_def() else "definitions built again")
    print(f"modules loaded by the step: {sorted(set(m.split('.')[0] for m in new))} ({len(new)})", flush=True)
    os._exit(0)
os.waitpid(child, 0)
"""


def test_a_pool_process_finds_the_code_loaded(tmp_path):
    deployment = tiny_cluster_deployment(tmp_path, tmp_path, "http://127.0.0.1:9/v1", None)
    run = subprocess.run(
        [sys.executable, "-c", POOL_PROCESS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
            "AUTOINTERP_DEPLOYMENT": str(deployment),
        },
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        "same definitions" in run.stdout and "modules loaded by the step: [] (0)" in run.stdout
    ), run.stdout + run.stderr[-2000:]
