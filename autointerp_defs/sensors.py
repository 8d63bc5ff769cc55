"""The registry sensor: a sparse coder dropped into the registry becomes a `coder` partition.

The sensor only adds partitions (and asks for the corpus if there is none yet); declarative
automation then requests the new coders' activations, one backfill for all coders found in the
same tick, which runs as one forward pass (`BackfillPolicy.single_run`), and everything downstream.
Leaving the activations run to automation means it is requested once, by one party, and again
whenever it is missing with its inputs ready, e.g. once a missing corpus has been built.
"""

from dagster import AssetKey, DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from assets.partitions import coder_partitions
from resources.settings import AutointerpSettings
from resources.sparse_coders import RegistryError, inspect_registry

CORPUS = AssetKey("corpus")


@sensor(
    name="sparse_coder_registry",
    minimum_interval_seconds=30,
    asset_selection=[CORPUS],
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a `coder` partition for each new <name>/<hookpoint> folder in the registry, and builds the corpus if there is none; activations and everything downstream follow by automation.",
)
def registry_sensor(context: SensorEvaluationContext, settings: AutointerpSettings):
    try:
        registered, broken = inspect_registry(settings.root.registry_dir)
    except RegistryError as missing:
        return SkipReason(str(missing))  # said on every tick in the UI until the registry exists
    for key, problem in broken.items():  # one broken folder is reported, and never stops the others
        context.log.warning(f"registry folder {key} is not registered: {problem}")
    said = "".join(f"; not registered, {key}: {problem}" for key, problem in broken.items())
    known = set(context.instance.get_dynamic_partitions(coder_partitions.name))
    new = [key for key in registered if key not in known]
    if not new:
        return SkipReason(f"no new sparse coder in {settings.root.registry_dir} ({len(registered)} registered){said}")
    corpus_missing = context.instance.get_latest_materialization_event(CORPUS) is None
    requests = [RunRequest(run_key=f"corpus:{','.join(new)}", asset_selection=[CORPUS])] if corpus_missing else []
    return SensorResult(run_requests=requests, dynamic_partitions_requests=[coder_partitions.build_add_request(new)])
