"""/health, /ready and `indexer check`: honest about stalls, outages and unmigrated schemas."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter

from indexer.config import Settings
from indexer.health import Health, HealthServer
from indexer.metrics import Metrics
from indexer.migrate import load_migrations
from indexer.replica import Replica
from plugins import registry
from tests.helpers import LIKE, POST, create, like_record, post_record, push, uri
from tests.observe import free_port, get, indexer, indexer_env, start_indexer, until

_ALL_MIGRATIONS = ", ".join(f"{m.version:03d}" for m in load_migrations())


def _events(n: int) -> list[dict[str, object]]:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    events = [create(1, POST, "p1", post_record(), 1)]
    events += [create(2 + i, LIKE, f"l{i}", like_record(uri(1, POST, "p1")), 2) for i in range(n)]
    for event in events:
        event["time"] = now
    return events


def test_health_turns_unhealthy_when_a_backlog_stands_still():
    health = Health(stall_after_s=0.2, checks=("redis",))
    assert health.live() == (True, "alive, idle")
    assert health.ready() == (False, "redis: not checked yet")
    health.set_check("redis", True)
    assert health.ready() == (True, "ready")
    health.set_backlog(1200)
    time.sleep(0.25)
    ok, reason = health.live()
    assert not ok
    assert re.fullmatch(r"no progress for 0\.[23] s with a backlog of 1200", reason), reason
    assert health.ready()[0] is False
    health.progressed()
    assert health.live()[0] is True
    health.set_backlog(0)  # nothing waiting: silence is fine
    time.sleep(0.25)
    ok, reason = health.live()
    assert not ok and reason.startswith("loop silent for 0.")  # but the loop must beat
    health.beat()
    assert health.live() == (True, "alive, idle")
    health.set_check("redis", False, "LOADING")
    assert health.ready() == (False, "redis: LOADING")


async def test_server_answers_metrics_health_ready_and_nothing_else():
    reg = CollectorRegistry()
    Counter("indexer_probe_total", "a probe", registry=reg).inc(3)
    health = Health(stall_after_s=60, checks=("redis",))
    async with HealthServer(reg, health, 0) as server:
        status, body = await get(server.port, "/metrics")
        assert status == 200 and "indexer_probe_total 3.0" in body
        assert await get(server.port, "/health") == (200, "alive, idle\n")
        assert await get(server.port, "/ready?verbose=1") == (503, "redis: not checked yet\n")
        health.set_check("redis", True)
        assert await get(server.port, "/ready") == (200, "ready\n")
        assert (await get(server.port, "/nope"))[0] == 404


async def test_replica_with_a_backlog_that_does_not_move_is_unhealthy(settings, redis, db):
    settings = settings.replace(stall_after_s=0.5, stats_interval_s=0.1, concurrency=1)
    await push(redis, settings.live_stream, _events(199))
    metrics = Metrics()
    replica = Replica(settings, registry(), metrics)
    async with HealthServer(metrics.registry, replica.health, 0) as server:
        # Writes block on this lock: the replica reads a batch and cannot commit it.
        lock = db.transaction()
        await lock.start()
        await db.execute("LOCK TABLE record_state IN ACCESS EXCLUSIVE MODE")
        run = asyncio.create_task(replica.run(drain=True))
        try:

            async def stalled():
                status, body = await get(server.port, "/health")
                return body if status == 503 else None

            reason = await until(stalled)
            assert re.fullmatch(r"no progress for \d+\.\d s with a backlog of 200\n", reason)
            status, ready = await get(server.port, "/ready")
            assert status == 503 and ready.startswith("no progress for")
        finally:
            await lock.rollback()
        await asyncio.wait_for(run, 60)
        # It moved again and drained: alive, and idle.
        assert await get(server.port, "/health") == (200, "alive, idle\n")
    assert replica.indexed == 200


async def _not_ready(settings: Settings, words: str) -> tuple[str, BaseException | None]:
    """Run a replica until `/ready` answers 503 naming `words`; that answer, and what the run,
    which must end within 30 s, ended with."""
    metrics = Metrics()
    replica = Replica(settings, registry(), metrics)
    async with HealthServer(metrics.registry, replica.health, 0) as server:
        run = asyncio.create_task(replica.run())

        async def reported():
            status, body = await get(server.port, "/ready")
            return body if words in body and status == 503 else None

        body = await until(reported)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run, 30)
    assert run.done()
    return body, run.exception()


async def test_ready_is_false_while_postgres_is_unreachable(settings):
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    settings = settings.replace(database_url=closed, stats_interval_s=0.1, startup_timeout_s=1)
    body, ended = await _not_ready(settings, "postgres: not connected yet")
    assert "redis:" not in body  # Redis is there and loaded
    assert ended is None or isinstance(ended, ConnectionError)


async def test_ready_is_false_on_an_unmigrated_database(settings, postgres_server):
    postgres_server.create_database("health_unmigrated")
    try:
        settings = settings.replace(
            database_url=postgres_server.dsn("health_unmigrated"),
            stats_interval_s=0.1,
            startup_timeout_s=1,
        )
        body, _ = await _not_ready(settings, "schema: migrations")
        assert body == f"schema: migrations {_ALL_MIGRATIONS} not applied\n"
    finally:
        postgres_server.drop_database("health_unmigrated")


async def test_indexer_check_probes_a_running_replica(settings, redis):
    port = free_port()
    env = indexer_env(settings, METRICS_PORT=str(port), INDEXER_STATS_INTERVAL_S="0.1")
    code, _, err = await indexer(env, "check")
    assert code == 1
    assert err.startswith(f"error: no answer from http://127.0.0.1:{port}/health")
    proc = await start_indexer(env, "run")
    try:

        async def ready():
            code, out, _ = await indexer(env, "check", "--ready")
            return out if code == 0 else None

        assert await until(ready) == "ready\n"
        code, out, _ = await indexer(env, "check")
        assert (code, out) == (0, "alive, idle\n")
        code, _, err = await indexer(env, "check", "--url", f"http://127.0.0.1:{port}/nope")
        assert code == 1 and err == f"error: http://127.0.0.1:{port}/nope answered 404 Not Found\n"
        code, out, _ = await indexer(env, "check", "--url", f"http://127.0.0.1:{port}/health")
        assert (code, out) == (0, "alive, idle\n")
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0


async def test_check_reports_not_ready_in_one_line(settings, postgres_server):
    """A replica waiting for an unmigrated database: `indexer check` says why, exit 1."""
    postgres_server.create_database("check_unmigrated")
    env = indexer_env(
        settings.replace(database_url=postgres_server.dsn("check_unmigrated")),
        METRICS_PORT=str(free_port()),
        INDEXER_STATS_INTERVAL_S="0.1",
        INDEXER_STARTUP_TIMEOUT_S="20",
    )
    proc = await start_indexer(env, "run")
    try:

        async def reported():
            code, _, err = await indexer(env, "check", "--ready")
            return (code, err) if "migrations" in err else None

        code, err = await until(reported)
        assert code == 1
        assert err == f"error: not ready: schema: migrations {_ALL_MIGRATIONS} not applied\n"
    finally:
        proc.terminate()  # a stop request ends the wait for the migrations at once
        await asyncio.wait_for(proc.communicate(), 10)
        postgres_server.drop_database("check_unmigrated")
