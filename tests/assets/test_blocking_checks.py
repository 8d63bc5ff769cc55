"""A blocking check that fails on one shard stops what reads that shard, and only that shard: in a run of one
shard (Dagster's own blocking) and in a ranged run of several (`each_shard`), with real materializations."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    BackfillPolicy,
    DagsterEventType,
    DagsterInstance,
    MaterializeResult,
    asset,
    materialize,
)

from assets.checks import spec
from assets.partitions import each_shard, shard_partitions

KEYS = ["c/l|00", "c/l|01", "c/l|02"]
BAD = KEYS[1]
read = []
"""The (stage, shard)s the stages below the checked one ran on."""


@asset(
    partitions_def=shard_partitions,
    backfill_policy=BackfillPolicy.multi_run(3),
    output_required=False,
    check_specs=[
        spec("checked", "not_empty", "ERROR (blocking) on the middle shard", blocking=True),
        spec("checked", "looks_fine", "WARN only"),
    ],
)
def checked(context: AssetExecutionContext):
    def shard(key):
        return MaterializeResult(
            metadata={"shard": key},
            check_results=[
                AssetCheckResult(
                    check_name="not_empty", passed=key != BAD, severity=AssetCheckSeverity.ERROR
                ),
                AssetCheckResult(
                    check_name="looks_fine", passed=False, severity=AssetCheckSeverity.WARN
                ),
            ],
        )  # a WARN failure blocks nothing

    yield from each_shard(context, shard)


def reader_stage(name: str, parent: str):
    @asset(
        name=name,
        partitions_def=shard_partitions,
        backfill_policy=BackfillPolicy.multi_run(3),
        output_required=False,
        deps=[parent],
    )
    def stage(context: AssetExecutionContext):
        def shard(key):
            read.append((name, key))
            return MaterializeResult(metadata={"shard": key})

        yield from each_shard(context, shard)

    return stage


below, further = reader_stage("below", "checked"), reader_stage("further", "below")
ASSETS = [checked, below, further]


def instance_with_shards() -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shard", KEYS)
    return instance


def written(instance, run_id) -> list[tuple[str, str]]:
    return [
        (entry.dagster_event.asset_key.to_user_string(), entry.dagster_event.partition)
        for entry in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
    ]


def failure_messages(result) -> dict[str, str]:
    return {
        event.step_key: event.event_specific_data.error.message
        for event in result.all_events
        if event.event_type_value == "STEP_FAILURE"
    }


def test_a_failed_blocking_check_stops_the_stages_below_that_shard_alone_in_a_ranged_run():
    read.clear()
    instance = instance_with_shards()
    result = materialize(
        ASSETS,
        instance=instance,
        raise_on_error=False,
        tags={
            "dagster/asset_partition_range_start": KEYS[0],
            "dagster/asset_partition_range_end": KEYS[-1],
        },
    )
    assert not result.success
    assert read == [
        ("below", KEYS[0]),
        ("below", KEYS[2]),
        ("further", KEYS[0]),
        ("further", KEYS[2]),
    ]  # the other shards go on
    assert written(instance, result.run_id) == [("checked", key) for key in KEYS] + [
        (stage, key) for stage in ("below", "further") for key in (KEYS[0], KEYS[2])
    ]
    evaluations = {(e.check_name, e.partition): e for e in result.get_asset_check_evaluations()}
    assert not evaluations["not_empty", BAD].passed and evaluations["not_empty", BAD].blocking
    assert all(evaluations["not_empty", key].passed for key in (KEYS[0], KEYS[2]))
    failures = failure_messages(result)
    assert list(failures) == [
        "further"
    ]  # the last stage of the run fails the run, naming the shard and why
    assert (
        f"1 of 3 shards of this run failed ({BAD}: its below failed earlier in this run)"
        in failures["further"]
    )
    below_failed = [
        e.user_message
        for e in instance.all_logs(result.run_id)
        if e.step_key == "below" and BAD in e.user_message
    ]
    assert any(
        "its checked failed its blocking check not_empty earlier in this run" in message
        for message in below_failed
    )


def test_a_failed_blocking_check_fails_a_ranged_run_that_has_no_stage_after_it():
    read.clear()
    instance = instance_with_shards()
    result = materialize(
        [checked],
        instance=instance,
        raise_on_error=False,
        tags={
            "dagster/asset_partition_range_start": KEYS[0],
            "dagster/asset_partition_range_end": KEYS[-1],
        },
    )
    assert not result.success
    assert (
        sorted(instance.get_materialized_partitions(AssetKey("checked"))) == KEYS
    )  # written and recorded, all three
    assert (
        f"1 of 3 shards of this run failed ({BAD}: its blocking check not_empty failed"
        in failure_messages(result)["checked"]
    )


def test_a_failed_blocking_check_stops_the_stages_below_in_a_run_of_one_shard():
    read.clear()
    instance = instance_with_shards()
    results = {
        key: materialize(ASSETS, instance=instance, partition_key=key, raise_on_error=False)
        for key in KEYS
    }
    assert [key for key, result in results.items() if result.success] == [KEYS[0], KEYS[2]]
    assert read == [
        ("below", KEYS[0]),
        ("further", KEYS[0]),
        ("below", KEYS[2]),
        ("further", KEYS[2]),
    ]
    assert written(instance, results[BAD].run_id) == [("checked", BAD)]
    assert list(failure_messages(results[BAD])) == ["checked"]


def test_automation_leaves_alone_the_shard_that_failed_a_blocking_check():
    """The blocked shard is recorded as materialized: a later automation tick must not run the stages below on it."""
    from dagster import Definitions, evaluate_automation_conditions

    from assets.automation import FOLLOW

    @asset(
        name="below",
        partitions_def=shard_partitions,
        output_required=False,
        deps=["checked"],
        automation_condition=FOLLOW,
    )
    def automated(context: AssetExecutionContext):
        yield from each_shard(context, lambda key: MaterializeResult())

    defs = Definitions(assets=[checked, automated])
    for ranged in (True, False):
        instance = instance_with_shards()
        before = evaluate_automation_conditions(defs=defs, instance=instance)
        if ranged:
            materialize(
                [checked],
                instance=instance,
                raise_on_error=False,
                tags={
                    "dagster/asset_partition_range_start": KEYS[0],
                    "dagster/asset_partition_range_end": KEYS[-1],
                },
            )
        else:
            for key in KEYS:
                materialize([checked], instance=instance, partition_key=key, raise_on_error=False)
        after = evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
        (below_result,) = [r for r in after.results if r.key == AssetKey("below")]
        assert set(below_result.true_subset.expensively_compute_partition_keys()) == {
            KEYS[0],
            KEYS[2],
        }, ranged
