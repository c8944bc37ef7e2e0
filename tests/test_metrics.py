"""The metrics a replica sets while it runs, read back from its registry with their values."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime, timedelta

from indexer.db import Database
from indexer.health import Health, HealthServer
from indexer.metrics import Metrics
from indexer.replica import Replica
from plugins import registry
from tests.helpers import LIKE, POST, create, delete, like_record, post_record, push, uri
from tests.observe import scrape, until, value


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def test_events_are_counted_by_collection_operation_and_outcome(settings, redis):
    p1 = uri(1, POST, "p1")
    events = [
        create(1, POST, "p1", post_record(), 10),
        create(2, LIKE, "l1", like_record(p1), 11),  # stays: indexed
        create(3, LIKE, "l2", like_record(p1), 11),  # superseded in its batch: unchanged
        create(3, LIKE, "l2", like_record(p1), 11),  # redelivered: unchanged
        delete(3, LIKE, "l2", 12),  # of a record never seen live: a tombstone, unchanged
        create(3, "com.example.unknown", "x", {"a": 1}, 13),
        {"type": "identity", "did": "did:plc:x", "handle": "x.test"},
        b"{broken",
    ]
    await push(redis, settings.live_stream, events)
    metrics = Metrics()
    replica = Replica(settings.replace(consumer="m"), registry(), metrics)
    await asyncio.wait_for(replica.run(drain=True), 60)

    total = "indexer_events_total"
    assert _value(metrics, total, collection=POST, operation="create", outcome="indexed") == 1
    assert _value(metrics, total, collection=LIKE, operation="create", outcome="indexed") == 1
    assert _value(metrics, total, collection=LIKE, operation="create", outcome="unchanged") == 2
    assert _value(metrics, total, collection=LIKE, operation="delete", outcome="unchanged") == 1
    assert _value(metrics, total, collection="other", operation="create", outcome="skipped") == 1
    assert _value(metrics, total, collection="-", operation="identity", outcome="indexed") == 1
    assert _value(metrics, total, collection="unknown", operation="unknown",
                  outcome="dead_letter") == 1  # fmt: skip
    assert _value(metrics, "indexer_batch_size_sum") == len(events)
    assert _value(metrics, "indexer_batch_duration_seconds_count") >= 1
    assert _value(metrics, "indexer_db_pool_size") == settings.db_pool_size
    # the sample's event time is in 2024: the newest indexed event is that far behind
    assert _value(metrics, "indexer_event_lag_seconds") > 3600 * 24 * 300
    assert replica.indexed == 3  # the post, the like, the identity's handle


def _recent(events: list[dict[str, object]], seconds_ago: float) -> list[dict[str, object]]:
    moment = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    stamp = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return [e | {"time": stamp} for e in events]


async def _until_scraped(port: int, predicate):
    """Scrape until `predicate(samples)` holds; return those samples."""

    async def scraped():
        samples = await scrape(port)
        return samples if predicate(samples) else None

    return await until(scraped)


async def test_a_scrape_during_a_run_shows_the_backlog_then_its_end(settings, redis, db):
    """A real replica over HTTP: stream length, lag, pending, their ages, the event lag, the
    pool and the dead-letter stream, first with a batch stuck behind a lock, then drained."""
    settings = settings.replace(concurrency=1, stats_interval_s=0.1)
    live, backfill = settings.streams
    p1 = uri(1, POST, "p1")
    events = _recent([create(1, POST, "p1", post_record(), 1)], 60)
    events += _recent([create(2 + i, LIKE, f"l{i}", like_record(p1), 2) for i in range(199)], 60)
    metrics = Metrics()
    replica = Replica(settings, registry(), metrics)
    lock = db.transaction()
    await lock.start()
    await db.execute("LOCK TABLE record_state IN ACCESS EXCLUSIVE MODE")
    await push(redis, live, [*events, b"{broken"])
    async with HealthServer(metrics.registry, replica.health, 0) as server:
        run = asyncio.create_task(replica.run())
        try:
            stuck = await _until_scraped(
                server.port, lambda s: value(s, "indexer_stream_pending", stream=live) == 50
            )
        finally:
            await lock.rollback()
        assert value(stuck, "indexer_stream_length", stream=live) == 201
        assert value(stuck, "indexer_stream_lag", stream=live) == 151
        assert value(stuck, "indexer_stream_consumers", stream=live) == 1
        assert 0 < value(stuck, "indexer_stream_oldest_pending_seconds", stream=live) < 30
        assert value(stuck, "indexer_stream_length", stream=backfill) == 0
        assert value(stuck, "indexer_dlq_length", stream=live) == 0
        assert value(stuck, "indexer_db_pool_size") == settings.db_pool_size
        assert value(stuck, "indexer_db_pool_in_use") >= 1  # the batch waiting on the lock
        assert math.isnan(value(stuck, "indexer_event_lag_seconds"))  # nothing indexed yet

        done = await _until_scraped(
            server.port,
            lambda s: (
                value(s, "indexer_stream_lag", stream=live) == 0
                and value(s, "indexer_stream_pending", stream=live) == 0
                and value(s, "indexer_dlq_length", stream=live) == 1
            ),
        )
        replica.stop()
        await asyncio.wait_for(run, 30)
    assert value(done, "indexer_stream_length", stream=live) == 201
    assert value(done, "indexer_stream_oldest_pending_seconds", stream=live) == 0
    assert 59 < value(done, "indexer_event_lag_seconds") < 90
    total = "indexer_events_total"
    assert value(done, total, collection=LIKE, operation="create", outcome="indexed") == 199
    assert value(done, total, collection="unknown", operation="unknown",
                 outcome="dead_letter") == 1  # fmt: skip
    assert value(done, "indexer_batch_size_sum") == 201
    assert value(done, "indexer_batch_duration_seconds_count") >= 5
    assert value(done, "indexer_db_pool_acquire_seconds_count") >= 5
    assert value(done, "indexer_db_pool_waiting") == 0


async def test_pool_exhaustion_is_seen_as_waiting_tasks_and_acquire_time(settings):
    metrics = Metrics()
    db = Database(settings.replace(db_pool_size=2), metrics.pool_acquire.observe)
    metrics.track_pool(db)
    await db.open()
    release = asyncio.Event()

    async def hold() -> None:
        async with db.connection():
            await release.wait()

    try:
        async with HealthServer(metrics.registry, Health(60), 0) as server:
            holders = [asyncio.create_task(hold()) for _ in range(2)]
            await until(lambda: asyncio.sleep(0, db.in_use == 2))
            acquirers = [asyncio.create_task(db.fetchval("SELECT 1")) for _ in range(3)]
            exhausted = await _until_scraped(
                server.port, lambda s: value(s, "indexer_db_pool_waiting") == 3
            )
            assert value(exhausted, "indexer_db_pool_in_use") == 2
            assert value(exhausted, "indexer_db_pool_size") == 2
            assert value(exhausted, "indexer_db_pool_acquire_seconds_count") == 2
            await asyncio.sleep(0.2)
            release.set()
            assert await asyncio.gather(*acquirers) == [1, 1, 1]
            await asyncio.gather(*holders)
            after = await scrape(server.port)
    finally:
        await db.close()
    assert value(after, "indexer_db_pool_waiting") == 0
    assert value(after, "indexer_db_pool_in_use") == 0
    assert value(after, "indexer_db_pool_acquire_seconds_count") == 5
    # the two holders got theirs at once; the three others waited for them, 0.2 s or more
    assert value(after, "indexer_db_pool_acquire_seconds_bucket", le="0.1") == 2
    assert value(after, "indexer_db_pool_acquire_seconds_sum") >= 0.6


def test_an_event_stamped_ahead_of_our_clock_does_not_hide_the_lag():
    metrics = Metrics()
    metrics.indexed_event_time(time.time() + 3600)  # a clock an hour ahead, or a bad time
    lag = metrics.registry.get_sample_value("indexer_event_lag_seconds")
    assert lag is not None and 0 <= lag < 5
    time.sleep(0.2)
    assert metrics.registry.get_sample_value("indexer_event_lag_seconds") >= 0.2  # it grows
