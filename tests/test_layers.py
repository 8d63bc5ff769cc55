"""Every import runs down the layers (storage < resources < assets < autointerp_defs) and no modules of a
package import each other in a circle: the import-linter contracts in pyproject.toml, checked here so
that a function-level import dodging the rule fails the test run as surely as a top-level one."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_run_down_the_layers_without_cycles():
    lint = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's modules, not an installed copy's
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
