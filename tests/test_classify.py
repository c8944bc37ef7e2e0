"""Database failures are classified: retry (outage, contention), dead-letter (data), or crash."""

from __future__ import annotations

import asyncpg
import msgspec
import pytest
from asyncpg.exceptions import _base

from indexer.config import Settings
from indexer.db import (
    BadRows,
    Database,
    connect,
    is_contention,
    is_data_error,
    is_timed_out,
    is_unavailable,
    json_rows,
    rows_json,
)


def test_failures_are_classified():
    assert is_data_error(asyncpg.UniqueViolationError("dup"))
    assert is_data_error(asyncpg.ProgramLimitExceededError("index row too big"))
    assert is_data_error(_base.DataError("invalid input for query argument"))
    assert not is_unavailable(_base.DataError("invalid input for query argument"))
    assert is_unavailable(asyncpg.InterfaceError("connection is closed"))
    assert is_unavailable(asyncpg.ConnectionDoesNotExistError("gone"))
    assert is_unavailable(asyncpg.CannotConnectNowError("starting up"))
    assert is_unavailable(ConnectionRefusedError())
    assert is_unavailable(TimeoutError())
    assert is_contention(asyncpg.DeadlockDetectedError("deadlock"))
    assert is_contention(asyncpg.SerializationError("serialization"))
    assert is_contention(asyncpg.InvalidCachedStatementError("cached plan must not change"))
    assert not is_unavailable(asyncpg.UndefinedTableError("no table"))
    assert not is_data_error(asyncpg.UndefinedTableError("no table"))
    # the server gave up on a statement: retried, and a batch is split (indexer.replica)
    assert is_timed_out(asyncpg.QueryCanceledError("canceling statement due to statement timeout"))
    assert is_timed_out(asyncpg.LockNotAvailableError("canceling statement due to lock timeout"))
    assert not is_timed_out(asyncpg.DeadlockDetectedError("deadlock"))
    assert not is_timed_out(asyncpg.AdminShutdownError("terminating connection"))


def test_rows_json_round_trips_and_refuses_what_it_cannot_send_as_bad_data():
    rows = [("at://x/y/z", None, 3, True, 'quote " back\\slash \u00e9 \x1f')]
    assert msgspec.json.decode(rows_json(rows)) == [list(rows[0])]
    for bad in ([("lone \ud800 surrogate",)], [(object(),)]):
        with pytest.raises(BadRows) as caught:
            rows_json(bad)
        assert is_data_error(caught.value) and not is_unavailable(caught.value)


_TEXTS = ("caf\u00e9 \U0001f389 \u65e5\u672c\u8a9e", "plain ascii", 'quote " back\\slash')


async def test_rows_reach_the_server_as_utf8_jsonb_from_the_pool_and_from_connect(
    settings: Settings,
):
    # rows_json stays bytes all the way (a binary jsonb codec on every connection): non-ASCII
    # text, 4-byte characters included, arrives intact, and jsonb still reads back as text.
    rows = [(t, n) for n, t in enumerate(_TEXTS)]
    query = json_rows(("varchar", "int"))
    expected = [tuple(r) for r in rows]
    db = Database(settings)
    await db.open()
    try:
        async with db.transaction() as conn:
            assert [tuple(r) for r in await conn.fetch(query, rows_json(rows))] == expected
            assert await conn.fetchval("SELECT $1::jsonb", '{"a": "\u00e9"}') == '{"a": "\u00e9"}'
    finally:
        await db.close()
    conn = await connect(settings.database_url)
    try:
        assert [tuple(r) for r in await conn.fetch(query, rows_json(rows))] == expected
        assert await conn.fetchval("SELECT '[1, 2]'::jsonb") == "[1, 2]"
    finally:
        await conn.close()


async def test_a_timed_out_statement_leaves_its_connection_in_the_pool(settings: Settings):
    # a canceled statement leaves the connection usable: the pool keeps it (an outage does not)
    db = Database(settings.replace(db_pool_size=1))
    await db.open()
    try:
        async with db.connection() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(asyncpg.QueryCanceledError) as caught:
            async with db.transaction() as conn:  # as a batch: rolled back, then released
                await conn.execute("SET LOCAL statement_timeout = '10ms'")
                await conn.execute("SELECT pg_sleep(1)")
        assert is_timed_out(caught.value)
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
            assert await conn.fetchval("SHOW statement_timeout") == "0"
    finally:
        await db.close()
