"""Broken registry folders stop with one message that names the file and the fix, and never hide
the good coders beside them (the registry scan lists them apart)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from resources.sparse_coders import (
    CoderFormatError,
    RegistryError,
    inspect_registry,
    load_registered,
    save_sparsify,
)
from tests.conftest import random_coder

HOOK = "model.layers.1"


def truncate(folder):
    path = folder / "sae.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def bad_json(folder):
    (folder / "cfg.json").write_text('{"activation": "topk", "k": 4,')


def edit_weights(**changes):
    def edit(folder):
        path = folder / "sae.safetensors"
        tensors = load_file(str(path))
        for name, change in changes.items():
            tensors[name] = change(tensors[name].clone())
        save_file(tensors, str(path))

    return edit


def edit_cfg(**changes):
    def edit(folder):
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))

    return edit


def nan_rows(tensor):
    tensor[[3, 7]] = float("nan")
    return tensor


def foreign_files(folder):
    for path in folder.iterdir():
        path.unlink()
    (folder / "model.bin").write_bytes(b"\0" * 64)


# (mistake, how to make it, what the one message must say)
MISTAKES = [
    (
        "sae.safetensors truncated",
        truncate,
        r"Cannot read .*sae\.safetensors as a sparsify coder .*Fix: the file may be truncated",
    ),
    ("cfg.json not JSON", bad_json, r"cfg\.json is not valid JSON .*Fix: repair the file"),
    (
        "NaN in some encoder rows",
        edit_weights(**{"encoder.weight": nan_rows}),
        r"encoder_weight holds NaN or inf at latents \[3, 7\] \(2 in all\).*Fix",
    ),
    (
        "b_dec all NaN",
        edit_weights(b_dec=lambda t: t * float("nan")),
        r"decoder_bias holds NaN or inf at 16 of its 16 entries.*Fix",
    ),
    (
        "width differs from cfg.json",
        edit_cfg(num_latents=999),
        r"cfg\.json says num_latents = 999, but sae\.safetensors holds 64\. Fix",
    ),
    (
        "dtype differs from cfg.json",
        edit_cfg(dtype="bfloat16"),
        r"cfg\.json says dtype = 'bfloat16', but sae\.safetensors stores \['F32'\]\. Fix",
    ),
    (
        "decoder of another width",
        edit_weights(W_dec=lambda t: t[:32]),
        r"decoder_weight has shape \(32, 16\).*width 64.*Fix",
    ),
    (
        "no known format",
        foreign_files,
        r"holds no sparse coder in a known format .*it holds model\.bin",
    ),
]


@pytest.mark.parametrize("mistake, make, message", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_broken_coder_stops_with_its_file_and_the_fix(tmp_path, mistake, make, message):
    save_sparsify(random_coder(), tmp_path / "good" / HOOK)
    save_sparsify(random_coder(seed=1), tmp_path / "broken" / HOOK)
    make(tmp_path / "broken" / HOOK)
    with pytest.raises((CoderFormatError, RegistryError), match=message) as error:
        load_registered(tmp_path, f"broken/{HOOK}")
    assert "\n" not in str(error.value)  # one message, not a traceback
    assert torch.equal(
        load_registered(tmp_path, f"good/{HOOK}").encoder_weight, random_coder().encoder_weight
    )
    registered, broken = inspect_registry(tmp_path)
    assert f"good/{HOOK}" in registered  # one broken folder never hides the good ones
    if mistake in (
        "sae.safetensors truncated",
        "cfg.json not JSON",
        "no known format",
    ):  # told without loading the weights
        assert f"broken/{HOOK}" not in registered and f"broken/{HOOK}" in broken


@pytest.mark.parametrize(
    "toml, message",
    [
        (
            "[scorers.fuzzing]\nexamples_per_prompt = true\n",
            r"mine\.toml: \[fuzzing\] examples_per_prompt = True: Input should be a valid integer\. Fix",
        ),
        (
            "[scorers.simulation]\ncalibrate = 1\n",
            r"\[simulation\] calibrate = 1: Input should be a valid boolean\. Fix",
        ),
        ("[scorers.fuzing]\nexamples_per_prompt = 5\n", r"Unknown scorer\(s\) \['fuzing'\].*Fix"),
    ],
)
def test_a_scorer_setting_of_the_wrong_type_stops_the_load_naming_file_and_key(
    tmp_path, monkeypatch, toml, message
):
    """`true` where a number belongs used to load silently as 1."""
    from autointerp_defs.definitions import build_definitions

    path = tmp_path / "mine.toml"
    path.write_text(toml)
    monkeypatch.setenv("AUTOINTERP_DEPLOYMENT", str(path))
    with pytest.raises(ValueError, match=message) as error:
        build_definitions()
    assert "\n" not in str(error.value)


NOT_WRITABLE = """
import sys
from pathlib import Path
import pandas as pd
from resources.response_cache import ResponseCache
from storage.tables import write_table
root = Path(sys.argv[1])
attempts = (
    lambda: ResponseCache(root / "llm_cache" / "responses.sqlite"),
    lambda: write_table(pd.DataFrame(), root / "exemplars" / "x.parquet", "exemplars"),
)
for attempt in attempts:
    try:
        attempt()
        print("written")
    except PermissionError as error:
        print(error)
"""


def test_a_data_root_this_user_cannot_write_says_so_with_the_fix(tmp_path):
    """Run as an unprivileged user (root writes anywhere): a clear message instead of SQLite's 'readonly database'."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run as another user")
    root = tmp_path / "data"
    (root / "llm_cache").mkdir(parents=True)
    tmp_path.chmod(0o755)
    root.chmod(0o755)
    (root / "llm_cache").chmod(0o755)
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            NOT_WRITABLE,
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=repo,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo), "HOME": "/tmp"},
    )
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stderr[-2000:]
    assert (
        lines[0].startswith(
            f"Cannot write the LLM response cache {root}/llm_cache/responses.sqlite"
        )
        and "Fix: make the data root writable" in lines[0]
    )
    assert (
        lines[1].startswith(f"Cannot write under {root}")
        and "Fix: make the data root writable by this user, or set the deployment's [settings] data_dir"
        in lines[1]
    )
