"""Does `pip install -e '.[vllm]'` on a GPU machine get the newest vLLM, with the torch that vLLM needs?

Asks pip, without installing or downloading wheels (`--dry-run`; PyPI serves each wheel's metadata on
its own): first which vLLM is newest for this Python (`vllm` alone, `--no-deps`), then what the whole
project with its `vllm` extra resolves to. The project's own torch requirement must admit the torch
that vLLM pins, or pip would fall back to an older vLLM. vLLM's wheels are CUDA builds whatever
machine asks, so this machine's answer is a GPU machine's. Prints a JSON object as its last line and
exits 1 when the extra does not resolve to the newest vLLM. Needs PyPI; takes a few minutes.

    .venv/bin/python bench/dependencies.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def resolve(*requirements: str) -> dict[str, dict]:
    """What pip would install for `requirements` into an empty environment: name → the wheel's metadata."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--report",
                str(report),
                *requirements,
            ],
            check=True,
            cwd=ROOT,
        )
        return {
            item["metadata"]["name"].lower(): item["metadata"]
            for item in json.loads(report.read_text())["install"]
        }


def main() -> int:
    newest = resolve("--no-deps", "vllm")["vllm"]
    torch_needed = next(
        Requirement(r) for r in newest["requires_dist"] if Requirement(r).name == "torch"
    )
    ours = next(
        Requirement(r)
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if Requirement(r).name == "torch"
    )
    resolved = resolve(".[vllm]")
    result = {
        "newest_vllm": newest["version"],
        "its_torch": str(torch_needed.specifier),
        "our_torch": str(ours.specifier),
        "resolved_vllm": resolved["vllm"]["version"],
        "resolved_torch": resolved["torch"]["version"],
        "resolved_transformers": resolved["transformers"]["version"],
    }
    result["newest_vllm_resolved"] = result["resolved_vllm"] == result["newest_vllm"]
    print(json.dumps(result))
    return 0 if result["newest_vllm_resolved"] else 1


if __name__ == "__main__":
    sys.exit(main())
