"""`autointerp register`: coders made by their own libraries, served by a scripted hub, downloaded by
huggingface_hub's real code into its cache, then found there offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autointerp_defs.cli import main
from resources.sparse_coders import load_registered, scan_registry
from tests.resources.test_coder_formats import randomize
from tests.scripted_hub_server import ScriptedHub, hub_environment

D_IN, WIDTH = 16, 64
TOKEN = "hf_scripted_token"
GEMMA_SCOPE_ID = "layer_3/width_16k/average_l0_14"
"""An SAE id of the SAELens release gemma-scope-2b-pt-res, served here under its repo."""


@pytest.fixture(scope="module")
def coders(tmp_path_factory):
    """Folders as each library writes them: sparsify (two hookpoints), SAELens, Gemma Scope's params.npz."""
    import sae_lens
    from sparsify import SparseCoder as SparsifyCoder
    from sparsify import SparseCoderConfig

    root = tmp_path_factory.mktemp("made")
    for layer in (1, 2):
        theirs = SparsifyCoder(D_IN, SparseCoderConfig(num_latents=WIDTH, k=4), device="cpu")
        randomize(theirs, seed=layer)
        theirs.save_to_disk(root / "sparsify" / f"layers.{layer}")
    saelens = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=WIDTH))
    randomize(saelens)
    saelens.save_model(str(root / "saelens" / "blocks.3.hook_resid_pre"))
    rng = np.random.default_rng(0)
    params = {
        "W_enc": rng.normal(size=(D_IN, WIDTH)),
        "W_dec": rng.normal(size=(WIDTH, D_IN)),
        "b_enc": rng.normal(size=WIDTH),
        "b_dec": rng.normal(size=D_IN),
        "threshold": rng.random(WIDTH),
    }
    (root / "gemmascope" / GEMMA_SCOPE_ID).mkdir(parents=True)
    np.savez(
        root / "gemmascope" / GEMMA_SCOPE_ID / "params.npz",
        **{k: v.astype(np.float32) for k, v in params.items()},
    )
    return root


@pytest.fixture()
def hub(coders, tmp_path):
    """The scripted hub serving the coders (HF_TOKEN needed), with huggingface_hub pointed at it and
    its cache in the test's folder."""
    with (
        ScriptedHub(token=TOKEN) as hub,
        hub_environment(hub.url, tmp_path / "hf_home", TOKEN) as env,
    ):
        hub.add_folder("EleutherAI/sae-tiny", coders / "sparsify", refs=("main", "v1"))
        hub.add_folder("jbloom/GPT2-Small-SAEs-Reformatted", coders / "saelens")
        hub.add_folder("google/gemma-scope-2b-pt-res", coders / "gemmascope")
        hub.env = env
        yield hub


def register(data: Path, *args) -> None:
    main(["--deployment", "local", "--data", str(data), "register", *args])


def test_sparsify_repo_is_downloaded_at_a_revision_and_registered(hub, coders, tmp_path, capsys):
    register(
        tmp_path / "data",
        "EleutherAI/sae-tiny",
        "--hookpoints",
        "layers.1",
        "layers.2",
        "--revision",
        "v1",
    )
    out = capsys.readouterr().out
    commit = hub.refs["EleutherAI/sae-tiny"]["v1"]
    assert (
        f"registered sae-tiny/layers.1: width {WIDTH} (1 shards of 1024), from EleutherAI/sae-tiny@v1 (commit {commit})"
        in out
    )
    registry = tmp_path / "data" / "registry"
    assert scan_registry(registry) == ["sae-tiny/layers.1", "sae-tiny/layers.2"]
    for layer in (1, 2):
        folder = registry / "sae-tiny" / f"layers.{layer}"
        for name in ("cfg.json", "sae.safetensors"):
            assert (folder / name).read_bytes() == (
                coders / "sparsify" / f"layers.{layer}" / name
            ).read_bytes()
        assert json.loads((folder / "source.json").read_text())["commit"] == commit
    assert load_registered(registry, "sae-tiny/layers.2").width == WIDTH
    asked = [
        (path, auth)
        for _, path, auth in hub.requests
        if path.startswith("/api/models/") or "/resolve/" in path
    ]
    assert len(asked) >= 5 and all(
        auth == f"Bearer {TOKEN}" for _, auth in asked
    )  # HF_TOKEN went with every request for the repo
    assert list(
        (tmp_path / "hf_home" / "hub").glob(
            "models--EleutherAI--sae-tiny/snapshots/*/layers.1/sae.safetensors"
        )
    )  # into HF_HOME's cache

    register(
        tmp_path / "data", "EleutherAI/sae-tiny", "--hookpoints", "layers.1", "--revision", "v1"
    )
    assert "already registered sae-tiny/layers.1" in capsys.readouterr().out
    with pytest.raises(
        SystemExit,
        match=r"sae-tiny/layers.1 is already registered \(from EleutherAI/sae-tiny@.*Fix: choose another --name",
    ):
        register(
            tmp_path / "data",
            "EleutherAI/sae-tiny",
            "--hookpoints",
            "layers.1",
            "--revision",
            "main",
        )


