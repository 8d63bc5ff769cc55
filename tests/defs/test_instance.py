"""The instance `make ui` writes: run limits that fit the machine, pools on the assets, no new-user dialog."""

from dagster import DagsterInstance, asset, materialize

from assets.automation import LLM_POOL, QUEUE_TAG, SUBJECT_MODEL_POOL
from autointerp_defs.instance import write_instance


def test_instance_limits_runs_and_pools_and_hides_the_new_user_dialog(tmp_path):
    write_instance(tmp_path, max_runs=3, llm_runs=2)
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.nux_enabled is False
        config = instance.get_concurrency_config()
        assert config.run_queue_config.max_concurrent_runs == 3
        assert config.pool_config.pool_granularity.value == "run"
        assert instance.event_log_storage.get_concurrency_info(SUBJECT_MODEL_POOL).slot_count == 1
        assert instance.event_log_storage.get_concurrency_info(LLM_POOL).slot_count == 2

        @asset(pool=LLM_POOL)
        def in_process() -> int:
            return 1

        assert materialize(
            [in_process], instance=instance
        ).success  # in-process runs (the demo) are not held back


def test_runs_on_the_instance_print_info_not_dagsters_debug_event_lines(tmp_path, capfd):
    write_instance(tmp_path)

    @asset
    def talkative(context) -> int:
        context.log.info("a step's own message")
        return 1

    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert materialize(
            [talkative], instance=instance
        ).success  # no run config: as automation and backfills launch runs
    printed = capfd.readouterr().err
    assert "a step's own message" in printed and " - DEBUG - " not in printed


def test_assets_that_load_the_subject_model_or_wait_on_the_llm_are_in_their_pools():
    from autointerp_defs import defs

    graph = defs.resolve_asset_graph()
    pools = {key.to_user_string(): graph.get(key).pools for key in graph.get_all_asset_keys()}
    assert pools["activations"] == pools["scores/surprisal"] == {SUBJECT_MODEL_POOL}
    assert all(
        pools[name] == {LLM_POOL}
        for name in (
            "explanations",
            "scores/detection",
            "scores/fuzzing",
            "scores/intruder",
            "scores/simulation",
            "scores/saebench",
            "calibration",
        )
    )
    assert not pools["corpus"] and not pools["score_summary"] and not pools["scores/embedding"]


def test_each_asset_step_goes_to_the_cluster_queue_of_its_pool():
    from autointerp_defs import defs

    queues = {spec.node_def.name: spec.node_def.tags[QUEUE_TAG] for spec in defs.assets}
    assert {name for name, queue in queues.items() if queue == "gpu"} == {
        "activations",
        "scores__surprisal",
        "scores__intervention",
        "scores__output_judge",
    }
    assert {name for name, queue in queues.items() if queue == "llm"} == {
        "explanations",
        "scores__detection",
        "scores__fuzzing",
        "scores__intruder",
        "scores__simulation",
        "scores__saebench",
        "calibration",
    }
    assert {name for name, queue in queues.items() if queue == "cpu"} == {
        "corpus",
        "exemplars",
        "scores__embedding",
        "score_summary",
    }
