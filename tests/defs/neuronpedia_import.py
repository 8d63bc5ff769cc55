"""Neuronpedia's import of an export folder, replayed against PostgreSQL: the judge of `autointerp export neuronpedia`.

Restates, in Python, hijohnnylin/neuronpedia ebb8426f: `apps/webapp/app/api/admin/import/route.ts` (the
steps, their order, which of them a try guards) and `apps/webapp/lib/db/import.ts` (`importConfigFromS3`,
`importJsonlString`), on the tables of `neuronpedia_schema.sql`:

0. config: upsert the explanation types and explainer models of Neuronpedia's own config (not part of an
   export; its names are those its code uses, see `CONFIG`);
1. release (inside a try: an error is logged and the import goes on), model, source set, source (outside
   one: an error stops the import), each created with Prisma unless a row with its key exists;
2. every `features/*.jsonl.gz` into `Neuron`, every `activations/*.jsonl.gz` into `Activation`, then the
   explanations in batches of 10,000 lines: `INSERT … SELECT … FROM jsonb_to_recordset(…) ON CONFLICT DO
   NOTHING` over the columns named by a batch's first line that the table has (other keys are dropped).

Prisma's checks before any SQL (unknown fields, nulls, value types) are restated in `prisma_create`.
"""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

SCHEMA = Path(__file__).with_name("neuronpedia_schema.sql")
BOT_USER = "clkht01d40000jv08hvalcvly"  # prisma/seed.ts: the creator of everything uploaded
EXPLANATION_BATCH = 10_000
INSERT_CHUNK = 65_000

# Neuronpedia's config rows come from its bucket (`importConfigFromS3`); the names are those its code uses:
# explainer types in utils/neuronpedia-utils/.../batch-autointerp.py and app/api/explanation/generate/route.tsx,
# explainer models in batch-autointerp.py (written there without the provider prefix).
CONFIG = {
    "ExplanationType": [
        "oai_token-act-pair",
        "oai_attention-head",
        "np_max-act-logits",
        "np_max-act",
        "np_acts-logits-general",
        "python-code",
        "eleuther_acts_top20",
    ],
    "ExplanationModelType": [
        "gpt-4o-mini",
        "gpt-4.1-nano",
        "gpt-5-nano-2025-08-07",
        "gpt-5-mini-2025-08-07",
        "gpt-5-nano",
        "gemini-2.0-flash",
        "gemini-2.0-flash-lite",
        "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
        "gpt-oss-120b",
    ],
}

# import.ts's column query: each column the first line names, with the type `jsonb_to_recordset` reads it as
COLUMN_TYPES = """
SELECT column_name,
       CASE WHEN data_type = 'ARRAY' THEN udt_name::regtype::text || '[]'
            WHEN data_type = 'USER-DEFINED' THEN udt_name::text
            ELSE data_type END
FROM information_schema.columns
WHERE table_name = %s AND column_name = ANY(%s)
ORDER BY ordinal_position
"""


class PrismaValidationError(ValueError):
    """What Prisma's client raises before it sends any SQL."""


def create_schema(url: str) -> None:
    """Neuronpedia's tables and the users its seed creates."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(SCHEMA.read_text())
        db.execute(
            'INSERT INTO "User" (id, name, bot, admin, "emailUnsubscribeCode")'
            " VALUES (%s, 'bot', true, true, 'seeded-bot')",
            [BOT_USER],
        )


def import_folder(url: str, folder: Path, explanations: str = "true") -> list[str]:
    """Import `<modelId>/<sourceId>` as the route does; returns the errors it logs and goes past,
    raises the one that stops it."""
    model_id = folder.parent.name
    logged = []
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("SET work_mem = '2GB'")
        for table, names in CONFIG.items():
            for name in names:
                row = {
                    "name": name,
                    "displayName": name,
                    "description": f"{name} (Neuronpedia config)",
                    "creatorName": "Neuronpedia",
                }
                prisma_upsert(
                    db, table, row | ({"creatorId": BOT_USER} if table == "ExplanationType" else {})
                )
        if explanations != "only":
            try:
                for line in _jsonl(folder / "release.jsonl"):
                    if not _exists(db, "SourceRelease", {"name": line["name"]}):
                        prisma_create(db, "SourceRelease", line)
            except Exception as error:  # noqa: BLE001 - the route logs it and goes on
                logged.append(f"release: {error}")
            for line in _jsonl(folder / "model.jsonl"):
                if not _exists(db, "Model", {"id": line["id"]}):
                    prisma_create(db, "Model", line)
            for line in _jsonl(folder / "sourceset.jsonl"):
                if not _exists(db, "SourceSet", {"modelId": model_id, "name": line["name"]}):
                    prisma_create(
                        db,
                        "SourceSet",
                        {**line, "urls": line["urls"] if line.get("urls") is not None else []},
                    )
            for line in _jsonl(folder / "source.jsonl"):
                if not _exists(db, "Source", {"modelId": model_id, "id": line["id"]}):
                    hosts = line.pop("inferenceHosts", None)
                    assert not hosts, "nested inference hosts are not replayed"
                    prisma_create(db, "Source", line)
            for optional in (
                "inference_hosts.jsonl",
                "inference_hosts_on_source.jsonl",
            ):  # inside a try: a missing file is logged
                assert not (folder / optional).exists(), f"{optional} is not replayed"
            for path in sorted((folder / "features").glob("*.jsonl.gz")):
                import_jsonl(db, "Neuron", gzip.open(path, "rt", encoding="utf-8").read())
            for path in sorted((folder / "activations").glob("*.jsonl.gz")):
                import_jsonl(db, "Activation", gzip.open(path, "rt", encoding="utf-8").read())
        if explanations in ("true", "only"):
            pending = []
            for path in sorted((folder / "explanations").glob("*.jsonl.gz")):
                for line in gzip.open(path, "rt", encoding="utf-8").read().strip().split("\n"):
                    if line.strip():
                        pending.append(line)
                    if len(pending) >= EXPLANATION_BATCH:
                        import_jsonl(db, "Explanation", "\n".join(pending))
                        pending = []
            if pending:
                import_jsonl(db, "Explanation", "\n".join(pending))
    return logged


def import_jsonl(db, table: str, text: str) -> None:
    """`importJsonlString`: the batch's first line names the columns; conflicts are skipped, any other error raised."""
    text = text.replace("\\u0000", " ")
    if table == "Activation":
        text = "\n".join(
            _split_z_indices(line) for line in text.strip().split("\n") if line.strip()
        )
    names = list(json.loads(text.strip().split("\n")[0]))
    columns = db.execute(COLUMN_TYPES, [table, names]).fetchall()
    listed = ", ".join(f'"{name}"' for name, _ in columns)
    typed = ", ".join(f'"{name}" {kind}' for name, kind in columns)
    query = (
        f'INSERT INTO "{table}" ({listed}) SELECT {listed}'
        f" FROM jsonb_to_recordset(%s::jsonb) AS t({typed}) ON CONFLICT DO NOTHING"
    )
    lines = text.strip().split("\n")
    for start in range(0, len(lines), INSERT_CHUNK):
        db.execute(query, ["[" + ",".join(lines[start : start + INSERT_CHUNK]) + "]"])


