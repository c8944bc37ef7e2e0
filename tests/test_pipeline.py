"""The core pipeline against real Redis and PostgreSQL: rows, counters, replays, order."""

from __future__ import annotations

import random

from tests.helpers import (
    FOLLOW,
    LIKE,
    POST,
    REPOST,
    assert_no_drift,
    create,
    delete,
    did,
    follow_record,
    like_record,
    post_record,
    push,
    repost_record,
    snapshot,
    uri,
)


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
        from tests.helpers import drain_replicas

        await drain_replicas(other.replace(batch_size=2), 3)
        assert await snapshot(db) == in_order, f"seed {seed}"
        await assert_no_drift(db)
