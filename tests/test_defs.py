import json
import subprocess
import sys
from pathlib import Path

SCORER_ASSETS = {f"scores/{name}" for name in ("detection", "fuzzing", "intruder", "simulation", "surprisal", "embedding")}
STAGES = {"corpus", "activations", "exemplars", "explanations", *SCORER_ASSETS, "score_summary"}


def test_definitions_load_every_stage_and_scorer_sensor_and_resources():
    from autointerp_defs import defs

    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == STAGES
    assert defs.resolve_sensor_def("sparse_coder_registry") is not None
    assert {"settings", "subject_model", "llm", "embedder"} <= set(defs.resources)


def test_dagster_cli_lists_every_asset():
    dagster = Path(sys.executable).parent / "dagster"
    out = subprocess.run([str(dagster), "asset", "list", "-m", "autointerp_defs"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert STAGES <= set(out.stdout.split())


def test_dagster_dev_serves_the_ui_on_localhost(tmp_path):
    import os
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dagster = Path(sys.executable).parent / "dagster"
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "AUTOINTERP_DATA": str(tmp_path / "data")}
    log = tmp_path / "dagster_dev.log"
    proc = subprocess.Popen([str(dagster), "dev", "-m", "autointerp_defs", "-h", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, info = time.time() + 180, None
        while time.time() < deadline and proc.poll() is None:
            try:
                info = urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(1)
        assert info and "dagster_webserver_version" in info
        query = b'{"query": "{ assetNodes { assetKey { path } } }"}'
        request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query, headers={"Content-Type": "application/json"})
        deadline = time.time() + 120
        while True:
            body = urllib.request.urlopen(request, timeout=30).read().decode()
            served = {"/".join(node["assetKey"]["path"]) for node in (json.loads(body).get("data") or {}).get("assetNodes", [])}
            if served >= STAGES or time.time() > deadline:
                break
            time.sleep(2)
        assert served >= STAGES, body
        output = log.read_text()  # what it said while starting and serving, before we stop it
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert "Traceback" not in output and "Error loading" not in output, output[-3000:]
