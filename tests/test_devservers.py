"""The throwaway servers the whole suite stands on: they start, answer, crash and come back."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from indexer.devservers import (
    MissingBinary,
    PostgresServer,
    RedisServer,
    find_binary,
    throwaway_postgres,
    throwaway_redis,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private server, so crashing it cannot disturb the session's."""
    with throwaway_redis(tmp_path) as server:
        yield server


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    with throwaway_postgres() as server:
        yield server


async def _redis_get(url: str, key: str) -> bytes | None:
    client = aioredis.Redis.from_url(url)
    try:
        value = await client.get(key)
        assert value is None or isinstance(value, bytes)
        return value
    finally:
        await client.aclose()


async def _redis_set(url: str, key: str, value: bytes) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        assert await client.set(key, value) is True
    finally:
        await client.aclose()


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_missing_binary_says_what_to_install() -> None:
    with pytest.raises(MissingBinary) as info:
        find_binary("no-such-server-binary")
    assert "no-such-server-binary not found" in str(info.value)
    assert "apt-get install -y" in str(info.value)


async def test_redis_answers_after_start(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.ping() is True
        await client.set("devservers:probe", b"42")
        assert await client.get("devservers:probe") == b"42"
        await client.delete("devservers:probe")
    finally:
        await client.aclose()


async def test_redis_restart_keeps_port_and_forgets_data(own_redis: RedisServer) -> None:
    port = own_redis.port
    await _redis_set(own_redis.url, "k", b"v")
    assert await _redis_get(own_redis.url, "k") == b"v"

    own_redis.restart()  # graceful: no persistence, so the key is gone
    assert own_redis.port == port
    assert await _redis_get(own_redis.url, "k") is None

    own_redis.kill()
    assert _refuses_connections(port)
    own_redis.restart()
    assert own_redis.port == port
    await _redis_set(own_redis.url, "k", b"again")
    assert await _redis_get(own_redis.url, "k") == b"again"


async def test_postgres_create_database_and_query(postgres_server: PostgresServer) -> None:
    postgres_server.create_database("devservers_probe")
    try:
        conn = await asyncpg.connect(postgres_server.dsn("devservers_probe"))
        try:
            assert await conn.fetchval("SELECT 1") == 1
            assert await conn.fetchval("SELECT current_database()") == "devservers_probe"
            assert await conn.fetchval("SHOW fsync") == "off"
        finally:
            await conn.close()
    finally:
        postgres_server.drop_database("devservers_probe")
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(postgres_server.dsn("devservers_probe"))


async def test_postgres_database_from_template(postgres_server: PostgresServer) -> None:
    postgres_server.create_database("devservers_tpl")
    conn = await asyncpg.connect(postgres_server.dsn("devservers_tpl"))
    try:
        await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
    finally:
        await conn.close()
    postgres_server.create_database("devservers_copy", template="devservers_tpl")
    try:
        conn = await asyncpg.connect(postgres_server.dsn("devservers_copy"))
        try:
            assert await conn.fetchval("SELECT x FROM t") == 7
        finally:
            await conn.close()
    finally:
        postgres_server.drop_database("devservers_copy")
        postgres_server.drop_database("devservers_tpl")


async def test_postgres_survives_kill_9(own_postgres: PostgresServer) -> None:
    port = own_postgres.port
    conn = await asyncpg.connect(own_postgres.dsn())
    try:
        await conn.execute("CREATE TABLE survivor (x int); INSERT INTO survivor VALUES (5)")
        await conn.execute("CHECKPOINT")  # synchronous_commit=off: make the row durable first
    finally:
        await conn.close()

    own_postgres.kill()
    assert _refuses_connections(port)
    own_postgres.restart()  # crash recovery on the same data directory and port

    assert own_postgres.port == port
    conn = await asyncpg.connect(own_postgres.dsn())
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT x FROM survivor") == 5
    finally:
        await conn.close()
