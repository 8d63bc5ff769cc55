"""A table written batch by batch (the exemplars stage's way) reads back as the whole table, and a
check that refuses it before the last rename keeps the previous file."""

import pandas as pd
import pytest

from storage.tables import TABLES, write_table_batches


def rows(latents, n=3):
    return pd.DataFrame(
        [
            {
                **{c: None for c in TABLES["exemplars"].columns},
                "latent": latent,
                "split": "train",
                "kind": "activating",
                "quantile": 0,
                "sequence": latent,
                "start": i,
                "tokens": [1, 2, 3],
                "activations": [0.5, 0.0, 1.0],
            }
            for latent in latents
            for i in range(n)
        ],
        columns=TABLES["exemplars"].columns,
    )


def test_batches_read_back_as_one_table_and_a_refused_write_keeps_the_old(tmp_path):
    path = tmp_path / "00.parquet"
    batches = [rows([0, 1]), rows([]), rows([2]), rows([3, 4, 5])]
    assert write_table_batches(iter(batches), path, "exemplars") == 18
    pd.testing.assert_frame_equal(
        pd.read_parquet(path), pd.concat([b for b in batches if len(b)], ignore_index=True)
    )
    before = path.read_bytes()

    def refuse(n_rows):
        raise RuntimeError(f"refused {n_rows}")

    with pytest.raises(RuntimeError, match="refused 3"):
        write_table_batches(iter([rows([9])]), path, "exemplars", before_commit=refuse)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
    assert write_table_batches(iter([]), tmp_path / "empty.parquet", "exemplars") == 0
    assert list(pd.read_parquet(tmp_path / "empty.parquet").columns) == TABLES["exemplars"].columns
