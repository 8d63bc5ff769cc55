"""bench/chaos.py at a small size: a faulty endpoint never gets an answer misread, and a rerun heals."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_30_percent_faulty_requests_are_never_misread_and_a_rerun_asks_only_the_lost_and_equals_the_fault_free_run():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--latents", "24"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["faults"]) == {
        "429",
        "500",
        "503",
        "reset",
        "timeout",
        "truncated",
        "not_json",
        "prose",
        "wrong_length",
    }
    assert sum(result["faults"].values()) > 0.2 * result["requests"]
    assert result["misread"] == 0 and result["items_compared"] > 1000
    assert (
        result["rerun_equals_fault_free"] is True
    )  # token counts aside: a question answered on its follow-up replays both turns
    # the rerun asks what was lost and what the gained explanations need, not every control again
    assert result["lost_explanations"] >= 1 and result["rerun_repeats"] <= result["lost_questions"]
    assert result["rerun_requests"] <= result["rerun_bound"] < result["fault_free_requests"] / 4
    assert all(f["reason"] for f in result["failed"])  # every lost latent says why
