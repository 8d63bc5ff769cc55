"""Fixtures of the latent browser's and the commands' tests: one materialized demo partition per session,
the viewer serving it (both the API tests and the browser tests use them), and the Dagster instance and
deployment the commands run on."""

import re
import threading

import pytest

from tests.conftest import TEST_LATENTS_PER_SHARD
from tests.materialized_partition import built_once


@pytest.fixture(scope="session")
def partition(request, tmp_path_factory, tiny_sae):
    return built_once(request.config, tmp_path_factory, tiny_sae)


@pytest.fixture()
def instance_home(tmp_path, monkeypatch):
    """A fresh instance like the one `make demo` writes, at $DAGSTER_HOME."""
    from autointerp_defs.instance import write_instance

    home = tmp_path / "dagster_home"
    write_instance(home)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def tiny_deployment(tmp_path) -> str:
    """The local deployment, cut into the tiny coder's shards as the test partition was."""
    from autointerp_defs.deployments import DEPLOYMENTS_DIR

    path = tmp_path / "tiny.toml"
    text, cut = re.subn(
        r"^max_latents_per_shard = \d+$",
        f"max_latents_per_shard = 4\nlatents_per_shard = {TEST_LATENTS_PER_SHARD}",
        (DEPLOYMENTS_DIR / "local.toml").read_text(),
        flags=re.MULTILINE,
    )
    assert cut == 1, (
        "local.toml has no `max_latents_per_shard = N` line to cut the tiny shards with"
    )
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def server(partition):
    from autointerp_defs.readside.server import make_server

    httpd = make_server(str(partition.root), port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def with_two_senses(partition, root, union_scored: bool = False) -> tuple[int, int]:
    """Copy the partition to `root` with its first explained latent explained as two senses, the
    first scored by detection on its own windows (0.9, control 0.4) and a sense text since replaced
    scored too (not to be shown). `union_scored`: the latent's detection row is of the union (else
    of the text before). Returns (that latent, the next)."""
    import shutil

    import pandas as pd

    from storage.layout import DataRoot
    from storage.tables import write_table

    shutil.copytree(partition.root, root, ignore=shutil.ignore_patterns("viewer", "llm_cache"))
    layout, coder, shard = DataRoot.at(root), partition.coder, partition.shard
    explained = pd.read_parquet(layout.explanations_path(coder, shard))
    several, other = (int(x) for x in explained[explained.status == "ok"].latent.iloc[:2])
    union = "digits inside parentheses or names inside quotation marks"
    explained.loc[explained.latent == several, "explanation"] = union
    explained.to_parquet(layout.explanations_path(coder, shard), index=False)
    write_table(
        pd.DataFrame(
            [
                {
                    "latent": several,
                    "sense": 1,
                    "explanation": "names inside quotation marks",
                    "windows": 3,
                    "clusters": [1],
                    "test_windows": [2],
                },
                {
                    "latent": several,
                    "sense": 0,
                    "explanation": "digits inside parentheses",
                    "windows": 5,
                    "clusters": [0],
                    "test_windows": [0, 1],
                },
            ]
        ),
        layout.explanation_senses_path(coder, shard),
        "explanation_senses",
    )
    scores = pd.read_parquet(layout.scores_path(coder, shard, "detection"))
    if union_scored:
        scores.loc[scores.latent == several, "explanation"] = union
        write_table(scores, layout.scores_path(coder, shard, "detection"), "scores")
    row = scores.iloc[:1]
    write_table(
        pd.concat(
            [
                row.assign(
                    latent=several,
                    sense=0,
                    explanation="digits inside parentheses",
                    balanced_accuracy=0.9,
                    control_balanced_accuracy=0.4,
                ),
                row.assign(
                    latent=several,
                    sense=1,
                    explanation="an older sense",
                    balanced_accuracy=0.7,
                    control_balanced_accuracy=0.5,
                ),
            ]
        ),
        layout.sense_scores_path(coder, shard, "detection"),
        "sense_scores",
    )
    return several, other
