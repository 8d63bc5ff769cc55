"""Settings shared by every stage: where data lives, how much of each shard a run explains, and where
the latent browser and the Dagster UI are reached (for the links between them)."""

from __future__ import annotations

from dagster import ConfigurableResource, DagsterInstance, InitResourceContext
from pydantic import Field

from storage.layout import DataRoot
from storage.root_adoption import claimed_root, mount_of, replace_root, root_identity
from storage.store import TableStore

ROOT_KEY = "autointerp/data_root"
"""Where the instance records the identity of the data root its runs use (its key-value store), when
there is no coordination database (which records it instead, race-free: `storage.root_adoption`)."""


class NotTheSharedRoot(RuntimeError):
    """This node's data root is not the one the instance's runs use: an empty, unmounted or private folder."""


def adopt_root(instance: DagsterInstance, root: DataRoot, coordination_url: str = "") -> str:
    """Record `root` as the instance's data root (made on the first step, or by `autointerp adopt-root`
    when a root is meant to replace the old one), in the coordination database when there is one.
    Returns its identity."""
    if coordination_url:
        return replace_root(coordination_url, root)
    identity = root_identity(root, create=True)
    instance.run_storage.set_cursor_values({ROOT_KEY: identity})
    return identity


def _recorded_root(instance: DagsterInstance, root: DataRoot, coordination_url: str) -> dict:
    """The root the instance's runs use, `root` if none was recorded yet: claimed by one compare-and-set
    in the coordination database, else read then set in the instance (which two nodes may both do)."""
    if coordination_url:
        return claimed_root(coordination_url, root)
    recorded = instance.run_storage.get_cursor_values({ROOT_KEY}).get(ROOT_KEY)
    return {"identity": recorded or adopt_root(instance, root)}


def check_shared_root(
    instance: DagsterInstance, root: DataRoot, coordination_url: str = ""
) -> None:
    """Fail at once, before anything is read, where this node's root is not the instance's shared root."""
    recorded = _recorded_root(instance, root, coordination_url)
    here = root_identity(root, create=False)
    if here == recorded["identity"]:
        return
    theirs = recorded["identity"] + (
        f" ({recorded['path']} on the mount {recorded['mount']} of {recorded['node']})"
        if "path" in recorded
        else ""
    )
    why = (
        "it has no identity file (an empty folder, or the shared filesystem is not mounted), "
        f"where the instance's is {theirs}"
        if here is None
        else f"its identity {here} is not the instance's {theirs}"
    )
    raise NotTheSharedRoot(
        f"This node's data root {root.root} (on the mount {mount_of(root.root)}) "
        f"is not the shared root this instance's runs use: {why}. Nothing was read. "
        f"Fix: mount the shared data root at {root.root} on this node "
        "(or point [settings] data_dir at it); if this root is meant to replace the old one, "
        "run `autointerp adopt-root` once."
    )


class AutointerpSettings(ConfigurableResource):
    data_dir: str = Field(
        default="data",
        description="Root of all stored data; a relative path is relative to the working directory.",
    )
    latents_per_shard: int = Field(
        default=1024,
        ge=1,
        description="Latents per shard partition: "
        "a coder of width W gets ceil(W / latents_per_shard) partitions. "
        "About five minutes of LLM work at 32 requests in flight "
        "(README: shard size); set when a coder is registered "
        "(changing it later gives newly registered coders the new size).",
    )
    partitions_per_run: int = Field(
        default=1,
        ge=1,
        description="Shards of exemplars, explanations and scores that one run of a backfill "
        "(or of automation) takes (Dagster's BackfillPolicy.multi_run above 1). "
        "1: every shard succeeds or fails alone. More spreads a run's fixed cost (~10 s) "
        "over them, for endpoints fast enough that it shows (README: shard size); "
        "a shard that fails still lets the others of its run finish.",
    )
    sensor_interval_s: int = Field(
        default=30,
        ge=1,
        description=(
            "Seconds between the ticks of the registry sensor and of the automation sensor (Dagster's default): "
            "at most how long a dropped coder, or a stage that finished, waits before its next run is asked for. "
            "Each tick costs the daemon some CPU."
        ),
    )
    max_latents_per_shard: int = Field(
        default=0,
        description="Explain and score at most this many live latents per shard (0 = all). "
        "The CPU deployment keeps it small.",
    )
    viewer_url: str = Field(
        default="http://127.0.0.1:8080",
        description="Where the latent browser (`autointerp view`) is reached: "
        "the `explanations` and `score_summary` metadata link to its coder and latent pages.",
    )
    dagster_url: str = Field(
        default="http://127.0.0.1:3000",
        description="Where the Dagster UI is reached: the latent browser's pages link to their asset partitions there.",
    )
    coordination_url: str = Field(
        default="",
        description="A PostgreSQL URL (postgresql://user@host:5432/db, "
        "one database per data root) through which the nodes of a cluster coordinate: "
        "the lock on each coder's activation cache, the tables' and vector tables' write locks "
        "(leases checked before each commit), the LLM endpoint's request limit, "
        "the LLM response cache and the record of the shared data root are held there instead of "
        "in files under the data root or the instance. Its password comes from PGPASSWORD or "
        "~/.pgpass, not from this setting. Empty: one machine, files.",
    )
    allow_empty_results: bool = Field(
        default=False,
        description="Let a run whose table is empty replace one that holds results "
        "(a deliberate re-run); off, such a run fails and the table is kept.",
    )

    shared_data_root: bool = Field(
        default=False,
        description="The data root is one filesystem shared by every node "
        "(the cluster deployment): each step first checks that its node sees the instance's root "
        "(an identity file recorded in the instance) and fails at once naming the mount where it "
        "does not, never reading stale data from a private folder.",
    )

    def setup_for_execution(self, context: InitResourceContext) -> None:
        if self.shared_data_root and context.instance is not None:
            check_shared_root(context.instance, self.root, self.coordination_url)

    @property
    def root(self) -> DataRoot:
        return DataRoot.at(self.data_dir)

    @property
    def store(self) -> TableStore:
        """The owner of every table under the data root: assets read and write through it."""
        return TableStore(self.root, self.allow_empty_results, self.coordination_url)
