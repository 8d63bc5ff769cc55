"""`[settings] partitions_per_run`: a backfill (or automation) puts several shards in one run, each
shard is written and recorded (with its own metadata) as if it had run alone, every stage of the
run's selection runs on them in turn, and a shard that fails lets the others finish and stay
recorded, and go through the later stages of the run without it."""

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetKey,
    BackfillPolicy,
    DagsterEventType,
    DagsterInstance,
    Definitions,
    Failure,
    MaterializeResult,
    ReexecutionOptions,
    asset,
    define_asset_job,
    definitions,
    execute_job,
    in_process_executor,
    instance_for_test,
    materialize,
    reconstructable,
)
from dagster._core.execution.api import execute_run
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
from dagster._core.storage.tags import BACKFILL_ID_TAG
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.backfill import execute_backfill_iteration
from dagster._utils.hosted_user_process import recon_job_from_origin

from assets import explanations as explanations_module
from assets.partitions import coder_and_shard, each_shard, shard_partitions
from autointerp_defs.definitions import build_definitions
from resources.llm import LLMResource
from storage.layout import DataRoot
from storage.tables import empty_table, write_table
from storage.vector_store import explanations_table_name, table_lock
from tests.conftest import (
    TINY_CODER,
    TINY_CORPUS_CONFIG,
    TINY_EXEMPLARS_CONFIG,
    add_coders,
    make_resources,
)
from tests.conftest import llm_resource as resource
from tests.scripted_llm_server import ScriptedLLMServer


def explainer(messages):
    return "Explanation: a scripted explanation"


def ranged(first: str, last: str) -> dict:
    return {
        "dagster/asset_partition_range_start": first,
        "dagster/asset_partition_range_end": last,
    }  # Dagster's documented range tags


def three_shards_cached(assets, root: Path):
    """An instance with the tiny coder's partitions, its corpus made and its activations cached;
    the first three shards' keys."""
    instance = DagsterInstance.ephemeral()
    keys = add_coders(instance, root, TINY_CODER)[:3]
    resources = make_resources(root, max_latents=2)
    assert materialize(
        assets,
        selection=["corpus"],
        resources=resources,
        instance=instance,
        run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
    ).success
    assert materialize(
        assets,
        selection=["activations"],
        resources=resources,
        instance=instance,
        tags=ranged(keys[0], keys[-1]),
    ).success
    return instance, keys, resources


