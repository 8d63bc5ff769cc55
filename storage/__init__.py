"""On-disk formats of autointerp: the data root layout, activation shards, parquet tables, LanceDB."""
