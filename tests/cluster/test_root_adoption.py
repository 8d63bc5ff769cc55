"""With a coordination database, the shared data root is adopted by one compare-and-set there: two
nodes with different roots (one an empty, unmounted folder) starting together, exactly one adopts its
own, and the other fails before reading anything, naming both roots and their mounts."""

import threading
from concurrent.futures import ThreadPoolExecutor

from dagster import DagsterInstance, build_init_resource_context

from resources.settings import AutointerpSettings, NotTheSharedRoot
from storage.root_adoption import mount_of


def test_two_nodes_with_different_roots_starting_together_one_adopts_and_the_other_fails_naming_both(
    tmp_path, coordination_url
):
    instance = DagsterInstance.ephemeral()  # what both nodes' steps share besides the database
    roots = [tmp_path / "shared", tmp_path / "unmounted"]
    together = threading.Barrier(len(roots))

    def start(root) -> str | None:
        """A node's first step: its settings resource checks its root. The failure's message, or None."""
        settings = AutointerpSettings(
            data_dir=str(root), shared_data_root=True, coordination_url=coordination_url
        )
        together.wait()
        try:
            settings.setup_for_execution(build_init_resource_context(instance=instance))
        except NotTheSharedRoot as refused:
            return str(refused)
        return None

    with ThreadPoolExecutor(len(roots)) as pool:
        outcomes = list(pool.map(start, roots))
    assert sorted(outcome is None for outcome in outcomes) == [False, True], (
        outcomes
    )  # exactly one adopted
    adopted, refused = (roots[0], roots[1]) if outcomes[0] is None else (roots[1], roots[0])
    message = next(outcome for outcome in outcomes if outcome)
    assert f"This node's data root {refused} (on the mount {mount_of(refused)})" in message
    assert (
        f"({adopted} on the mount {mount_of(adopted)} of " in message
        and "Nothing was read" in message
    )

    later = AutointerpSettings(
        data_dir=str(adopted), shared_data_root=True, coordination_url=coordination_url
    )
    later.setup_for_execution(
        build_init_resource_context(instance=DagsterInstance.ephemeral())
    )  # the record is the database's: any instance agrees
