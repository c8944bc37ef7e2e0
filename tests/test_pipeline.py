"""The core pipeline against real Redis and PostgreSQL: rows, counters, replays, order."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import asyncpg
import msgspec

from indexer.events import normalize_line
from indexer.metrics import Metrics
from indexer.replica import Replica
from indexer.stream import group_backlog
from indexer.workload import generate
from plugins import registry
from tests.helpers import (
    FOLLOW,
    LIKE,
    POST,
    PROFILE,
    REPOST,
    assert_no_drift,
    create,
    delete,
    did,
    drain_replicas,
    follow_record,
    like_record,
    post_record,
    push,
    repost_record,
    rev,
    snapshot,
    uri,
)
from tests.observe import until


def _scenario() -> list[dict[str, object]]:
    p1 = uri(1, POST, "p1")
    events = [
        create(1, POST, "p1", post_record("first"), 10),
        create(2, POST, "p2", post_record("reply", reply_to=p1), 11),
        create(3, POST, "p3", post_record("quote", quote=p1), 12),
        create(2, LIKE, "l1", like_record(p1), 13),
        create(3, LIKE, "l2", like_record(p1), 14),
        create(3, LIKE, "l3", like_record(p1), 15),  # duplicate of l2
        create(4, REPOST, "r1", repost_record(p1), 16),
        create(2, FOLLOW, "f1", follow_record(1), 17),
        create(3, FOLLOW, "f2", follow_record(1), 18),
        delete(3, LIKE, "l2", 19),  # l3 is promoted
        delete(3, FOLLOW, "f2", 20),
        create(5, LIKE, "l9", like_record(p1), 21),
        delete(5, LIKE, "l9", 22),  # create and delete of one record
    ]
    return events


async def test_rows_and_counters(settings, redis, db, drain):
    await push(redis, settings.live_stream, _scenario())
    assert await drain() > 0
    p1 = uri(1, POST, "p1")
    agg = await db.fetchrow("SELECT * FROM post_agg WHERE uri = $1", p1)
    assert (agg["likeCount"], agg["replyCount"], agg["quoteCount"], agg["repostCount"]) == (
        2,
        1,
        1,
        1,
    )
    prof = await db.fetchrow("SELECT * FROM profile_agg WHERE did = $1", did(1))
    assert (prof["followersCount"], prof["postsCount"]) == (1, 1)
    likes = {r["uri"] for r in await db.fetch('SELECT uri FROM "like"')}
    assert likes == {uri(2, LIKE, "l1"), uri(3, LIKE, "l3")}
    assert await db.fetchval("SELECT count(*) FROM duplicate_record") == 0
    assert await db.fetchval("SELECT count(*) FROM feed_item") == 4  # 3 posts, 1 repost
    tomb = await db.fetchrow("SELECT live FROM record_state WHERE uri = $1", uri(5, LIKE, "l9"))
    assert tomb["live"] is False
    assert await db.fetchval("SELECT count(*) FROM record WHERE uri = $1", uri(5, LIKE, "l9")) == 0
    actors = {r["did"] for r in await db.fetch("SELECT did FROM actor")}
    assert actors == {did(n) for n in (1, 2, 3, 4, 5)}  # every author seen, deleted or not
    await assert_no_drift(db)


async def test_replay_twice_is_identical(settings, redis, db, drain):
    await push(redis, settings.live_stream, _scenario())
    await drain()
    first = await snapshot(db)
    await push(redis, settings.live_stream, _scenario())
    await push(redis, settings.live_stream, _scenario())
    await drain()
    assert await snapshot(db) == first
    await assert_no_drift(db)


async def test_shuffled_to_three_replicas_equals_in_order(settings, redis, db, drain, database_url):
    events = _scenario()
    await push(redis, settings.live_stream, events)
    await drain(batch_size=100)
    in_order = await snapshot(db)
    await assert_no_drift(db)

    # A second, empty database gets the same events shuffled, read by three replicas in tiny
    # batches, so creates and deletes of one record are split across replicas and reordered.
    other = settings.replace(
        streams=(settings.streams[0] + "_b",),
        group=settings.group + "_b",
    )
    await db.execute(
        'TRUNCATE record, record_state, post, "like", repost, follow, quote, '
        "feed_item, duplicate_record, post_agg, profile_agg, actor"
    )
    for seed in range(3):
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        await push(redis, other.live_stream, shuffled)
        await drain_replicas(other.replace(batch_size=2), 3)
        assert await snapshot(db) == in_order, f"seed {seed}"
        await assert_no_drift(db)


async def test_delete_before_create_leaves_nothing(settings, redis, db, drain):
    p1 = uri(1, POST, "p1")
    await push(redis, settings.live_stream, [delete(2, LIKE, "l1", 20)])
    await drain()
    await push(redis, settings.live_stream, [create(2, LIKE, "l1", like_record(p1), 10)])
    await drain()
    assert await db.fetchval('SELECT count(*) FROM "like"') == 0
    assert await db.fetchval("SELECT count(*) FROM record") == 0
    assert await db.fetchval('SELECT coalesce(sum("likeCount"), 0) FROM post_agg') == 0
    state = await db.fetchrow("SELECT rev, live FROM record_state")
    assert (state["rev"], state["live"]) == (rev(20), False)
    # a newer create after the tombstone brings the record back
    await push(redis, settings.live_stream, [create(2, LIKE, "l1", like_record(p1), 30)])
    await drain()
    assert await db.fetchval('SELECT "likeCount" FROM post_agg WHERE uri = $1', p1) == 1
    await assert_no_drift(db)


async def test_profile_updates_apply_by_rev(settings, redis, db, drain):
    def profile(name: str, r: int, op: str = "update", rkey: str = "self"):
        record = {"$type": PROFILE, "displayName": name, "description": f"about {name}"}
        return create(1, PROFILE, rkey, record, r, op=op)

    events = [profile("first", 10, "create"), profile("third", 12), profile("second", 11)]
    await push(redis, settings.live_stream, [*events, profile("not self", 13, "create", "other")])
    await drain()
    rows = await db.fetch('SELECT uri, "displayName", description, cid FROM profile')
    assert [(r["displayName"], r["description"]) for r in rows] == [("third", "about third")]
    assert rows[0]["cid"] == f"bafyself{12}"
    assert await db.fetchval("SELECT rev FROM record") == rev(12)
    await push(redis, settings.live_stream, [delete(1, PROFILE, "self", 14)])
    await drain()
    assert await db.fetchval("SELECT count(*) FROM profile") == 0


async def test_database_outage_is_waited_out_not_dead_lettered(
    settings, redis, db, drain, postgres_server, migrated_template
):
    from indexer.events import normalize_line
    from indexer.workload import generate

    events = [normalize_line(e) for e in generate(3000, seed=11)]
    await push(redis, settings.live_stream, events)
    await db.close()
    task = asyncio.create_task(drain(batch_size=50))

    # Down once the first batches are in, while most are still to come (a fixed sleep let a
    # fast machine drain them all first).
    async def first_batches_in() -> bool:
        return await group_backlog(redis, settings.live_stream, settings.group) <= 2500

    await until(first_batches_in, step_s=0.005)
    postgres_server.kill()
    await asyncio.sleep(1.5)
    postgres_server.restart()
    await asyncio.wait_for(task, 120)
    assert await redis.xlen(f"{settings.live_stream}:dlq") == 0

    # the same events on a database that never went down give the same state
    import asyncpg

    conn = await asyncpg.connect(settings.database_url)
    clean = settings.replace(streams=(settings.live_stream + "_clean",), group="clean")
    name = "outage_reference"
    postgres_server.create_database(name, template=migrated_template)
    try:
        await push(redis, clean.live_stream, events)
        await drain_replicas(clean.replace(database_url=postgres_server.dsn(name)), 1)
        ref = await asyncpg.connect(postgres_server.dsn(name))
        try:
            assert await snapshot(conn) == await snapshot(ref)
        finally:
            await ref.close()
        await assert_no_drift(conn)
    finally:
        await conn.close()
        postgres_server.drop_database(name)


async def test_actor_row_keeps_the_earliest_event_time_whatever_the_order(
    settings, redis, db, drain
):
    later = create(9, POST, "p1", post_record(), 11) | {"time": "2024-11-19T08:00:00.000Z"}
    earlier = create(9, POST, "p2", post_record(), 10) | {"time": "2024-11-19T07:00:00.000Z"}
    for event in (later, earlier, later):
        await push(redis, settings.live_stream, [event])
        await drain()
    row = await db.fetchrow('SELECT did, "indexedAt" FROM actor')
    assert (row["did"], row["indexedAt"]) == (did(9), "2024-11-19T07:00:00.000Z")


async def test_an_actor_another_batch_inserts_meanwhile_still_gets_the_earlier_time(
    settings, redis, db, database_url, drain
):
    """The actor is new to this batch's snapshot, but a transaction holding a later time
    inserts it first: the batch's insert waits for it and skips the row, and the earlier time
    must still be written (the update after the insert)."""
    other = await asyncpg.connect(database_url)
    try:
        await other.execute("BEGIN")
        await other.execute(
            'INSERT INTO actor (did, "indexedAt") VALUES ($1, $2)',
            did(9),
            "2024-11-19T08:00:00.000Z",
        )
        event = create(9, POST, "p1", post_record(), 10) | {"time": "2024-11-19T07:00:00.000Z"}
        await push(redis, settings.live_stream, [event])
        drained = asyncio.create_task(drain())
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        await until(lambda: db.fetchval(waiting))  # the batch waits on the uncommitted actor
        await other.execute("COMMIT")
        assert await drained == 1
    finally:
        await other.close()
    row = await db.fetchrow('SELECT did, "indexedAt" FROM actor')
    assert (row["did"], row["indexedAt"]) == (did(9), "2024-11-19T07:00:00.000Z")


async def test_the_lowest_uri_of_a_pair_is_the_original_whatever_the_order(
    settings, redis, db, drain
):
    p1 = uri(1, POST, "p1")
    later = [create(3, REPOST, "r5", repost_record(p1), 15)]
    earlier = [create(3, REPOST, "r2", repost_record(p1), 12)]
    middle = [create(3, REPOST, "r3", repost_record(p1), 13)]
    for events in (later, earlier, middle):  # each in its own batch
        await push(redis, settings.live_stream, events)
        await drain()
    assert await db.fetchval("SELECT uri FROM repost") == uri(3, REPOST, "r2")
    items = await db.fetch('SELECT uri, "postUri" FROM feed_item')
    assert [(r["uri"], r["postUri"]) for r in items] == [(uri(3, REPOST, "r2"), p1)]
    dups = await db.fetch('SELECT uri, "duplicateOf" FROM duplicate_record ORDER BY uri')
    assert [(r["uri"], r["duplicateOf"]) for r in dups] == [
        (uri(3, REPOST, "r3"), uri(3, REPOST, "r2")),
        (uri(3, REPOST, "r5"), uri(3, REPOST, "r2")),
    ]
    assert await db.fetchval('SELECT "repostCount" FROM post_agg') == 1
    await push(redis, settings.live_stream, [delete(3, REPOST, "r2", 16)])
    await drain()
    assert await db.fetchval("SELECT uri FROM repost") == uri(3, REPOST, "r3")
    assert await db.fetchval("SELECT uri FROM feed_item") == uri(3, REPOST, "r3")
    dups = await db.fetch('SELECT uri, "duplicateOf" FROM duplicate_record')
    assert [(r["uri"], r["duplicateOf"]) for r in dups] == [
        (uri(3, REPOST, "r5"), uri(3, REPOST, "r3"))
    ]
    assert await db.fetchval('SELECT "repostCount" FROM post_agg') == 1
    await assert_no_drift(db)


async def test_stop_past_the_grace_period_hands_the_batch_back(settings, redis, db):
    """A batch stuck past the grace period is cancelled un-ACKed, and indexed by the next run."""
    from indexer.metrics import Metrics
    from indexer.replica import Replica
    from plugins import registry

    p1 = uri(1, POST, "p1")
    await push(redis, settings.live_stream, [create(2, LIKE, f"l{n}", like_record(p1), 10 + n)
                                             for n in range(20)])  # fmt: skip
    await redis.xgroup_create(settings.live_stream, settings.group, id="0")
    blocker = db.transaction()
    await blocker.start()
    await db.execute("LOCK TABLE record_state IN ACCESS EXCLUSIVE MODE")
    replica = Replica(settings.replace(shutdown_grace_s=0.2), registry(), Metrics())
    task = asyncio.create_task(replica.run())
    deadline = asyncio.get_running_loop().time() + 20
    while (await redis.xpending(settings.live_stream, settings.group))["pending"] == 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    replica.stop()
    await asyncio.wait_for(task, 10)  # returns on its own, after the grace period
    pending = await redis.xpending(settings.live_stream, settings.group)
    assert pending["pending"] == 20  # handed back: nothing ACKed without its commit
    await blocker.rollback()
    assert await db.fetchval("SELECT count(*) FROM record") == 0
    # the same consumer name, restarted, picks its pending entries up first
    again = Replica(settings, registry(), Metrics())
    await asyncio.wait_for(again.run(drain=True), 30)
    assert await db.fetchval('SELECT "likeCount" FROM post_agg WHERE uri = $1', p1) == 1
    assert await db.fetchval("SELECT count(*) FROM record") == 20
    assert (await redis.xpending(settings.live_stream, settings.group))["pending"] == 0
    await assert_no_drift(db)


async def test_recovery_of_own_pending_does_not_take_up_the_other_workers_entries(
    settings, redis, db
):
    from indexer.metrics import Metrics
    from indexer.replica import Replica
    from indexer.stream import StreamConsumer
    from plugins import registry

    events = [
        create(n % 50, LIKE, f"l{n:05d}", like_record(uri(1, POST, f"p{n % 7}")), 10 + n)
        for n in range(3000)
    ]
    await push(redis, settings.live_stream, events)
    await StreamConsumer(settings, redis).ensure_groups()
    # a run that crashed after reading 100 entries left them pending on this consumer
    await redis.xreadgroup(settings.group, settings.consumer, {settings.live_stream: ">"}, 100)
    metrics = Metrics()
    replica = Replica(settings.replace(concurrency=4, batch_size=20), registry(), metrics)
    await asyncio.wait_for(replica.run(drain=True), 120)

    def events_total(outcome: str) -> float:
        return (
            metrics.registry.get_sample_value(
                "indexer_events_total",
                {"collection": LIKE, "operation": "create", "outcome": outcome},
            )
            or 0.0
        )

    assert events_total("indexed") == 3000
    assert events_total("unchanged") == 0  # no entry was processed twice
    assert await db.fetchval("SELECT count(*) FROM record") == 3000
    await assert_no_drift(db)


async def test_two_replicas_on_the_workload_take_locks_in_one_order(settings, redis, db):
    """Every batch locks actors before record_state and the rest in one order, so concurrent
    batches of the generated workload (identity and account events included) never deadlock."""
    events = list(normalize_line(line) for line in generate(6000, seed=3))
    kinds = Counter(msgspec.json.decode(e)["type"] for e in events)
    assert kinds["identity"] > 10 and kinds["account"] > 5  # the test exercises them
    await push(redis, settings.live_stream, events)
    metrics = [Metrics() for _ in range(2)]
    replicas = [
        Replica(settings.replace(consumer=f"r{n}", batch_size=100, concurrency=2), registry(), m)
        for n, m in enumerate(metrics)
    ]
    await asyncio.wait_for(asyncio.gather(*(r.run(drain=True) for r in replicas)), 120)
    retried = [
        m.registry.get_sample_value("indexer_batch_retries_total", {"reason": "contention"})
        for m in metrics
    ]
    assert retried == [None, None]  # no deadlock, no serialization failure
    await assert_no_drift(db)


async def _index_with_records_locked(
    settings, redis, db, drain, *, held: int, setting: str, others: int, batch_size: int
) -> tuple[list[str], Metrics, Any, asyncio.Task[None]]:
    """Index `held` likes; then set `setting` (`lock_timeout = '50ms'`) for new sessions of the
    test's database, lock the held likes' guard rows in a transaction of `db`, push a delete of
    each among `others` new likes, and start a replica on them. Returns the held likes' uris,
    the replica's metrics, the lock's transaction and the replica's task."""
    rkeys = [f"h{n}" for n in range(held)]
    first = [
        create(1, LIKE, k, like_record(uri(9, POST, f"p{n}")), 10 + n) for n, k in enumerate(rkeys)
    ]
    await push(redis, settings.live_stream, first)
    assert await drain() == held
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f'ALTER DATABASE "{name}" SET {setting}')  # new sessions
    entries = [
        create(2 + n % 5, LIKE, f"l{n:03d}", like_record(uri(8, POST, f"p{n}")), 30 + n)
        for n in range(others)
    ]
    for n, rkey in enumerate(rkeys):  # spread over the batch
        entries.insert(n * (others // held + 1), delete(1, LIKE, rkey, 20 + n))
    metrics = Metrics()
    replica = Replica(settings.replace(batch_size=batch_size, concurrency=1), registry(), metrics)
    uris = [uri(1, LIKE, k) for k in rkeys]
    lock = db.transaction()
    await lock.start()
    await db.execute("SELECT 1 FROM record_state WHERE uri = ANY($1) FOR UPDATE", uris)
    await push(redis, settings.live_stream, entries)
    return uris, metrics, lock, asyncio.create_task(replica.run(drain=True))


async def _until_the_others_committed(db, held: list[str], others: int) -> None:
    async def committed() -> bool:
        return await db.fetchval('SELECT count(*) FROM "like" WHERE uri <> ALL($1)', held) == others

    await until(committed, within_s=30)


def _timeouts(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("indexer_batch_retries_total", {"reason": "timeout"})
    return value or 0.0


async def _assert_all_indexed(settings, redis, db, likes: int) -> None:
    """After the lock: the held likes deleted, the others there, nothing dead-lettered or left."""
    assert await db.fetchval('SELECT count(*) FROM "like"') == likes
    assert await redis.xlen(f"{settings.live_stream}:dlq") == 0
    assert await group_backlog(redis, settings.live_stream, settings.group) == 0
    await assert_no_drift(db)


async def test_a_timed_out_batch_is_split_so_the_rest_commits_while_one_record_is_locked(
    settings, redis, db, drain
):
    """A statement_timeout cancels the batch waiting on a record that another client holds
    locked: the replica splits the batch until everything else has committed (and is ACKed),
    retries the one entry until the lock is gone, and dead-letters nothing."""
    held, metrics, lock, run = await _index_with_records_locked(
        settings, redis, db, drain,
        held=1, setting="statement_timeout = '300ms'", others=63, batch_size=64,
    )  # fmt: skip
    try:
        await _until_the_others_committed(db, held, 63)
        assert await db.fetchval('SELECT count(*) FROM "like" WHERE uri = $1', held[0]) == 1

        async def only_held_pending() -> bool:  # the committed parts are ACKed meanwhile
            pending = await redis.xpending(settings.live_stream, settings.group)
            return pending["pending"] == 1

        await until(only_held_pending, within_s=10)
        assert not run.done()
        assert _timeouts(metrics) >= 6  # 64 halved down to the one entry
    finally:
        await lock.rollback()
        await asyncio.wait_for(run, 30)
    await _assert_all_indexed(settings, redis, db, 63)


async def test_entries_that_keep_timing_out_are_retried_with_backoff_not_back_to_back(
    settings, redis, db, drain
):
    """Two records locked elsewhere and a lock_timeout of 50 ms: everything else commits, and
    the two entries left take turns with growing pauses, not one attempt after the other."""
    held, metrics, lock, run = await _index_with_records_locked(
        settings, redis, db, drain,
        held=2, setting="lock_timeout = '50ms'", others=30, batch_size=32,
    )  # fmt: skip
    try:
        await _until_the_others_committed(db, held, 30)
        before = _timeouts(metrics)
        await asyncio.sleep(3)
        # back to back, at 50 ms an attempt, the two would time out about 60 times in 3 s
        assert 2 <= _timeouts(metrics) - before <= 20
    finally:
        await lock.rollback()
        await asyncio.wait_for(run, 30)
    await _assert_all_indexed(settings, redis, db, 30)