def test_several_shards_per_run_and_a_failed_shard_spares_the_others(registered):
    defs = build_definitions("local", {"settings": {"partitions_per_run": 3}})
    graph = defs.resolve_asset_graph()
    for key in (AssetKey("exemplars"), AssetKey("explanations"), AssetKey(["scores", "detection"])):
        assert graph.get(key).backfill_policy == BackfillPolicy.multi_run(3)
    assert (
        build_definitions("local")
        .resolve_asset_graph()
        .get(AssetKey("explanations"))
        .backfill_policy
        is None
    )  # default: one shard a run
    assets = list(defs.assets)
    instance, keys, resources = three_shards_cached(assets, registered)

    # a backfill of the three shards under this policy is one run with the range tags (as Dagster's
    # backfill daemon launches it)
    exemplars = materialize(
        assets,
        selection=["exemplars"],
        resources=resources,
        instance=instance,
        tags=ranged(keys[0], keys[-1]),
        run_config={"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}},
    )
    assert exemplars.success
    assert set(instance.get_materialized_partitions(AssetKey("exemplars"))) == set(keys)
    recorded = {
        m.partition: m.metadata for m in exemplars.asset_materializations_for_node("exemplars")
    }
    assert sorted(recorded) == sorted(keys) and all(
        recorded[key]["path"].value.endswith(f"{key.split('|')[1]}.parquet") for key in keys
    )  # each shard's own metadata
    checked = {e.partition: e for e in exemplars.get_asset_check_evaluations()}
    assert sorted(checked) == sorted(keys) and all(
        e.check_name == "explainable_latents" and e.passed for e in checked.values()
    )  # each shard's own check
    root = DataRoot.at(registered)
    assert all(root.exemplars_path(*key.split("|")).exists() for key in keys)

    # the middle shard's exemplars are gone: its explanations fail, the other two are written, the run names it
    root.exemplars_path(*keys[1].split("|")).unlink()
    with ScriptedLLMServer(explainer) as server:
        resources = make_resources(registered, max_latents=2, llm=resource(server))
        result = materialize(
            assets,
            selection=["explanations"],
            resources=resources,
            instance=instance,
            tags=ranged(keys[0], keys[-1]),
            raise_on_error=False,
        )
    assert not result.success
    assert set(instance.get_materialized_partitions(AssetKey("explanations"))) == {
        keys[0],
        keys[2],
    }  # the written shards are recorded
    failure = next(event for event in result.all_events if event.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert (
        f"1 of 3 shards of this run failed ({keys[1]}: No exemplars" in message
        and f"written and recorded: {keys[0]}, {keys[2]}" in message
    )
    for key in (keys[0], keys[2]):
        table = pd.read_parquet(root.explanations_path(*key.split("|")))
        assert len(table) == 2 and (table.explanation == "a scripted explanation").all()
    assert not root.explanations_path(*keys[1].split("|")).exists()

    # the middle shard's exemplars come back and all three are explained; then its exemplars are empty, where its
    # explanations hold rows: that shard's write would empty a finished table, which fails it alone
    assert materialize(
        assets,
        selection=["exemplars"],
        resources=resources,
        instance=instance,
        partition_key=keys[1],
        run_config={"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}},
    ).success
    with ScriptedLLMServer(explainer) as server:
        resources = make_resources(registered, max_latents=2, llm=resource(server))
        assert materialize(
            assets,
            selection=["explanations"],
            resources=resources,
            instance=instance,
            tags=ranged(keys[0], keys[-1]),
        ).success
        write_table(empty_table("exemplars"), root.exemplars_path(*keys[1].split("|")), "exemplars")
        result = materialize(
            assets,
            selection=["explanations"],
            resources=resources,
            instance=instance,
            tags=ranged(keys[0], keys[-1]),
            raise_on_error=False,
        )
    assert not result.success
    recorded = instance.all_logs(result.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
    assert sorted(entry.dagster_event.partition for entry in recorded) == [
        keys[0],
        keys[2],
    ]  # written and recorded in this run
    message = next(
        event for event in result.all_events if event.event_type_value == "STEP_FAILURE"
    ).event_specific_data.error.message
    assert (
        f"1 of 3 shards of this run failed ({keys[1]}: "
        f"explanations of {keys[1].replace('|', ' shard ')}: this run has no results" in message
    )
    assert (
        len(pd.read_parquet(root.explanations_path(*keys[1].split("|")))) == 2
    )  # the finished table is kept


def judge(messages):
    """Explains every latent, and marks every other window of a detection prompt as activating."""
    if "Description" not in messages[-1]["content"]:
        return explainer(messages)
    return str([i % 2 for i in range(messages[-1]["content"].count("\nExample "))])


STAGES = [AssetKey("exemplars"), AssetKey("explanations"), AssetKey(["scores", "detection"])]


def test_a_ranged_run_materializes_every_stage_of_its_selection_for_each_shard_in_order(
    registered, monkeypatch
):
    defs = build_definitions("local", {"settings": {"partitions_per_run": 3}})
    assets = list(defs.assets)
    instance, keys, resources = three_shards_cached(assets, registered)
    selection = [key.to_user_string() for key in STAGES]
    with ScriptedLLMServer(judge) as server:
        resources = make_resources(registered, max_latents=2, llm=resource(server))
        result = materialize(
            assets,
            selection=selection,
            resources=resources,
            instance=instance,
            tags=ranged(keys[0], keys[-1]),
            run_config={"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}},
        )
    assert result.success and not [
        event for event in result.all_events if event.event_type_value == "STEP_SKIPPED"
    ]
    recorded = [
        (
            entry.dagster_event.asset_key,
            entry.dagster_event.partition,
            entry.dagster_event.step_materialization_data.materialization.metadata,
        )
        for entry in instance.all_logs(
            result.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
        )
    ]
    assert [(stage, partition) for stage, partition, _ in recorded] == [
        (stage, key) for stage in STAGES for key in keys
    ]  # once each, stage by stage
    assert all(metadata for _, _, metadata in recorded)  # each with its shard's own metadata
    for stage in STAGES:
        assert set(instance.get_materialized_partitions(stage)) == set(keys)
    root = DataRoot.at(registered)
    for key in keys:
        assert len(pd.read_parquet(root.scores_path(*key.split("|"), "detection"))) == 2

    # the middle shard's explanations fail this time: the scorer still runs on the other two in this run, and fails
    # the middle one without scoring the explanations it holds from before
    def middle_fails(partition_key):
        if partition_key == keys[1]:
            raise Failure("scripted failure of the middle shard")
        return coder_and_shard(partition_key)

    monkeypatch.setattr(explanations_module, "coder_and_shard", middle_fails)
    middle_scores = root.scores_path(*keys[1].split("|"), "detection").read_bytes()
    with ScriptedLLMServer(judge) as server:
        resources = make_resources(registered, max_latents=2, llm=resource(server))
        result = materialize(
            assets,
            selection=selection[1:],
            resources=resources,
            instance=instance,
            tags=ranged(keys[0], keys[-1]),
            raise_on_error=False,
        )
    assert not result.success
    recorded = [
        (entry.dagster_event.asset_key, entry.dagster_event.partition)
        for entry in instance.all_logs(
            result.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
        )
    ]
    assert recorded == [(asset, key) for asset in STAGES[1:] for key in (keys[0], keys[2])]
    failures = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"]
    assert [event.step_key for event in failures] == [
        "scores__detection"
    ]  # the last stage of the run fails it
    message = failures[0].event_specific_data.error.message
    assert (
        f"1 of 3 shards of this run failed ({keys[1]}: its explanations failed earlier in this run)"
        in message
    )
    assert f"written and recorded: {keys[0]}, {keys[2]}" in message
    assert root.scores_path(*keys[1].split("|"), "detection").read_bytes() == middle_scores


@asset(
    partitions_def=shard_partitions,
    backfill_policy=BackfillPolicy.multi_run(3),
    output_required=False,
)
def upper(context: AssetExecutionContext):
    def shard(key):
        if key.endswith("|01"):
            raise Failure("scripted failure of the middle shard")
        return MaterializeResult(metadata={"shard": key})

    yield from each_shard(context, shard)


@asset(
    partitions_def=shard_partitions,
    backfill_policy=BackfillPolicy.multi_run(3),
    output_required=False,
    deps=[upper],
)
def lower(context: AssetExecutionContext):
    yield from each_shard(context, lambda key: MaterializeResult(metadata={"shard": key}))


def upper_and_lower():
    return Definitions(
        assets=[upper, lower],
        jobs=[define_asset_job("upper_and_lower", executor_def=in_process_executor)],
    ).resolve_job_def("upper_and_lower")


def test_a_reexecution_from_failure_does_not_run_a_shard_whose_input_failed_in_the_run_it_reexecutes(
    tmp_path,
):
    keys = ["c|00", "c|01", "c|02"]
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        instance.add_dynamic_partitions("shard", keys)
        with execute_job(
            reconstructable(upper_and_lower), instance, tags=ranged(keys[0], keys[-1])
        ) as first:
            assert not first.success
            assert [
                event.step_key
                for event in first.all_events
                if event.event_type_value == "STEP_FAILURE"
            ] == ["lower"]
        # `upper` succeeded, so re-executing from failure runs `lower` alone: it must not take the
        # middle shard's `upper` as written
        with execute_job(
            reconstructable(upper_and_lower),
            instance,
            tags=ranged(keys[0], keys[-1]),
            reexecution_options=ReexecutionOptions.from_failure(first.run_id, instance),
        ) as again:
            assert not again.success
            recorded = instance.all_logs(
                again.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
            )
            assert [
                (entry.dagster_event.asset_key, entry.dagster_event.partition) for entry in recorded
            ] == [(lower.key, keys[0]), (lower.key, keys[2])]
            message = next(
                event for event in again.all_events if event.event_type_value == "STEP_FAILURE"
            ).event_specific_data.error.message
            assert (
                f"1 of 3 shards of this run failed ({keys[1]}: its upper failed in run "
                f"{first.run_id}, which this run re-executes)" in message
            )


@definitions
def backfill_location() -> Definitions:
    """The code location of the backfill test: the local deployment under `partitions_per_run = 3` on the test's data
    root and scripted LLM (named by environment variables: the daemon loads it by name), its steps in one process."""
    assets = build_definitions("local", {"settings": {"partitions_per_run": 3}}).assets
    llm = LLMResource(backend="openai", base_url=os.environ["BACKFILL_TEST_LLM_URL"], model="m")
    return Definitions(
        assets=assets,
        resources=make_resources(Path(os.environ["BACKFILL_TEST_DATA"]), max_latents=2, llm=llm),
        executor=in_process_executor,
    )


def test_a_backfill_of_n_shards_takes_n_over_k_runs_each_of_every_stage(registered, monkeypatch):
    launcher = {
        "module": "dagster._core.test_utils",
        "class": "MockedRunLauncher",
    }  # only records the runs it is asked to launch
    with (
        ScriptedLLMServer(judge) as server,
        instance_for_test({"run_launcher": launcher}, synchronous_run_coordinator=True) as instance,
    ):
        monkeypatch.setenv("BACKFILL_TEST_DATA", str(registered))
        monkeypatch.setenv("BACKFILL_TEST_LLM_URL", server.base_url)
        keys = add_coders(instance, registered, TINY_CODER)[:5]
        location = InProcessCodeLocationOrigin(
            LoadableTargetOrigin(module_name=__name__, attribute="backfill_location"),
            location_name="backfill_test",
        )
        with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(location)) as workspace:
            assets = list(backfill_location().assets)
            resources = make_resources(registered, max_latents=2)
            assert materialize(
                assets,
                selection=["corpus"],
                resources=resources,
                instance=instance,
                run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
            ).success
            assert materialize(
                assets,
                selection=["activations"],
                resources=resources,
                instance=instance,
                tags=ranged(keys[0], keys[-1]),
            ).success
            # as `dagster asset backfill` or the UI's "Materialize selected" over the five shards
            # asks the backfill daemon
            instance.add_backfill(
                PartitionBackfill.from_asset_partitions(
                    backfill_id="five_shards",
                    asset_graph=workspace.create_request_context().asset_graph,
                    partition_names=keys,
                    asset_selection=STAGES,
                    backfill_timestamp=time.time(),
                    tags={},
                    dynamic_partitions_store=instance,
                    all_partitions=False,
                    title=None,
                    description=None,
                    run_config={"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}},
                )
            )
            for _ in range(3):
                list(execute_backfill_iteration(workspace, logging.getLogger("backfill")))
                for run in instance.get_runs(
                    RunsFilter(statuses=[DagsterRunStatus.STARTING])
                ):  # the launched runs, outside the daemon's event loop as in their own processes
                    execute_run(recon_job_from_origin(run.job_code_origin), run, instance)
            assert instance.get_backfill("five_shards").status == BulkActionStatus.COMPLETED_SUCCESS
        runs = instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: "five_shards"}), ascending=True)
        assert [
            (
                run.asset_selection,
                run.tags["dagster/asset_partition_range_start"],
                run.tags["dagster/asset_partition_range_end"],
            )
            for run in runs
        ] == [
            (set(STAGES), keys[0], keys[2]),
            (set(STAGES), keys[3], keys[4]),
        ]  # ceil(5 / 3) runs, not 2 per stage
        for asset in STAGES:
            assert set(instance.get_materialized_partitions(asset)) == set(keys)


def test_a_ranged_step_asks_for_its_next_shard_while_it_writes_the_last_one(registered):
    """The endpoint does not idle while a shard of a range is written: while another writer holds the search vectors'
    table (the first shard's write waits for it), the second shard is asked, and not the third (one shard ahead)."""
    defs = build_definitions("local", {"settings": {"partitions_per_run": 3}})
    assets = list(defs.assets)
    instance, keys, _ = three_shards_cached(assets, registered)
    with ScriptedLLMServer(explainer) as server, ThreadPoolExecutor(max_workers=1) as pool:
        resources = make_resources(registered, max_latents=2, llm=resource(server))
        assert materialize(
            assets,
            selection=["exemplars"],
            resources=resources,
            instance=instance,
            tags=ranged(keys[0], keys[-1]),
            run_config={"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}},
        ).success
        with table_lock(
            DataRoot.at(registered).lancedb_dir,
            explanations_table_name(resources["embedder"].model),
        ):
            run = pool.submit(
                materialize,
                assets,
                selection=["explanations"],
                resources=resources,
                instance=instance,
                tags=ranged(keys[0], keys[-1]),
            )
            deadline = time.monotonic() + 90
            while len(server.requests) < 4 and time.monotonic() < deadline and not run.done():
                time.sleep(0.1)
            time.sleep(1)  # the third shard would have started by now if it could
            asked_while_the_first_waits = len(server.requests)
        assert run.result().success
    assert (
        asked_while_the_first_waits == 4
    )  # two latents a shard: the second shard's, not yet the third's
    assert len(server.requests) == 6
    recorded = [
        entry.dagster_event.partition
        for entry in instance.all_logs(
            run.result().run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
        )
    ]
    assert recorded == keys  # in the range's order
