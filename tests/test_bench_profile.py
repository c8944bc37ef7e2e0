"""bench.profile: its server-side statement report (--server-statements) and its grown base
(--grow)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench import profile
from bench.tables import GROWN_MARK, WRITTEN_TABLES
from indexer.devservers import throwaway_postgres, throwaway_redis
from indexer.migrate import migrate

# exec s, µs/event, calls, rows, µs/row (or -), WAL records, two spaces, the statement
_LINE = re.compile(r"\s*([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+([\d.]+|-)\s+(\d+)  (.+)")


def _row(query: str, calls: int, rows: int, exec_ms: float, wal: int) -> dict[str, object]:
    return {
        "calls": calls, "rows": rows, "exec_ms": exec_ms, "plan_ms": 0.5, "wal_records": wal,
        "query": query,
    }  # fmt: skip


def test_the_server_report_gives_time_per_event_and_per_row() -> None:
    rows = [
        _row("WITH input AS (guard)", 4, 2000, 60.0, 16000),
        _row("SELECT pg_advisory_xact_lock(1)", 8, 0, 20.0, 0),
    ]
    text = profile.server_report(rows, events=4000)
    lines = text.splitlines()
    # 80 ms over 4,000 events; planning twice 0.5 ms
    assert lines[0] == (
        "server: statements executed 0.08 s (20.0 µs per event), planned 0.00 s; 2 statements"
    )
    # 60 ms: 15 µs per event, 30 µs per row
    assert re.fullmatch(r"\s*0\.06\s+15\.0\s+4\s+2000\s+30\.0\s+16000  WITH input AS \(guard\)",
                        lines[2])  # fmt: skip
    # no rows: no time per row
    assert re.fullmatch(r"\s*0\.02\s+5\.0\s+8\s+0\s+-\s+0  SELECT pg_advisory_xact_lock\(1\)",
                        lines[3])  # fmt: skip


def test_the_statements_library_joins_the_libraries_already_preloaded() -> None:
    assert profile._with_statements_library({"shared_buffers": "1GB"}) == {
        "shared_buffers": "1GB",
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.track_planning": "on",
    }
    merged = profile._with_statements_library({"shared_preload_libraries": "auto_explain"})
    assert merged["shared_preload_libraries"] == "auto_explain,pg_stat_statements"
    again = profile._with_statements_library(merged)
    assert again["shared_preload_libraries"] == "auto_explain,pg_stat_statements"


def test_a_profile_prints_the_replicas_statements_as_the_server_ran_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    profile.main(["--events", "3000", "--server-statements"])
    out = capsys.readouterr().out
    client, server = out.split("\nserver: statements executed ")
    assert "pg_stat_activity" not in client.split("backend samples")[0]  # the sampler's own
    lines = server.splitlines()
    assert re.match(
        r"[\d.]+ s \([\d.]+ µs per event\), planned [\d.]+ s; \d+ statements$", lines[0]
    )
    parsed = [_LINE.fullmatch(line) for line in lines[2:]]
    assert all(parsed), lines
    by_statement = {m.group(7): m for m in parsed if m}
    assert not any("pg_stat_" in q for q in by_statement)
    like = next(m for q, m in by_statement.items() if q.startswith('INSERT INTO "like"'))
    calls, rows, wal = int(like.group(3)), int(like.group(4)), int(like.group(6))
    assert calls >= 2 and rows > 0 and wal > rows  # a heap record and index records per row


async def test_a_grown_base_is_the_copies_alone_over_a_fresh_migration(tmp_path: Path) -> None:
    """--grow's first pass runs in a database of its own: the measured database holds its
    suffixed copies in the written tables, and every other table as the migration left it."""
    args = profile.parser().parse_args(["--events", "3000", "--grow", "2"])
    with throwaway_redis() as redis_server, throwaway_postgres() as pg:
        pg.create_database("fresh")
        fresh = pg.dsn("fresh")
        await migrate(fresh)
        dsn = await profile._prepare(args, tmp_path, redis_server.url, pg)
        for table in ("record", "record_state", "like", "post_embed_record", "actor"):
            rows = await _query(
                dsn,
                f"SELECT count(*) AS total, count(*) FILTER (WHERE strpos({_KEYS[table]}, "
                f"'{GROWN_MARK}') > 0) AS grown FROM \"{table}\"",
            )
            assert rows[0]["total"] == rows[0]["grown"] > 0, table
        names = [r["name"] for r in await _query(fresh, _TABLES)]
        other = [t for t in names if t not in WRITTEN_TABLES]
        assert "dirty_counter" in other and "indexer_schema_version" in other
        counts = {t: (await _count(dsn, t), await _count(fresh, t)) for t in other}
        assert {t: n for t, (n, m) in counts.items() if n != m} == {}
        databases = await _query(pg.dsn("postgres"), "SELECT datname FROM pg_database")
        assert "grow_first" not in {d["datname"] for d in databases}


_KEYS = {
    "record": "uri", "record_state": "uri", "like": "uri", "post_embed_record": '"postUri"',
    "actor": "did",
}  # fmt: skip
_TABLES = (
    "SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1"
)


async def _count(dsn: str, table: str) -> int:
    return int((await _query(dsn, f'SELECT count(*) AS n FROM "{table}"'))[0]["n"])


async def _query(dsn: str, sql: str) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()
