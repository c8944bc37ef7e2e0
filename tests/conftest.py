"""Session-wide fixtures: one throwaway Redis and one throwaway PostgreSQL per test run."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from indexer.config import Settings
from indexer.db import connect
from indexer.devservers import (
    MissingPrerequisite,
    PostgresServer,
    RedisServer,
    throwaway_postgres,
    throwaway_redis,
)
from indexer.migrate import migrate
from tests.helpers import drain_replicas


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server for the whole session, without persistence."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(throwaway_redis())
        except MissingPrerequisite as exc:
            # One clear line for the whole run instead of a traceback per test.
            pytest.exit(str(exc), returncode=2)
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the whole session, with test-speed settings."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(throwaway_postgres())
        except MissingPrerequisite as exc:
            pytest.exit(str(exc), returncode=2)
        yield server


# --- pipeline fixtures ---

TEMPLATE_DB = "indexer_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
async def migrated_template(postgres_server: PostgresServer) -> str:
    """A database migrated once per session; each test's database is a copy of it."""
    postgres_server.create_database(TEMPLATE_DB)
    await migrate(postgres_server.dsn(TEMPLATE_DB))
    return TEMPLATE_DB


@pytest.fixture
def database_url(postgres_server: PostgresServer, migrated_template: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(name, template=migrated_template)
    yield postgres_server.dsn(name)
    postgres_server.drop_database(name)


@pytest.fixture
def settings(redis_server: RedisServer, database_url: str) -> Settings:
    """Settings pointing at the throwaway servers, with stream keys fresh for this test."""
    prefix = f"t{next(_counter)}_{uuid.uuid4().hex[:6]}"
    return Settings(
        redis_url=redis_server.url,
        database_url=database_url,
        streams=(f"{prefix}_live", f"{prefix}_backfill"),
        group=f"{prefix}_group",
        consumer="test-replica",
        metrics_port=0,
        batch_size=50,
        block_ms=100,
        db_pool_size=4,
        shutdown_grace_s=10.0,
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
def drain(settings: Settings) -> Callable[..., Awaitable[int]]:
    """Run replicas in-process until the group is drained; returns how many events they indexed."""

    async def run(replicas: int = 1, **changes: object) -> int:
        return await drain_replicas(settings.replace(**changes), replicas)

    return run
