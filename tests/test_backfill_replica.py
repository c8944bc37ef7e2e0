"""The replica's side of backfill: live entries first, the rev guard between backfilled and live
records, and bulk mode (backfill entries move no counter until `reconcile --all`)."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as aioredis

from indexer.config import Settings
from indexer.drift import drift
from indexer.metrics import Metrics
from indexer.reconcile import reconcile
from indexer.replica import Replica
from indexer.stream import group_backlog
from plugins import registry
from tests.helpers import (
    LIKE,
    POST,
    assert_no_drift,
    create,
    delete,
    like_record,
    post_record,
    push,
    uri,
)

pytestmark = pytest.mark.timeout(40)


def _backfilled(event: dict[str, object]) -> dict[str, object]:
    return event | {"seq": -1}


async def _until_row(db: asyncpg.Connection, sql: str, *args: object) -> None:
    while await db.fetchval(sql, *args) is None:  # noqa: ASYNC110 (polling another process)
        await asyncio.sleep(0.005)


async def _group(redis: aioredis.Redis, stream: str, group: str) -> dict[str, int]:
    """The group's `entries-read` (entries delivered so far) and `lag` on a stream."""
    info = next(g for g in await redis.xinfo_groups(stream) if g["name"].decode() == group)
    return {"read": int(info["entries-read"] or 0), "lag": int(info["lag"] or 0)}


async def test_a_live_entry_is_read_before_any_further_backfill_batch(
    settings: Settings, redis: aioredis.Redis, db: asyncpg.Connection
) -> None:
    """While two workers go through a backfill of 10,000 entries in batches of 50, each live
    entry is read before more than one further backfill batch per worker (one read may already
    be on its way when the live entry arrives), and is indexed."""
    settings = settings.replace(batch_size=50, concurrency=2)
    live, backfill = settings.streams
    posts = [create(1, POST, f"p{n}", post_record(f"post {n}"), n + 1) for n in range(10_000)]
    await push(redis, backfill, [_backfilled(p) for p in posts])
    replica = Replica(settings, registry(), Metrics())
    running = asyncio.create_task(replica.run(drain=True))
    extra_reads = []
    try:
        while (await group_backlog(redis, backfill, settings.group)) > 9000:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for n in range(8):
            before = (await _group(redis, backfill, settings.group))["read"]
            like = create(2 + n, LIKE, "l", like_record(uri(1, POST, "p0")), 10_000 + n)
            await push(redis, live, [like])
            while (await _group(redis, live, settings.group))["lag"]:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            extra_reads.append((await _group(redis, backfill, settings.group))["read"] - before)
            await _until_row(db, 'SELECT 1 FROM "like" WHERE uri = $1', uri(2 + n, LIKE, "l"))
        remaining = await group_backlog(redis, backfill, settings.group)
    finally:
        await asyncio.wait_for(running, 90)
    print(f"backfill entries read while a live entry waited to be read: {extra_reads}")
    assert remaining > 500, "the backfill must still be running to prove anything"
    assert max(extra_reads) <= settings.concurrency * settings.batch_size, extra_reads
    assert await db.fetchval('SELECT count(*) FROM "like"') == 8
    assert await db.fetchval("SELECT count(*) FROM post") == 10_000


