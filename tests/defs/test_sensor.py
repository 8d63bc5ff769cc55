"""A coder dropped into the registry becomes a partition and a run; the downstream stages follow."""

from dagster import (
    AssetKey,
    DagsterInstance,
    DefaultSensorStatus,
    Definitions,
    SkipReason,
    build_sensor_context,
    evaluate_automation_conditions,
    materialize,
)

from autointerp_defs.deployments import load_deployment
from autointerp_defs.sensors import registry_sensor_every
from resources.settings import AutointerpSettings
from tests.conftest import (
    TINY_CODER,
    TINY_CORPUS_CONFIG,
    TINY_HOOKPOINT,
    add_coders,
    all_assets,
    make_resources,
)

ALL_ASSETS = all_assets()
registry_sensor = registry_sensor_every(AutointerpSettings().sensor_interval_s)
"""The registry sensor at the default tick, as a deployment without `sensor_interval_s` builds it."""


def test_new_coder_before_the_corpus_asks_for_it_then_automation_does_the_rest(
    registered, tiny_sae
):
    from resources.sparse_coders import save_sparsify

    instance = DagsterInstance.ephemeral()
    resources = make_resources(registered)
    defs = Definitions(assets=ALL_ASSETS, resources=resources)

    with build_sensor_context(
        instance=instance, resources={"settings": resources["settings"]}
    ) as context:
        result = registry_sensor(context)
    keys = [f"{TINY_CODER}|{shard:02d}" for shard in range(8)]  # 1152 latents, 144 per shard
    assert result.dynamic_partitions_requests[0].partition_keys == keys
    assert [r.asset_selection for r in result.run_requests] == [
        [AssetKey("corpus")]
    ]  # no corpus yet: build it first
    instance.add_dynamic_partitions(
        "shard", list(result.dynamic_partitions_requests[0].partition_keys)
    )
    with build_sensor_context(
        instance=instance, resources={"settings": resources["settings"]}
    ) as context:
        assert isinstance(
            registry_sensor(context), SkipReason
        )  # the coder is known; nothing asked twice

    waiting = evaluate_automation_conditions(defs=defs, instance=instance)
    assert (
        requested(waiting, "activations") == requested(waiting, "exemplars") == 0
    )  # nothing runs on a missing corpus

    materialize(
        ALL_ASSETS,
        selection=["corpus"],
        resources=resources,
        instance=instance,
        run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
    )
    corpus_built = evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=waiting.cursor
    )
    assert (
        requested(corpus_built, "activations") == 8
    )  # the new coder's activations follow the corpus (one run: single-run backfill)
    assert materialize(
        ALL_ASSETS,
        selection=["activations"],
        resources=resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    ).success

    # automation (re)started after the activations landed: a fresh cursor still requests every missing shard
    restarted = evaluate_automation_conditions(defs=defs, instance=instance)
    assert requested(restarted, "exemplars") == requested(restarted, "explanations") == 8
    assert all(
        requested(restarted, f"scores/{name}") == 8
        for name in load_deployment("local").automated_scorers
    )  # the local deployment's automated scorers
    assert (
        requested(restarted, "scores/simulation") == requested(restarted, "scores/intruder") == 0
    )  # run on request only
    assert requested(restarted, "activations") == requested(restarted, "score_summary") == 0
    running = evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=corpus_built.cursor
    )
    assert requested(running, "exemplars") == 8  # and so does the automation that saw them arrive

    # a coder dropped once the corpus exists: only its partition; automation caches it
    save_sparsify(tiny_sae, registered / "registry" / "second" / TINY_HOOKPOINT)
    with build_sensor_context(
        instance=instance, resources={"settings": resources["settings"]}
    ) as context:
        second = registry_sensor(context)
    second_keys = add_coders(instance, registered, f"second/{TINY_HOOKPOINT}")
    assert (
        second.dynamic_partitions_requests[0].partition_keys == second_keys
        and len(second_keys) == 8
        and not second.run_requests
    )
    assert (
        requested(
            evaluate_automation_conditions(defs=defs, instance=instance, cursor=running.cursor),
            "activations",
        )
        == 8
    )


def test_automation_is_on_by_default_for_every_asset():
    from autointerp_defs import defs

    sensor = defs.resolve_sensor_def("autointerp_automation")
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    graph = defs.resolve_asset_graph()
    assert sensor.asset_selection.resolve(graph) == graph.get_all_asset_keys()


def requested(evaluation, asset: str) -> int:
    return sum(
        r.true_subset.size for r in evaluation.results if r.key == AssetKey.from_user_string(asset)
    )


