import subprocess
import sys
from pathlib import Path

SCORER_ASSETS = {
    f"scores/{name}"
    for name in (
        "detection",
        "fuzzing",
        "intruder",
        "simulation",
        "surprisal",
        "embedding",
        "intervention",
        "output_judge",
        "saebench",
    )
}
STAGES = {
    "corpus",
    "activations",
    "exemplars",
    "explanations",
    *SCORER_ASSETS,
    "score_summary",
    "calibration",  # once per judge, materialized by `autointerp calibrate`
}


def test_definitions_load_every_stage_and_scorer_sensor_and_resources():
    from autointerp_defs import defs

    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == STAGES
    assert defs.resolve_sensor_def("sparse_coder_registry") is not None
    assert {"settings", "subject_model", "llm", "embedder"} <= set(defs.resources)


def test_dagster_cli_lists_every_asset():
    dagster = Path(sys.executable).parent / "dagster"
    out = subprocess.run(
        [str(dagster), "asset", "list", "-m", "autointerp_defs"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert STAGES <= set(out.stdout.split())
