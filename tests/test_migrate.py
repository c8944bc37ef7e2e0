"""`indexer migrate`: the AppView schema, fact for fact, applied once and idempotently."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import asyncpg

from indexer.db import Database
from indexer.migrate import VERSION_TABLE, load_migrations, migrate
from indexer.startup import wait_for_postgres
from tests.deployment import load_compose

DATA = Path(__file__).parent / "data"


async def test_schema_has_every_appview_fact(db):
    query = (DATA / "schema_facts.sql").read_text()
    ours = {r["fact"] for r in await db.fetch(query, "public")}
    reference = set((DATA / "appview_schema.txt").read_text().splitlines())
    assert len(reference) > 500
    missing = sorted(reference - ours)
    assert missing == [], f"{len(missing)} AppView facts missing, first: {missing[:5]}"
    # our additions are additions: the rev column and the rev-guard table
    assert "column record.rev character varying not null default: ''::character varying" in ours
    assert any(f.startswith("relation record_state") for f in ours)


async def test_migrate_is_idempotent_and_recorded(postgres_server):
    postgres_server.create_database("migrate_twice")
    dsn = postgres_server.dsn("migrate_twice")
    try:
        first = await migrate(dsn)
        assert first == [m.name for m in load_migrations()]
        assert await migrate(dsn) == []
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(f"SELECT version FROM {VERSION_TABLE}")
            versions = [r["version"] for r in rows]
        finally:
            await conn.close()
        assert sorted(versions) == [m.version for m in load_migrations()]
    finally:
        postgres_server.drop_database("migrate_twice")


def test_cli_migrate_and_unreachable_database(postgres_server):
    postgres_server.create_database("migrate_cli")
    env = {"DATABASE_URL": postgres_server.dsn("migrate_cli"), "PATH": ""}
    cmd = [sys.executable, "-m", "indexer.cli", "migrate"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"applied {len(load_migrations())} migration(s)" in done.stdout
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert again.stdout.strip() == "schema is up to date"
    finally:
        postgres_server.drop_database("migrate_cli")
    bad = {"DATABASE_URL": "postgresql://u:s3cret@127.0.0.1:1/x", "PATH": ""}
    failed = subprocess.run(cmd, env=bad, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: cannot connect to postgresql://u:***@127.0.0.1:1/x")
    assert "s3cret" not in failed.stderr + failed.stdout
    assert "Traceback" not in failed.stderr


async def test_a_database_not_collated_c_is_warned_about_at_migrate_and_at_start(
    postgres_server, settings, caplog
):
    postgres_server.create_database("collated_c_utf8", "template0", collate="C.UTF-8")
    dsn = postgres_server.dsn("collated_c_utf8")
    try:
        with caplog.at_level(logging.WARNING, logger="indexer"):
            await migrate(dsn)
        (migrating,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert migrating.startswith(
            "database 'collated_c_utf8' collates text with 'C.UTF-8' (libc)"
        )
        assert "LC_COLLATE 'C'" in migrating
        caplog.clear()
        database = Database(settings.replace(database_url=dsn))
        try:
            with caplog.at_level(logging.WARNING, logger="indexer"):
                assert await wait_for_postgres(database, settings.replace(database_url=dsn))
        finally:
            await database.close()
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            migrating
        ]
    finally:
        postgres_server.drop_database("collated_c_utf8")


async def test_the_compose_databases_collation_draws_no_warning(postgres_server, caplog):
    args = load_compose()["services"]["postgres"]["environment"]["POSTGRES_INITDB_ARGS"]
    (collate,) = [a.removeprefix("--lc-collate=") for a in args.split() if "collate" in a]
    assert collate == "C"
    postgres_server.create_database("collated_compose", "template0", collate=collate)
    dsn = postgres_server.dsn("collated_compose")
    try:
        with caplog.at_level(logging.WARNING, logger="indexer"):
            assert await migrate(dsn) == [m.name for m in load_migrations()]
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        postgres_server.drop_database("collated_compose")