def _split_z_indices(line: str) -> str:
    """import.ts moves an activation's `zIndices` pair into `zKIndices` and `zQIndices`."""
    row = json.loads(line)
    pair = row.get("zIndices")
    if isinstance(pair, list):
        for key, part in zip(("zKIndices", "zQIndices"), pair, strict=False):
            if isinstance(part, list) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in part
            ):
                row[key] = part
    return json.dumps(row)


def prisma_create(db, table: str, data: dict) -> None:
    """`prisma.<table>.create({data})`: Prisma refuses unknown fields, nulls in required fields and values of the
    wrong type before it writes; the database then applies its defaults and constraints."""
    _check_with_prisma(db, table, data)
    listed = ", ".join(f'"{name}"' for name in data)
    db.execute(
        f'INSERT INTO "{table}" ({listed}) SELECT {listed} FROM jsonb_populate_record(NULL::"{table}", %s)',
        [Jsonb(data)],
    )


def prisma_upsert(db, table: str, data: dict) -> None:
    """`prisma.<table>.upsert({where: {name}, update: data, create: data})`."""
    _check_with_prisma(db, table, data)
    listed = ", ".join(f'"{name}"' for name in data)
    updates = ", ".join(f'"{name}" = EXCLUDED."{name}"' for name in data)
    db.execute(
        f'INSERT INTO "{table}" ({listed}) SELECT {listed}'
        f' FROM jsonb_populate_record(NULL::"{table}", %s)'
        f" ON CONFLICT (name) DO UPDATE SET {updates}",
        [Jsonb(data)],
    )


def _check_with_prisma(db, table: str, data: dict) -> None:
    columns = {
        name: (kind, element, nullable == "YES")
        for name, kind, element, nullable in db.execute(
            "SELECT column_name, data_type, udt_name, is_nullable FROM information_schema.columns"
            " WHERE table_name = %s",
            [table],
        ).fetchall()
    }
    for name, value in data.items():
        if name not in columns:
            raise PrismaValidationError(f"Unknown argument `{name}` for {table}")
        kind, element, nullable = columns[name]
        if value is None:
            if not nullable:
                raise PrismaValidationError(f"Argument `{name}` of {table} must not be null")
            continue
        if kind == "ARRAY":
            if not isinstance(value, list) or not all(_fits(x, element.lstrip("_")) for x in value):
                raise PrismaValidationError(
                    f"Argument `{name}` of {table}: {value!r} is not a list of {element.lstrip('_')}"
                )
        elif kind == "USER-DEFINED":
            labels = [
                r[0]
                for r in db.execute(
                    f'SELECT unnest(enum_range(NULL::"{element}"))::text'
                ).fetchall()
            ]
            if value not in labels:
                raise PrismaValidationError(
                    f"Argument `{name}` of {table}: {value!r} is none of {labels}"
                )
        elif not _fits(value, element):
            raise PrismaValidationError(
                f"Argument `{name}` of {table}: {value!r} is not a {element}"
            )


def _fits(value, udt: str) -> bool:
    if udt == "text":
        return isinstance(value, str)
    if udt == "bool":
        return isinstance(value, bool)
    if udt in ("int4", "int8"):
        return isinstance(value, int) and not isinstance(value, bool)
    if udt == "float8":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if udt == "timestamp":
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
            return "T" in value
        except (AttributeError, ValueError):
            return False
    return udt == "jsonb"


def _exists(db, table: str, where: dict) -> bool:
    condition = " AND ".join(f'"{name}" = %s' for name in where)
    return (
        db.execute(f'SELECT 1 FROM "{table}" WHERE {condition}', list(where.values())).fetchone()
        is not None
    )


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_neuronpedia(folder: Path) -> dict[str, list[dict]]:
    """Every row of an export folder, by table (features, activations, explanations, and the one-row tables)."""
    out = {
        table: [
            json.loads(line)
            for path in sorted((folder / table).glob("*.jsonl.gz"))
            for line in gzip.open(path, "rt", encoding="utf-8")
        ]
        for table in ("features", "activations", "explanations")
    }
    return out | {
        table: _jsonl(folder / f"{table}.jsonl")
        for table in ("release", "model", "sourceset", "source")
    }
