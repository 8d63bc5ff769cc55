"""The registry sensor: a sparse coder dropped into the registry becomes its shard partitions.

Each new coder gets ceil(width / latents_per_shard) partitions `<coder>|NN`, all in one tick, and
the sensor asks for the corpus if there is none yet; declarative automation then requests the new
shards' activations (one backfill for every coder found in the same tick, which runs as one
forward pass: `BackfillPolicy.single_run`) and everything downstream. Leaving the activations run
to automation means it is requested once, by one party, and again whenever it is missing with its
inputs ready, e.g. once a missing corpus has been built.
"""

from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from assets.partitions import coders_of, shard_partition_keys, shard_partitions
from resources.settings import AutointerpSettings
from resources.sparse_coders import RegistryError, inspect_registry, registered_width

CORPUS = AssetKey("corpus")
DESCRIPTION = (
    "Adds the shard partitions (<coder>|NN, one per latents_per_shard latents) of each new <name>/<hookpoint> "
    "folder in the registry, and builds the corpus if there is none; activations and everything downstream "
    "follow by automation."
)


def new_shard_keys(
    registry, coders: list[str], latents_per_shard: int, broken: dict[str, str]
) -> tuple[list[str], list[str]]:
    """(partition keys, coders added) for `coders`; one whose width cannot be read goes into
    `broken` and never stops the others."""
    keys, added = [], []
    for coder in coders:
        try:
            keys += shard_partition_keys(
                coder, registered_width(registry, coder), latents_per_shard
            )
            added.append(coder)
        except Exception as error:
            broken[coder] = f"{type(error).__name__}: {str(error)[:300]}"
    return keys, added


def registry_tick(context: SensorEvaluationContext, settings: AutointerpSettings):
    """One tick of the registry sensor."""
    try:
        registered, broken = inspect_registry(settings.root.registry_dir)
    except RegistryError as missing:
        return SkipReason(str(missing))  # said on every tick in the UI until the registry exists
    known = set(coders_of(context.instance.get_dynamic_partitions(shard_partitions.name)))
    new_keys, added = new_shard_keys(
        settings.root.registry_dir,
        [key for key in registered if key not in known],
        settings.latents_per_shard,
        broken,
    )
    for key, problem in broken.items():
        context.log.warning(f"registry folder {key} is not registered: {problem}")
    said = "".join(f"; not registered, {key}: {problem}" for key, problem in broken.items())
    if not added:
        return SkipReason(
            f"no new sparse coder in {settings.root.registry_dir} ({len(registered)} registered){said}"
        )
    context.log.info(
        f"registering {len(added)} coders as {len(new_keys)} shard partitions of at most "
        f"{settings.latents_per_shard} latents"
    )
    corpus_missing = context.instance.get_latest_materialization_event(CORPUS) is None
    requests = (
        [RunRequest(run_key=f"corpus:{','.join(added)}", asset_selection=[CORPUS])]
        if corpus_missing
        else []
    )
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[shard_partitions.build_add_request(new_keys)],
    )


def registry_sensor_every(interval_s: int) -> SensorDefinition:
    """The registry sensor, ticking every `interval_s` seconds (`[settings] sensor_interval_s`)."""
    return sensor(
        name="sparse_coder_registry",
        minimum_interval_seconds=interval_s,
        asset_selection=[CORPUS],
        default_status=DefaultSensorStatus.RUNNING,
        description=DESCRIPTION,
    )(registry_tick)
