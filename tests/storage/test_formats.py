"""The format tables of docs/formats.md say what `storage/` defines: same tables, same columns,
same types, same files."""

import re
from pathlib import Path

from storage.activations import DECODER_DIRECTIONS_FILE, LATENT_STATS_FILE, META_FILE, PROGRESS_FILE
from storage.tables import TABLES

FORMATS = (Path(__file__).resolve().parents[2] / "docs" / "formats.md").read_text()


def readme_tables() -> dict[str, list[tuple[str, str]]]:
    """`### `name`` headings → their (column, type) rows."""
    found = {}
    for match in re.finditer(
        r"^### `(\w+)`.*?\n\n\| column \| type \| meaning \|\n\| --- \| --- \| --- \|\n((?:\|.*\|\n)+)",
        FORMATS,
        re.MULTILINE,
    ):
        rows = [line.split("|")[1:3] for line in match.group(2).strip().splitlines()]
        found[match.group(1)] = [(column.strip().strip("`"), kind.strip()) for column, kind in rows]
    return found


def test_every_table_is_documented_with_its_columns_and_types_in_order():
    documented = readme_tables()
    assert set(documented) == set(TABLES)
    for name, table in TABLES.items():
        assert documented[name] == [(field.name, str(field.type)) for field in table.schema], name


def test_the_activation_cache_and_corpus_files_are_documented():
    cache = FORMATS[FORMATS.index("## Activation cache") : FORMATS.index("## Corpus")]
    for name in (
        LATENT_STATS_FILE,
        PROGRESS_FILE,
        META_FILE,
        "chunk-NNNNN.safetensors",
        "stats.partial-NNNNN.safetensors",
        DECODER_DIRECTIONS_FILE,
    ):
        assert f"`{name}" in cache or f"/{name}`" in cache, name
    for tensor in ("locations", "activations", "count", "max", "sum", "tokens"):
        assert f"| `{tensor}` |" in cache, tensor
    corpus = FORMATS[FORMATS.index("## Corpus") : FORMATS.index("## Tables")]
    assert all(f"`{f}`" in corpus for f in ("tokens.safetensors", "vocab.json", "meta.json"))
