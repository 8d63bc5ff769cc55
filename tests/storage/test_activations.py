import numpy as np

from storage.activations import (
    ShardedActivationWriter,
    read_latents,
    read_shard,
    shard_count,
    shard_keys,
    shard_latent_range,
    shard_of,
    shard_of_latents,
)


def test_shards_split_the_width_exactly_and_none_is_empty():
    for width, per_shard in [(1000, 144), (1024, 1024), (131072, 1024), (4608, 1024), (5, 1024)]:
        n = shard_count(width, per_shard)
        ranges = [shard_latent_range(width, per_shard, i) for i in range(n)]
        assert ranges[0][0] == 0 and ranges[-1][1] == width
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)) and all(
            lo < hi for lo, hi in ranges
        )
        assert (
            shard_of_latents(np.arange(width), per_shard)
            == np.repeat(np.arange(n), [hi - lo for lo, hi in ranges])
        ).all()
    assert shard_count(131072, 1024) == 128 and shard_count(4608, 1024) == 5
    assert shard_keys(3) == ["00", "01", "02"] and shard_keys(120)[-1] == "119"


def test_shard_of_names_the_shard_whose_range_holds_the_latent():
    for width, per_shard in [(1000, 144), (131072, 1024), (5, 1024)]:
        meta = {"latents_per_shard": per_shard, "n_shards": shard_count(width, per_shard)}
        for i, key in enumerate(shard_keys(meta["n_shards"])):
            start, end = shard_latent_range(width, per_shard, i)
            inside = (start, (start + end) // 2, end - 1)
            assert {shard_of(meta, latent) for latent in inside} == {key}


def test_writer_streams_chunks_and_reader_restores_every_pair(tmp_path):
    rng = np.random.default_rng(0)
    width, per_shard = 100, 25
    n_shards = shard_count(width, per_shard)
    batches = []
    writer = ShardedActivationWriter(tmp_path, width, per_shard)
    for b in range(20):
        loc = np.stack(
            [np.full(30, b), rng.integers(0, 16, 30), rng.integers(0, width, 30)], 1
        ).astype(np.int32)
        val = rng.random(30).astype(np.float32)
        writer.add(loc, val)
        if writer.buffered >= 50:
            writer.checkpoint()
        assert writer.buffered < 50  # what is buffered is bounded, however many pairs pass through
        batches.append((loc, val))
    assert (
        len(list((tmp_path / "shard-00").glob("chunk-*.safetensors"))) == writer.checkpoints == 10
    )
    writer.discard_chunks_from(9)
    assert len(list((tmp_path / "shard-00").glob("chunk-*.safetensors"))) == 9
    writer.checkpoints = 9
    writer.add(*batches[-2])
    writer.add(*batches[-1])
    writer.checkpoint()
    all_loc = np.concatenate([b[0] for b in batches])
    all_val = np.concatenate([b[1] for b in batches])
    total = 0
    for i, key in enumerate(shard_keys(n_shards)):
        shard = read_shard(tmp_path, key)
        lo, hi = shard_latent_range(width, per_shard, i)
        assert ((shard.locations[:, 2] >= lo) & (shard.locations[:, 2] < hi)).all()
        mask = (all_loc[:, 2] >= lo) & (all_loc[:, 2] < hi)
        assert np.isclose(shard.activations.sum(), all_val[mask].sum(), rtol=1e-5)
        for latent, loc, val in shard.by_latent():
            assert (loc[:, 2] == latent).all()
            assert np.isclose(val.sum(), all_val[all_loc[:, 2] == latent].sum(), rtol=1e-5)
        total += len(shard.activations)
    assert total == len(all_val)
    some = read_latents(tmp_path, np.array([3, 49, 50, 99, 3]), width, per_shard)
    wanted = np.isin(all_loc[:, 2], [3, 49, 50, 99])
    assert len(some.activations) == wanted.sum() and set(some.locations[:, 2]) == set(
        all_loc[wanted, 2]
    )


def test_json_files_stay_valid_json_when_a_number_is_nan(tmp_path):
    import json
    import math

    from storage.atomic import read_json, write_json

    write_json(tmp_path / "meta.json", {"fvu": float("nan"), "rates": [1.0, math.inf], "n": 3})
    text = (tmp_path / "meta.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert (
        json.loads(text)
        == read_json(tmp_path / "meta.json")
        == {"fvu": None, "rates": [1.0, None], "n": 3}
    )


def test_json_safe_is_the_one_conversion_of_numbers_for_json(tmp_path):
    """The browser's answers and the data root's JSON files turn NaN to null the same way, numpy
    values included."""
    from storage.atomic import json_safe, read_json, write_json

    value = {"max": np.float32("nan"), "ids": np.arange(2), 3: (np.int64(4), -np.inf, 0.5)}
    assert json_safe(value) == {"max": None, "ids": [0, 1], "3": [4, None, 0.5]}
    write_json(tmp_path / "v.json", value)
    assert read_json(tmp_path / "v.json") == json_safe(value)
