"""bench/kill_campaign.py's CI subset: `autointerp cache` and an explanations run killed with SIGKILL in
the middle of their work, then run again, equal an uninterrupted run exactly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow(150)
def test_killed_cache_and_explanations_runs_resume_to_identical_results():
    """Minutes: each stage runs as its own process three times (the reference, the one killed, the one that
    resumes) and the exemplars between them twice, each process loading the code and the subject model; only a
    real SIGKILL of a real process shows that what it left behind resumes to the same results."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "kill_campaign.py"),
            "--kills",
            "1",
            "--stages",
            "cache,explanations",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["identical_results"] is True and report["kills"] == 2
    assert (
        report["stages"]["cache"]["killed_at"]
        == report["stages"]["explanations"]["killed_at"]
        == ["50%"]
    )  # halfway through their work
