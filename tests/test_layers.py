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
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
    }  # this checkout's modules, not an installed copy's
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


TABLE_PROTOCOL = {
    "write_table",
    "write_table_batches",
    "refuse_emptier",
    "table_lock",
    "existing_table",
    "read_table",
    "Journal",
    "file_fingerprint",
    "atomic_path",
    "write_json",
}
"""What only the table store (`storage/store.py`) calls: the steps of reading and committing a table."""
TABLE_PATHS = {
    "exemplars_path",
    "latent_profiles_path",
    "exemplars_threshold_path",
    "explanations_path",
    "scores_path",
    "scored_examples_path",
    "score_summary_path",
    "score_summary_sources_path",
}
"""Where the layout puts each table: only the store asks."""


def test_no_asset_builds_a_table_path_or_writes_a_table_itself():
    import ast

    found = []
    for module in sorted((ROOT / "assets").rglob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Call):
                name = (
                    node.func.id
                    if isinstance(node.func, ast.Name)
                    else node.func.attr
                    if isinstance(node.func, ast.Attribute)
                    else ""
                )
                if name in TABLE_PROTOCOL | TABLE_PATHS:
                    found.append(f"{module.relative_to(ROOT)}:{node.lineno} {name}")
    assert not found, "assets go through the table store (settings.store) instead: " + ", ".join(
        found
    )
