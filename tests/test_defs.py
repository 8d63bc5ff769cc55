import subprocess
import sys
from pathlib import Path

STAGES = {"corpus", "activations", "exemplars", "explanations", "scores"}


def test_definitions_load_with_five_assets_sensor_and_resources():
    from autointerp_defs import defs

    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == STAGES
    assert defs.resolve_sensor_def("sparse_coder_registry") is not None
    assert {"settings", "subject_model", "llm", "embedder"} <= set(defs.resources)


def test_dagster_cli_lists_the_five_assets():
    dagster = Path(sys.executable).parent / "dagster"
    out = subprocess.run([str(dagster), "asset", "list", "-m", "autointerp_defs"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert STAGES <= set(out.stdout.split())
