"""The registry sensor: a sparse coder dropped into the registry becomes a `coder` partition and a run."""

from dagster import AssetKey, DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from assets.partitions import coder_partitions
from resources.settings import AutointerpSettings
from resources.sparse_coders import RegistryError, scan_registry


@sensor(
    name="sparse_coder_registry",
    minimum_interval_seconds=30,
    asset_selection=[AssetKey("activations")],
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a `coder` partition for each new <name>/<hookpoint> folder in the registry and caches the new coders' activations in one run; the downstream assets follow by automation.",
)
def registry_sensor(context: SensorEvaluationContext, settings: AutointerpSettings):
    try:
        registered = scan_registry(settings.root.registry_dir)
    except RegistryError as missing:
        return SkipReason(str(missing))  # said on every tick in the UI until the registry exists
    known = set(context.instance.get_dynamic_partitions(coder_partitions.name))
    new = [key for key in registered if key not in known]
    if not new:
        return SkipReason(f"no new sparse coder in {settings.root.registry_dir} ({len(registered)} registered)")
    # New keys are appended to the partition in order, so [first, last] spans exactly them: one run,
    # one forward pass of the subject model for all of them.
    request = RunRequest(
        run_key=f"activations:{','.join(new)}",
        asset_selection=[AssetKey("activations")],
        **({"partition_key": new[0]} if len(new) == 1 else {"tags": {ASSET_PARTITION_RANGE_START_TAG: new[0], ASSET_PARTITION_RANGE_END_TAG: new[-1]}}),
    )
    return SensorResult(run_requests=[request], dynamic_partitions_requests=[coder_partitions.build_add_request(new)])
