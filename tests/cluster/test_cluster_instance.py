"""The cluster's definitions and instance: the celery executor only there; op-granularity pools on PostgreSQL."""

from dagster import DagsterInstance

from assets.automation import LLM_POOL, SUBJECT_MODEL_POOL
from autointerp_defs.definitions import build_definitions
from autointerp_defs.instance import write_instance
from tests.cluster.conftest import needs_the_cluster_extra

needs_the_cluster_extra()

RUNNABLE = {"subject_model": {"model": "embedded"}}


def test_only_the_cluster_deployment_runs_its_steps_on_celery_workers():
    assert build_definitions("cluster", RUNNABLE).executor.name == "celery"
    assert build_definitions("local").executor is None


def test_the_cluster_instance_limits_steps_per_pool_on_postgres(
    tmp_path, monkeypatch, postgres_url
):
    monkeypatch.setenv("AUTOINTERP_POSTGRES_URL", postgres_url)
    write_instance(tmp_path, max_runs=6, llm_runs=16, gpus=8)
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        config = instance.get_concurrency_config()
        assert config.run_queue_config.max_concurrent_runs == 6
        assert config.pool_config.pool_granularity.value == "op"
        assert config.pool_config.op_granularity_run_buffer == 6
        assert (
            instance.run_monitoring_enabled
            and instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 60
        )
        assert (
            instance.run_monitoring_start_timeout_seconds == 600
            and instance.run_monitoring_max_runtime_seconds == 2 * 86400
        )
        assert instance.event_log_storage.get_concurrency_info(SUBJECT_MODEL_POOL).slot_count == 8
        assert instance.event_log_storage.get_concurrency_info(LLM_POOL).slot_count == 16


def test_a_worker_started_with_deployment_runs_its_steps_on_that_deployment(tmp_path, monkeypatch):
    """The steps a worker runs rebuild the definitions from `$AUTOINTERP_DEPLOYMENT`: `--deployment` must set it."""
    import os

    import autointerp_defs.cluster
    from autointerp_defs.cli import main
    from autointerp_defs.deployments import SELECTOR
    from tests.cluster.services import tiny_cluster_deployment

    path = tiny_cluster_deployment(tmp_path, tmp_path, "http://127.0.0.1:9/v1", None)
    started = []
    monkeypatch.delenv(SELECTOR, raising=False)
    monkeypatch.setattr(
        autointerp_defs.cluster,
        "run_worker",
        lambda deployment, *args: started.append((deployment.path, os.environ.get(SELECTOR))),
    )
    main(["--deployment", str(path), "worker", "--queue", "llm"])
    assert started == [(path, str(path))]
