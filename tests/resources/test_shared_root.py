"""With `[settings] shared_data_root`, a step on a node whose data root is not the instance's (an empty
folder where the shared filesystem is not mounted, or another root) fails before it reads anything,
naming the mount and the fix; the default single-machine settings never check."""

import json

from dagster import DagsterInstance, materialize

from resources.settings import AutointerpSettings, adopt_root
from resources.subject_model import SubjectModelResource
from storage.layout import DataRoot
from tests.conftest import TINY_CORPUS_CONFIG


def corpus_run(instance, root, shared=True):
    from assets.corpus import corpus_asset

    corpus = corpus_asset()
    resources = {
        "settings": AutointerpSettings(data_dir=str(root), shared_data_root=shared),
        "subject_model": SubjectModelResource(batch_size=8),
    }
    return materialize(
        [corpus],
        resources=resources,
        instance=instance,
        run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
        raise_on_error=False,
    )


def failure_of(result) -> str:
    """Every failure's message with its causes' (Dagster wraps a resource's error)."""

    def chain(error):
        return [error.message, *chain(error.cause)] if error is not None else []

    return "\n".join(
        m
        for event in result.all_events
        if event.is_failure and event.event_specific_data.error
        for m in chain(event.event_specific_data.error)
    )


def test_a_step_on_a_node_without_the_shared_root_fails_at_once_naming_the_mount(
    tmp_path, monkeypatch
):
    instance = DagsterInstance.ephemeral()
    shared, unmounted, other = tmp_path / "shared", tmp_path / "unmounted", tmp_path / "other"
    assert corpus_run(instance, shared).success  # the first step records the root it ran on
    identity = json.loads(DataRoot.at(shared).identity_path.read_text())["id"]

    result = corpus_run(instance, unmounted)
    assert not result.success
    message = failure_of(result)
    assert (
        f"This node's data root {unmounted} (on the mount /" in message
        and "has no identity file" in message
        and "autointerp adopt-root" in message
    )
    assert not (unmounted / "corpus").exists()  # nothing read or written there

    DataRoot.at(other).root.mkdir()
    adopt_root(DagsterInstance.ephemeral(), DataRoot.at(other))  # a root made for another instance
    assert f"is not the instance's {identity}" in failure_of(corpus_run(instance, other))
    assert corpus_run(instance, shared).success

    assert corpus_run(
        instance, unmounted, shared=False
    ).success  # the single-machine default does not check

    monkeypatch.setenv(
        "DAGSTER_HOME", str(tmp_path / "home")
    )  # `autointerp adopt-root` on a persistent instance
    (tmp_path / "home").mkdir()
    from autointerp_defs.cli import main

    main(["--data", str(other), "adopt-root"])
    with DagsterInstance.get() as persistent:
        assert corpus_run(persistent, other).success
        assert not corpus_run(persistent, shared).success


def test_two_processes_making_the_identity_at_once_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from storage.root_adoption import root_identity

    with ThreadPoolExecutor(8) as pool:
        made = set(pool.map(lambda _: root_identity(DataRoot.at(tmp_path), create=True), range(16)))
    assert len(made) == 1 and None not in made