def test_missing_registry_makes_the_sensor_skip_with_the_fix(tmp_path):
    with build_sensor_context(
        instance=DagsterInstance.ephemeral(),
        resources={"settings": AutointerpSettings(data_dir=str(tmp_path))},
    ) as context:
        skipped = registry_sensor(context)
    assert isinstance(skipped, SkipReason)
    assert (
        f"{tmp_path}/registry does not exist. Fix: run `autointerp register-embedded`"
        in skipped.skip_message
    )


def test_a_broken_registry_folder_is_reported_and_the_good_ones_still_register(
    registered, tiny_sae
):
    """Before, a cfg.json that is not JSON failed the sensor on every tick, so no coder registered."""
    from resources.sparse_coders import save_sparsify

    save_sparsify(tiny_sae, registered / "registry" / "also-good" / TINY_HOOKPOINT)
    broken = registered / "registry" / "broken" / TINY_HOOKPOINT
    save_sparsify(tiny_sae, broken)
    (broken / "cfg.json").write_text('{"k": 16,')
    instance = DagsterInstance.ephemeral()
    settings = AutointerpSettings(data_dir=str(registered))
    with build_sensor_context(instance=instance, resources={"settings": settings}) as context:
        result = registry_sensor(context)
    assert sorted(
        {key.rpartition("|")[0] for key in result.dynamic_partitions_requests[0].partition_keys}
    ) == [f"also-good/{TINY_HOOKPOINT}", TINY_CODER]
    instance.add_dynamic_partitions(
        "shard", list(result.dynamic_partitions_requests[0].partition_keys)
    )
    with build_sensor_context(instance=instance, resources={"settings": settings}) as context:
        skipped = registry_sensor(context)
    assert isinstance(skipped, SkipReason)
    assert (
        f"not registered, broken/{TINY_HOOKPOINT}:" in skipped.skip_message
        and "cfg.json is not valid JSON" in skipped.skip_message
    )


def test_sixteen_coders_dropped_at_once_register_in_one_tick_and_cache_in_one_pass(
    tmp_path, monkeypatch
):
    """The MLP neurons (1,536 latents: 11 shards of 144) of every other layer and the last one."""
    from storage.atomic import read_json
    from storage.layout import DataRoot
    from tests.conftest import save_neurons

    layers = [*range(0, 30, 2), 29]
    coders = [f"neurons{layer}/model.layers.{layer}.mlp.down_proj" for layer in layers]
    for key in coders:
        save_neurons(tmp_path / "registry" / key, d_in=1536, k=8)
    instance = DagsterInstance.ephemeral()
    resources = make_resources(tmp_path)
    with build_sensor_context(
        instance=instance, resources={"settings": resources["settings"]}
    ) as context:
        tick = registry_sensor(context)
    keys = list(tick.dynamic_partitions_requests[0].partition_keys)
    assert keys == [
        f"{coder}|{shard:02d}" for coder in sorted(coders) for shard in range(11)
    ]  # all 16 coders, 176 shards, one tick
    instance.add_dynamic_partitions("shard", keys)
    with build_sensor_context(
        instance=instance, resources={"settings": resources["settings"]}
    ) as context:
        assert isinstance(registry_sensor(context), SkipReason)

    defs = Definitions(assets=ALL_ASSETS, resources=resources)
    materialize(
        ALL_ASSETS,
        selection=["corpus"],
        resources=resources,
        instance=instance,
        run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
    )
    assert (
        requested(evaluate_automation_conditions(defs=defs, instance=instance), "activations")
        == 176
    )  # one request: one single-run backfill
    from resources import subject_model as subject_model_module

    forwards = []  # the hookpoints each forward pass read
    capture = subject_model_module.capture_hookpoints
    monkeypatch.setattr(
        subject_model_module,
        "capture_hookpoints",
        lambda lm, batch, sites: (
            forwards.append((len(batch), set(sites))) or capture(lm, batch, sites)
        ),
    )
    cached = materialize(
        ALL_ASSETS,
        selection=["activations"],
        resources=resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )
    assert cached.success
    assert sum(n for n, _ in forwards) == 48 and all(
        len(sites) == 16 for _, sites in forwards
    )  # each sequence forwarded once, for all 16
    root = DataRoot.at(tmp_path)
    for coder in (
        coders
    ):  # one forward pass served every coder: each saw the corpus's 48 sequences once, in this run
        meta = read_json(root.activations_dir(coder) / "meta.json")
        assert meta["sequences_forwarded_this_run"] == 48 and meta["n_shards"] == 11
