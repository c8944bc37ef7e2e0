"""Reclaiming, delivery limits, trimming and consumer clean-up, on real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg

from indexer.metrics import Metrics
from indexer.replica import Replica
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


async def test_touch_keeps_entries_in_hand_but_never_takes_back_a_claimed_one(settings, redis):
    stream = settings.live_stream
    ids = await push(redis, stream, _likes(3))
    await StreamConsumer(settings, redis).ensure_groups()
    mine = StreamConsumer(settings.replace(consumer="a"), redis)
    await redis.xreadgroup(settings.group, "a", {stream: ">"}, count=3)
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