def test_saelens_and_gemma_scope_releases_resolve_through_saelens_directory(
    hub, coders, tmp_path, capsys
):
    register(tmp_path / "data", "gpt2-small-res-jb", "--hookpoints", "blocks.3.hook_resid_pre")
    register(tmp_path / "data", "gemma-scope-2b-pt-res", "--hookpoints", GEMMA_SCOPE_ID)
    out = capsys.readouterr().out
    # resid_pre of block 3 is the output of decoder layer 2; Gemma Scope's residual layer_3 the output of layer 3
    assert (
        "registered gpt2-small-res-jb/layers.2: width 64" in out
        and "registered gemma-scope-2b-pt-res/layers.3: width 64" in out
    )
    registry = tmp_path / "data" / "registry"
    saelens = load_registered(registry, "gpt2-small-res-jb/layers.2")
    gemma = load_registered(registry, "gemma-scope-2b-pt-res/layers.3")
    assert (saelens.source_format, gemma.source_format) == ("saelens", "gemmascope")
    assert (
        json.loads((registry / "gemma-scope-2b-pt-res" / "layers.3" / "source.json").read_text())[
            "sae_id"
        ]
        == GEMMA_SCOPE_ID
    )
    assert {
        path.split("/resolve/")[0] for method, path, _ in hub.requests if "/resolve/" in path
    } == {"/jbloom/GPT2-Small-SAEs-Reformatted", "/google/gemma-scope-2b-pt-res"}


def test_hub_errors_name_the_input_and_the_fix(hub, coders, tmp_path):
    with (
        hub_environment(hub.url, tmp_path / "hf_home"),
        pytest.raises(
            SystemExit,
            match=r"EleutherAI/sae-tiny does not exist or is private "
            r"\(no token was sent \(HF_TOKEN is not set\)\)\. Fix: .*HF_TOKEN",
        ),
    ):
        register(tmp_path / "data", "EleutherAI/sae-tiny", "--hookpoints", "layers.1")
    with (
        hub_environment(hub.url, tmp_path / "hf_home", token="hf_someone_else"),
        pytest.raises(
            SystemExit,
            match=r"does not exist or is private \(the token in HF_TOKEN \(or `hf auth login`\) has no access to it\)",
        ),
    ):
        register(tmp_path / "data", "EleutherAI/sae-tiny", "--hookpoints", "layers.1")
    with pytest.raises(
        SystemExit, match=r"has no revision 'v9' of EleutherAI/sae-tiny\. Fix: --revision"
    ):
        register(tmp_path / "data", "EleutherAI/sae-tiny", "--revision", "v9")
    with pytest.raises(
        SystemExit,
        match=r"EleutherAI/sae-tiny@main holds 2 coders: layers.1, layers.2\. Fix: choose with --hookpoints",
    ):
        register(tmp_path / "data", "EleutherAI/sae-tiny")
    with pytest.raises(
        SystemExit,
        match=r"'layers.7' is not a coder folder of EleutherAI/sae-tiny@main\. Its coders: layers.1, layers.2",
    ):
        register(tmp_path / "data", "EleutherAI/sae-tiny", "--hookpoints", "layers.7")
    hub.add("someone/not-a-coder", {"README.md": b"hi", "model.safetensors": b"x"})
    with pytest.raises(
        SystemExit,
        match=r"holds no sparse coder in a known layout .* it holds README.md, model.safetensors",
    ):
        register(tmp_path / "data", "someone/not-a-coder")
    with pytest.raises(
        SystemExit,
        match=r"'blocks.99.hook_resid_pre' is not a coder id of the release of jbloom/"
        r".*Its coders: blocks.0.hook_resid_pre",
    ):
        register(tmp_path / "data", "gpt2-small-res-jb", "--hookpoints", "blocks.99.hook_resid_pre")
    with pytest.raises(
        SystemExit,
        match=r"\(SAELens release gpt2-small-res-jb\) has no coder in a known layout "
        r".* at blocks.9.hook_resid_pre; it holds no files",
    ):
        register(
            tmp_path / "data", "gpt2-small-res-jb", "--hookpoints", "blocks.9.hook_resid_pre"
        )  # in the directory, not in the repo
    hub.add_folder(
        "tommmcgrath/gpt2-small-mlp-out-saes",
        coders / "saelens" / "blocks.3.hook_resid_pre",
        under="sae_group_gpt2_blocks.0.hook_mlp_out_24576:v1",
    )
    with pytest.raises(
        SystemExit,
        match=r"The SAE 'blocks.0.hook_mlp_out' of the release gpt2-small-mlp-tm "
        r"needs its input scaled by 1.04.*Fix: choose an SAE without",
    ):
        register(
            tmp_path / "data",
            "gpt2-small-mlp-tm",
            "--hookpoints",
            "blocks.0.hook_mlp_out=model.layers.0.mlp",
        )
    assert not (tmp_path / "data" / "registry").exists() or not scan_registry(
        tmp_path / "data" / "registry"
    )


