"""pyproject.toml asks for torch as a range: a GPU machine keeps its own torch, and the `vllm` extra can take
the newest vLLM, which pins its torch exactly (`bench/dependencies.py` asks pip what the extra resolves to)."""

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_torch_is_a_range_that_admits_the_makefiles_cpu_build_and_the_newest_vllms_torch():
    torch = next(
        Requirement(r)
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if Requirement(r).name == "torch"
    )
    assert not any(spec.operator in ("==", "===", "~=") for spec in torch.specifier), torch
    assert (
        re.search(r"pip install -q torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
        in torch.specifier
    )  # installed first, on the CPU here
    assert "2.14.0" in torch.specifier  # what vLLM 0.33.0, the newest on 2026-12-02, pins
