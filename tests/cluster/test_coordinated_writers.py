"""Every writer under the data root takes its lock through the deployment's coordination database when
it has one: the commands (`autointerp import delphi`, a run of the explanations asset, and `autointerp
cache`) as the assets do, and the vector tables' writers. A command that runs beside a holder on another
node is refused naming it."""

import json
import os
import re
import shutil
import socket
import threading
import time

import numpy as np
import pytest

from resources.settings import AutointerpSettings
from storage.coordination import exclusive
from tests.conftest import TINY_CODER, add_coders
from tests.defs.conftest import partition  # noqa: F401 (the materialized partition the import reads)


@pytest.fixture()
def deployment(tmp_path_factory, coordination_url) -> str:
    """A deployment file whose nodes coordinate through the test's database (the rest: defaults)."""
    path = tmp_path_factory.mktemp("deployment") / "coordinated.toml"
    path.write_text(f"[settings]\ncoordination_url = {json.dumps(coordination_url)}\n")
    return str(path)


def holder_here() -> str:
    """How a refused command names a holder in this process."""
    return re.escape(f"autointerp process {os.getpid()} on {socket.gethostname()}")


def test_import_delphi_is_refused_while_the_explanations_asset_holds_the_table(
    partition,  # noqa: F811 (the fixture imported above)
    tmp_path,
    deployment,
    coordination_url,
    monkeypatch,
):
    """The import is a run of the explanations asset, so it takes the same lock, in the same database."""
    from dagster import DagsterInstance

    from autointerp_defs.cli import main
    from autointerp_defs.instance import write_instance

    exports = tmp_path / "delphi"
    main(["--data", str(partition.root), "export", "delphi", partition.coder, str(exports)])
    out = exports / "smollm2-135m-instruct" / "tiny-topk"  # <dir>/<model>/<coder name>
    copy = tmp_path / "copy"
    shutil.copytree(partition.root, copy, ignore=shutil.ignore_patterns("viewer"))
    write_instance(tmp_path / "dagster_home")  # the instance the import runs on
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    with DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        add_coders(instance, copy, partition.coder)
    table = AutointerpSettings(
        data_dir=str(copy), coordination_url=coordination_url
    ).store.explanations(partition.coder, "00")
    before = table.path.read_bytes()
    importing = [
        "--deployment",
        deployment,
        "--data",
        str(copy),
        "import",
        "delphi",
        partition.coder,
        str(out),
    ]
    with table.lock(
        f"Explaining {partition.coder} shard 00", wait=True
    ):  # as the explanations asset holds it, on any node
        with pytest.raises(
            SystemExit,
            match=rf"Writing the explanations of {re.escape(partition.coder)} shard 00 .* "
            rf"is already running in {holder_here()}\. Fix: wait",
        ):
            main(importing)
    assert table.path.read_bytes() == before
    main(importing)  # once it is free, the import goes through
    assert table.path.read_bytes() != before


def test_cache_is_refused_while_another_node_caches_the_coder(
    registered, deployment, coordination_url
):
    from autointerp_defs.cli import main

    with exclusive(
        coordination_url,
        f"activations {TINY_CODER}",
        registered / "elsewhere.lock",
        "another node's cache",
    ):  # the database decides, not a file
        with pytest.raises(
            SystemExit,
            match=rf"Caching the activations of {re.escape(TINY_CODER)} "
            rf"is already running in {holder_here()}\. Fix: wait",
        ):
            main(["--deployment", deployment, "--data", str(registered), "cache", TINY_CODER])


def test_a_vector_tables_writer_waits_for_the_holder_on_another_node(tmp_path, coordination_url):
    from storage.vector_store import explanations_table_name, open_explanations, sync_explanations

    db_dir, synced = tmp_path / "lancedb", threading.Event()

    def sync():
        sync_explanations(
            db_dir,
            "ones-8",
            "c/h",
            "00",
            {0: "a word", 1: "a number"},
            lambda texts: np.ones((len(texts), 8)),
            coordination_url=coordination_url,
        )
        synced.set()

    with exclusive(
        coordination_url,
        f"vector table {explanations_table_name('ones-8')}",
        tmp_path / "elsewhere.lock",
        "another node's sync",
        wait=True,
    ):
        writer = threading.Thread(target=sync)
        writer.start()
        time.sleep(1.0)
        assert not synced.is_set()  # it waits for the holder
    writer.join(timeout=60)
    assert synced.is_set() and open_explanations(db_dir, "ones-8").count_rows() == 2
    assert not list(db_dir.glob(".*.lock"))  # no lock file on the (shared) data root