async def test_backfilled_and_live_ops_end_in_the_state_of_the_highest_rev(
    settings: Settings, redis: aioredis.Redis, db: asyncpg.Connection, drain: object
) -> None:
    """A repo snapshot at rev 50 against live ops at revs 40 (older) and 60 (newer), in both
    orders of arrival: the newer live ops win, the older ones lose to the snapshot."""
    live, backfill = settings.streams
    post = uri(1, POST, "p")
    snapshot = [  # the repo at rev 50: p, l-old (updated since 40), l-kept
        _backfilled(create(1, POST, "p", post_record("at 50"), 50)),
        _backfilled(create(2, LIKE, "old", like_record(post), 50)),
        _backfilled(create(3, LIKE, "kept", like_record(post), 50)),
    ]
    live_ops = [
        create(1, POST, "p", post_record("at 40"), 40, op="update"),  # older: loses
        delete(2, LIKE, "old", 40),  # older: loses
        delete(3, LIKE, "kept", 60),  # newer: wins
        create(4, LIKE, "new", like_record(post), 60),  # newer, not in the snapshot
    ]
    for first, second in ((backfill, live), (live, backfill)):
        await db.execute('TRUNCATE record_state, record, post, "like", post_agg, profile_agg')
        for stream in (first, second):
            await push(redis, stream, snapshot if stream == backfill else live_ops)
            await drain()  # type: ignore[operator]
        assert await db.fetchval("SELECT text FROM post WHERE uri = $1", post) == "at 50"
        likes = {r["uri"] for r in await db.fetch('SELECT uri FROM "like"')}
        assert likes == {uri(2, LIKE, "old"), uri(4, LIKE, "new")}, (first, likes)
        assert await db.fetchval('SELECT "likeCount" FROM post_agg WHERE uri = $1', post) == 2
        await assert_no_drift(db)


async def test_bulk_backfill_counts_only_live_entries_until_reconcile(
    settings: Settings, redis: aioredis.Redis, db: asyncpg.Connection
) -> None:
    """In bulk mode backfilled likes move no counter and live ones do, exactly; one
    `reconcile --all` then rebuilds every counter."""
    live, backfill = settings.streams
    hot, quiet = uri(1, POST, "hot"), uri(1, POST, "quiet")
    await push(redis, live, [create(1, POST, "hot", post_record(), 1),
                             create(1, POST, "quiet", post_record(), 2)])  # fmt: skip
    await push(redis, backfill, [_backfilled(create(100 + n, LIKE, "b", like_record(hot), 5))
                                 for n in range(300)])  # fmt: skip
    live_likes = [create(500 + n, LIKE, "l", like_record(hot), 6) for n in range(40)]
    live_likes += [create(600 + n, LIKE, "l", like_record(quiet), 7) for n in range(25)]
    await push(redis, live, live_likes)
    bulk = settings.replace(bulk_backfill=True)
    await asyncio.wait_for(Replica(bulk, registry(), Metrics()).run(drain=True), 60)
    counts = dict(await db.fetch('SELECT uri, "likeCount" FROM post_agg'))
    assert counts == {hot: 40, quiet: 25}
    assert await db.fetchval('SELECT count(*) FROM "like" WHERE subject = $1', hot) == 340
    assert (await drift(db))["likeCount"] == 1
    report = await reconcile(settings.database_url, "all")
    assert report.by_counter == {"likeCount": 1}, report
    assert await db.fetchval('SELECT "likeCount" FROM post_agg WHERE uri = $1', hot) == 340
    await assert_no_drift(db)


async def test_backfilled_entries_do_not_hide_the_event_lag(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Backfill envelopes are stamped when fetched: the event lag counts live events only."""
    live, backfill = settings.streams
    now = datetime.now(UTC).isoformat()
    posts = [create(1, POST, f"b{n}", post_record(), 5) for n in range(5)]
    await push(redis, backfill, [_backfilled(p) | {"time": now} for p in posts])
    metrics = Metrics()
    await asyncio.wait_for(Replica(settings, registry(), metrics).run(drain=True), 60)
    assert math.isnan(metrics.registry.get_sample_value("indexer_event_lag_seconds") or 0.0)
    await push(redis, live, [create(2, POST, "live", post_record(), 6)])  # stamped T0, 2024
    await asyncio.wait_for(Replica(settings, registry(), metrics).run(drain=True), 60)
    lag = metrics.registry.get_sample_value("indexer_event_lag_seconds")
    assert lag is not None and lag > 86_400  # from T0, not from the backfill's "now"
