"""`indexer migrate`: numbered SQL files, each in one transaction, recorded in a version table."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from indexer.config import mask_url

log = logging.getLogger(__name__)

VERSION_TABLE = "indexer_schema_version"
_LOCK_ID = 0x1DE8_0001  # pg_advisory_lock key: one migrator at a time
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


# PostgreSQL compares text bytewise only under the collation C (or POSIX, or PostgreSQL 17's
# builtin provider); under any other locale every comparison in an index on a uri or a did goes
# through the C library's or ICU's collation. On a database made with en_US.UTF-8, the postgres
# image's default, the indexer ran at 0.56 to 0.81 of its rate on one made with C, and on
# C.UTF-8 at 0.91 to 0.93 (bench/RESULTS.md, 2026-12-06, eighth pass).
_FAST_COLLATIONS = frozenset({"C", "POSIX"})
_DATABASE = "SELECT row_to_json(d)::text FROM pg_database d WHERE datname = current_database()"


class SchemaNotReady(RuntimeError):
    """The database lacks migrations this code needs."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def sql_dir() -> Path:
    """`sql/` beside the package in a checkout, else the copy installed as `indexer.sql`."""
    checkout = Path(__file__).resolve().parent.parent / "sql"
    if checkout.is_dir():
        return checkout
    # `indexer.sql` has no __init__.py: installed, it is a namespace package, whose files() is a
    # MultiplexedPath (its str() is no path). Its files say where the directory is.
    for entry in resources.files("indexer.sql").iterdir():
        return Path(str(entry)).parent
    raise SchemaNotReady("no migrations are installed with the package (indexer/sql is empty)")


def load_migrations(directory: Path | None = None) -> list[Migration]:
    found = []
    for path in sorted((directory or sql_dir()).glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file name must look like 001_name.sql: {path.name}")
        found.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a number: {versions}")
    return found


async def applied_versions(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", VERSION_TABLE)
    if not exists:
        return set()
    rows = await conn.fetch(f"SELECT version FROM {VERSION_TABLE}")
    return {r["version"] for r in rows}


async def pending(conn: asyncpg.Connection) -> list[Migration]:
    """Migrations not yet applied to this database (empty means the schema is current)."""
    done = await applied_versions(conn)
    return [m for m in load_migrations() if m.version not in done]


async def collation_warning(conn: asyncpg.Connection) -> str | None:
    """A line for the log when the database's collation slows every text index, else None."""
    row = json.loads(await conn.fetchval(_DATABASE))
    provider = row.get("datlocprovider", "c")
    if provider == "b" or (provider == "c" and row["datcollate"] in _FAST_COLLATIONS):
        return None
    collation = (
        row["datcollate"] if provider == "c" else row.get("datlocale") or row.get("daticulocale")
    )
    return (
        f"database {row['datname']!r} collates text with {collation!r} "
        f"({'libc' if provider == 'c' else 'ICU'}), not C: every index probe on a uri or a did "
        "compares through the locale (measured against C: 0.56 to 0.81 of the rate on "
        "en_US.UTF-8, 0.92 on C.UTF-8). New databases: LC_COLLATE 'C' (docs/operations.md, "
        "'The database's collation')"
    )


async def migrate(database_url: str) -> list[str]:
    """Apply every pending migration; return the names applied (empty when up to date)."""
    try:
        conn = await asyncpg.connect(database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConnectionError(f"cannot connect to {mask_url(database_url)}: {exc}") from None
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
            "version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = []
        for migration in await pending(conn):
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    f"INSERT INTO {VERSION_TABLE} (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("applied migration %s", migration.name)
            applied.append(migration.name)
        if warning := await collation_warning(conn):
            log.warning("%s", warning)
        return applied
    finally:
        await conn.close()
