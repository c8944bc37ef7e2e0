"""Reclaiming, delivery limits, trimming and consumer clean-up, on real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis._parsers import BaseParser

from indexer.config import Settings
from indexer.db import Database
from indexer.metrics import Metrics
from indexer.replica import Replica, _redis_transient
from indexer.stream import StreamConsumer
from plugins import registry
from tests.helpers import (
    LIKE,
    POST,
    assert_no_drift,
    create,
    like_record,
    post_record,
    push,
    uri,
)

GHOST = "ghost"  # a consumer that read entries and died


def _likes(n: int, start: int = 0) -> list[dict[str, object]]:
    return [
        create(100 + k, LIKE, f"l{k}", like_record(uri(1, POST, "p1")), 10 + k)
        for k in range(start, start + n)
    ]


async def _held_by_ghost(redis, settings, events, *, deliveries: int = 1) -> list[str]:
    """Push events and have the ghost consumer read them (and, to fake earlier crashes, have
    them delivered `deliveries` times); they stay pending on it."""
    ids = await push(redis, settings.live_stream, events)
    await StreamConsumer(settings, redis).ensure_groups()
    await redis.xreadgroup(settings.group, GHOST, {settings.live_stream: ">"}, count=100_000)
    if deliveries > 1:
        await redis.xclaim(settings.live_stream, settings.group, GHOST, 0, ids,
                           retrycount=deliveries)  # fmt: skip
    return ids


async def test_entries_of_a_dead_consumer_are_claimed_and_indexed(settings, redis, db, drain):
    await push(redis, settings.live_stream, [create(1, POST, "p1", post_record(), 1)])
    ids = await _held_by_ghost(redis, settings, _likes(30))
    replica = Replica(settings.replace(claim_idle_s=0.2), registry(), Metrics())
    await asyncio.wait_for(replica.run(drain=True), 30)
    assert replica.claimed == 31  # the post was read by the ghost too
    assert await redis.xpending(settings.live_stream, settings.group) == {
        "pending": 0, "min": None, "max": None, "consumers": []
    }  # fmt: skip
    assert await db.fetchval('SELECT "likeCount" FROM post_agg') == 30
    assert await redis.xlen(f"{settings.live_stream}:dlq") == 0
    assert len(ids) == 30
    await assert_no_drift(db)


async def test_own_pending_entries_are_redone_at_start(settings, redis, db):
    await _held_by_ghost(redis, settings, _likes(5))
    replica = Replica(settings.replace(consumer=GHOST), registry(), Metrics())
    await asyncio.wait_for(replica.run(drain=True), 30)
    assert replica.claimed == 5  # taken up at once, without waiting for claim_idle_s (60 s)
    assert await db.fetchval('SELECT count(*) FROM "like"') == 5


async def test_entry_delivered_max_times_is_dead_lettered_with_its_history(settings, redis, db):
    spent = await _held_by_ghost(redis, settings, _likes(3), deliveries=5)
    again = await _held_by_ghost(redis, settings, _likes(2, start=3), deliveries=3)
    replica = Replica(settings.replace(claim_idle_s=0.2), registry(), Metrics())
    await asyncio.wait_for(replica.run(drain=True), 30)
    dlq = await redis.xrange(f"{settings.live_stream}:dlq")
    assert [f[b"id"].decode() for _, f in dlq] == spent
    for _, fields in dlq:
        assert fields[b"reason"] == (
            b"delivered 5 times without being committed (max_deliveries 5)"
        )
        assert fields[b"deliveries"] == b"5"
        assert fields[b"stream"].decode() == settings.live_stream
        assert float(fields[b"time"]) > 0
        assert fields[b"event"].startswith(b"{")
    # entries below the limit are retried (one per transaction) and indexed
    assert await db.fetchval('SELECT count(*) FROM "like"') == len(again)
    assert (await redis.xpending(settings.live_stream, settings.group))["pending"] == 0


async def test_batches_in_hand_are_not_claimed_by_other_replicas(settings, redis, db, database_url):
    """A batch that takes longer than claim_idle_s (here: waiting for a lock) is kept busy by
    its replica, so the other replica does not take it over and count a delivery."""
    await push(redis, settings.live_stream, _likes(40))
    locker = await asyncpg.connect(database_url)
    tx = locker.transaction()
    await tx.start()
    await locker.execute("LOCK TABLE record_state IN EXCLUSIVE MODE")
    fast = settings.replace(claim_idle_s=0.3, batch_size=20, concurrency=1)
    replicas = [Replica(fast.replace(consumer=f"r{n}"), registry(), Metrics()) for n in (1, 2)]
    runs = [asyncio.create_task(r.run(drain=True)) for r in replicas]
    await asyncio.sleep(2.0)  # several claim intervals while both batches wait for the lock
    await tx.rollback()
    await locker.close()
    await asyncio.wait_for(asyncio.gather(*runs), 30)
    assert [r.claimed for r in replicas] == [0, 0]
    assert sum(r.indexed for r in replicas) == 40
    await assert_no_drift(db)


async def test_trim_keeps_every_entry_a_group_still_needs(settings, redis):
    stream = settings.live_stream
    ids = await push(redis, stream, _likes(1000))
    await redis.xgroup_create(stream, settings.group, id="0")
    await redis.xgroup_create(stream, "slow", id=ids[899], entries_read=900)  # 100 to go
    await redis.xreadgroup(settings.group, "a", {stream: ">"}, count=700)
    await redis.xack(stream, settings.group, *ids[:300], *ids[400:700])  # 300..399 pending
    consumer = StreamConsumer(settings, redis)
    assert await consumer.trim(stream) == ids[300]
    left = [i.decode() for i, _ in await redis.xrange(stream)]
    assert left[-700:] == ids[300:]  # nothing at or above the oldest pending entry is gone
    assert len(left) < 1000  # and whole nodes below it are
    groups = {g["name"].decode(): g for g in await redis.xinfo_groups(stream)}
    assert (groups[settings.group]["lag"], groups["slow"]["lag"]) == (300, 100)

    await redis.xack(stream, settings.group, *ids[300:400])
    await redis.xreadgroup(settings.group, "a", {stream: ">"}, count=300)
    await redis.xack(stream, settings.group, *ids[700:])
    assert await consumer.trim(stream) == ids[900]  # the slow group still needs its last 100
    assert [i.decode() for i, _ in await redis.xrange(stream)][-100:] == ids[900:]
    groups = {g["name"].decode(): g for g in await redis.xinfo_groups(stream)}
    assert (groups[settings.group]["lag"], groups["slow"]["lag"]) == (0, 100)


async def test_trim_without_groups_keeps_everything(settings, redis):
    await push(redis, settings.live_stream, _likes(300))
    assert await StreamConsumer(settings, redis).trim(settings.live_stream) is None
    assert await redis.xlen(settings.live_stream) == 300


async def test_consumers_removed_when_done_or_long_idle_but_never_with_pending(settings, redis):
    stream = settings.live_stream
    await _held_by_ghost(redis, settings, _likes(3))
    [one] = await push(redis, stream, _likes(1, start=3))
    await redis.xreadgroup(settings.group, "idle-empty", {stream: ">"}, count=1)
    await redis.xack(stream, settings.group, one)
    await asyncio.sleep(0.3)
    replica = Replica(
        settings.replace(consumer="me", consumer_idle_s=0.2, trim_interval_s=0.1,
                         claim_idle_s=60),
        registry(), Metrics(),
    )  # fmt: skip
    task = asyncio.create_task(replica.run())
    await push(redis, stream, _likes(2, start=4))  # Redis creates a consumer once it reads some
    try:
        for _ in range(100):
            found = await redis.xinfo_consumers(stream, settings.group)
            names = {i["name"].decode() for i in found}
            if names == {GHOST, "me"}:
                break
            await asyncio.sleep(0.05)
        assert names == {GHOST, "me"}  # the ghost still holds entries: it is kept
    finally:
        replica.stop()
        await asyncio.wait_for(task, 10)
    names = {i["name"].decode() for i in await redis.xinfo_consumers(stream, settings.group)}
    assert names == {GHOST}  # "me" left cleanly with nothing pending
    assert (await redis.xpending(stream, settings.group))["pending"] == 3
    assert replica.indexed == 2


async def _held_by_a(
    settings: Settings, redis: aioredis.Redis, n: int
) -> tuple[StreamConsumer, list[str]]:
    """`n` entries delivered to consumer "a" and pending on it: its StreamConsumer, their ids."""
    ids = await push(redis, settings.live_stream, _likes(n))
    await StreamConsumer(settings, redis).ensure_groups()
    await redis.xreadgroup(settings.group, "a", {settings.live_stream: ">"}, count=n)
    return StreamConsumer(settings.replace(consumer="a"), redis), ids


async def test_touch_keeps_entries_in_hand_but_never_takes_back_a_claimed_one(settings, redis):
    stream = settings.live_stream
    mine, ids = await _held_by_a(settings, redis, 3)
    await asyncio.sleep(0.3)
    await redis.xclaim(stream, settings.group, "b", 200, [ids[2]])  # another replica took one
    assert await mine.touch(stream, ids) == 2
    pending = {
        p["message_id"].decode(): p
        for p in await redis.xpending_range(stream, settings.group, "-", "+", 10)
    }
    owners = {i: p["consumer"].decode() for i, p in pending.items()}
    assert owners == {ids[0]: "a", ids[1]: "a", ids[2]: "b"}
    assert all(pending[i]["time_since_delivered"] < 200 for i in ids[:2])  # idle time reset
    assert [pending[i]["times_delivered"] for i in ids] == [1, 1, 2]  # touching counts none


@pytest.mark.parametrize(
    "reply",
    [
        "READONLY You can't write against a read only replica.",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "CLUSTERDOWN The cluster is down",
        "LOADING Redis is loading the dataset in memory",
        "NOGROUP No such key 'firehose_live' or consumer group 'indexer'",
        "UNBLOCKED force unblock from blocking operation, instance state changed",
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
        "BUSY Redis is busy running a script.",
    ],
)
def test_redis_replies_of_an_outage_are_transient(reply):
    # the exception redis-py raises for the reply (some classes cut the prefix off the message)
    assert _redis_transient(BaseParser.parse_error(reply))


@pytest.mark.parametrize(
    "reply", ["ERR unknown command 'XFOO'", "WRONGTYPE Operation against a key"]
)
def test_redis_replies_of_a_bug_are_not_transient(reply):
    assert not _redis_transient(BaseParser.parse_error(reply))


async def test_unblocked_reads_and_a_full_redis_are_waited_out(settings, redis):
    """A blocked read answered UNBLOCKED (as when the server turns replica), then a dead letter
    refused for memory (OOM): the replica waits both out and settles the entry afterwards."""
    stream = settings.live_stream
    await StreamConsumer(settings, redis).ensure_groups()
    replica = Replica(settings.replace(consumer="r", block_ms=5000), registry(), Metrics())
    task = asyncio.create_task(replica.run())
    try:
        blocked: list[int] = []
        for _ in range(200):
            clients = await redis.client_list()
            blocked = [int(c["id"]) for c in clients if "b" in c["flags"]]
            if blocked:
                break
            await asyncio.sleep(0.05)
        assert blocked
        for client_id in blocked:
            await redis.execute_command("CLIENT", "UNBLOCK", client_id, "ERROR")
        await asyncio.sleep(0.3)
        assert not task.done()
        clients = await redis.client_list()  # no other worker took over the read meanwhile
        assert [c["id"] for c in clients if "b" in c["flags"]] == []
        await redis.xadd(stream, {"event": b"{not json"})
        await redis.config_set("maxmemory", 1)  # every command that needs memory is refused
        try:
            await asyncio.sleep(1.5)
            assert not task.done()
            assert await redis.xlen(f"{stream}:dlq") == 0  # not yet: refused
        finally:
            await redis.config_set("maxmemory", 0)
        for _ in range(100):
            if await redis.xlen(f"{stream}:dlq") == 1:
                break
            await asyncio.sleep(0.05)
        assert await redis.xlen(f"{stream}:dlq") == 1
        assert (await redis.xpending(stream, settings.group))["pending"] == 0
    finally:
        replica.stop()
        await asyncio.wait_for(task, 15)


async def test_a_claim_never_takes_an_entry_another_replica_claimed_meanwhile(settings, redis):
    """Recovery claims its own entries with min-idle 0 from a pending list read earlier: one that
    another replica took over since then stays with it, the others come back with their events."""
    stream = settings.live_stream
    mine, ids = await _held_by_a(settings, redis, 3)
    pending = await mine.idle_pending(stream, 0, 10, "a")
    assert [p.consumer for p in pending] == ["a", "a", "a"]
    await redis.xclaim(stream, settings.group, "b", 0, [ids[1]])  # another replica took one
    claimed = await mine.claim(stream, pending, 0)
    assert [e.id for e in claimed] == [ids[0], ids[2]]
    assert all(e.raw is not None and b"app.bsky.feed.like" in e.raw for e in claimed)
    assert [e.deliveries for e in claimed] == [2, 2]
    owners = {
        p["message_id"].decode(): p["consumer"].decode()
        for p in await redis.xpending_range(stream, settings.group, "-", "+", 10)
    }
    assert owners == {ids[0]: "a", ids[1]: "b", ids[2]: "a"}


async def test_closing_the_pool_is_bounded_even_with_a_connection_held(settings):
    """A stuck task holding a connection cannot keep a replica past its shutdown deadline."""
    database = Database(settings)
    await database.open()
    async with database.connection() as conn:
        await asyncio.wait_for(database.close(timeout_s=0.5), 5)
        assert not database.is_open
        with pytest.raises(asyncpg.InterfaceError):
            await conn.fetchval("SELECT 1")  # terminated


async def test_entries_in_hand_are_touched_and_claimed_when_redis_is_out_of_memory(settings, redis):
    stream = settings.live_stream
    mine, ids = await _held_by_a(settings, redis, 2)
    pending = await mine.idle_pending(stream, 0, 10, "a")
    await redis.config_set("maxmemory", 1)  # every command that needs memory is refused
    try:
        assert await mine.touch(stream, ids) == 2
        assert [e.id for e in await mine.claim(stream, pending, 0)] == ids
    finally:
        await redis.config_set("maxmemory", 0)


async def test_a_crashed_observer_stops_the_replica_with_its_error(settings, redis):
    """Frozen readiness and gauges would hide every later problem: the replica ends instead."""
    replica = Replica(settings.replace(consumer="r"), registry(), Metrics())

    async def broken() -> None:
        raise RuntimeError("observer bug")

    replica._observer.observe = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="observer bug"):
        await asyncio.wait_for(replica.run(), 30)