def test_offline_registers_from_the_cache_the_first_run_filled(hub, tmp_path):
    """A separate process with HF_HUB_OFFLINE=1 from the start, as a user runs it: the cache
    serves, the hub is never asked."""
    register(tmp_path / "online", "EleutherAI/sae-tiny", "--hookpoints", "layers.1")
    asked = len(hub.requests)

    def offline(*args) -> subprocess.CompletedProcess:
        environment = (
            {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
            | hub.env
            | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
        )
        return subprocess.run(
            [
                sys.executable,
                "-c",
                "from autointerp_defs.cli import main; main()",
                "--deployment",
                "local",
                "--data",
                str(tmp_path / "offline"),
                "register",
                "EleutherAI/sae-tiny",
                *args,
            ],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = offline("--hookpoints", "layers.1")
    assert done.returncode == 0, done.stderr
    commit = hub.refs["EleutherAI/sae-tiny"]["main"]
    assert (
        f"registered sae-tiny/layers.1: width {WIDTH} (1 shards of 1024), "
        f"from EleutherAI/sae-tiny@main (commit {commit})" in done.stdout
    )
    assert len(hub.requests) == asked
    assert (
        tmp_path / "offline" / "registry" / "sae-tiny" / "layers.1" / "sae.safetensors"
    ).read_bytes() == (
        tmp_path / "online" / "registry" / "sae-tiny" / "layers.1" / "sae.safetensors"
    ).read_bytes()
    with hub_environment(hub.url, tmp_path / "hf_home", offline=True):
        with pytest.raises(
            SystemExit,
            match=r"'layers.2' is not a coder folder of EleutherAI/sae-tiny@main "
            r"\(HF_HUB_OFFLINE is set: only the cached files are listed\)\. Its coders: layers.1\. Fix",
        ):
            register(
                tmp_path / "offline", "EleutherAI/sae-tiny", "--hookpoints", "layers.1", "layers.2"
            )  # only what the cache holds is listed
    assert len(hub.requests) == asked
    with (
        hub_environment(hub.url, tmp_path / "hf_home", offline=True),
        pytest.raises(
            SystemExit,
            match=r"google/gemma-scope-2b-pt-res@main is not in the Hugging Face cache "
            r".*HF_HUB_OFFLINE is set.*Fix: run the same command once online",
        ),
    ):
        register(tmp_path / "offline", "gemma-scope-2b-pt-res", "--hookpoints", GEMMA_SCOPE_ID)


def test_local_folder_registers_a_coder_and_needs_its_module_named(coders, tmp_path, capsys):
    register(
        tmp_path / "data",
        str(coders / "sparsify"),
        "--hookpoints",
        "layers.2=model.layers.2",
        "--name",
        "mine",
    )
    assert "registered mine/model.layers.2: width 64" in capsys.readouterr().out
    with pytest.raises(
        SystemExit,
        match=r"does not say which module of the subject model it reads\. "
        r"Fix: name the module with --hookpoints '\.=MODULE'",
    ):
        register(tmp_path / "data", str(coders / "gemmascope" / GEMMA_SCOPE_ID))
    register(
        tmp_path / "data",
        str(coders / "gemmascope" / GEMMA_SCOPE_ID),
        "--hookpoints",
        ".=model.layers.3",
        "--name",
        "gs",
    )
    assert scan_registry(tmp_path / "data" / "registry") == [
        "gs/model.layers.3",
        "mine/model.layers.2",
    ]
    assert json.loads(
        (tmp_path / "data" / "registry" / "mine" / "model.layers.2" / "source.json").read_text()
    )["local"] == str(coders / "sparsify")
