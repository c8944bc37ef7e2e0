"""A celebrity post and account take half the likes and follows: two replicas keep up, exactly.

Concurrent batches all touch the celebrity's counter rows; summed per batch and applied in key
order, each batch updates each row once and the replicas never deadlock.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import msgspec
import pytest

from indexer.events import normalize_line
from indexer.metrics import Metrics
from indexer.replica import Replica
from indexer.workload import FOLLOW, LIKE, POST, generate
from plugins import registry
from tests.helpers import assert_no_drift, push

EVENTS = 4000
SHARE = 0.5

pytestmark = pytest.mark.timeout(60)


class Celebrity(msgspec.Struct):
    """What the generated events themselves say about the celebrity, without a database."""

    post: str
    did: str
    likes_made: int = 0
    likes: int = 0  # creators with a live like of the post at the end
    follows: int = 0  # creators with a live follow of the account at the end


def celebrity_of(lines: list[bytes]) -> tuple[Celebrity, float]:
    """The celebrity's live likes and follows at the end, and its share of the likes made."""
    events = [msgspec.json.decode(line) for line in lines]
    commits = [{"did": e["did"], **e["commit"]} for e in events if e["kind"] == "commit"]
    first = next(c for c in commits if c["collection"] == POST)
    star = Celebrity(f"at://{first['did']}/{POST}/{first['rkey']}", first["did"])
    live: dict[tuple[str, str, str], str] = {}  # (did, collection, rkey) -> subject
    all_likes = 0
    for c in commits:
        key = (c["did"], c["collection"], c["rkey"])
        if c["operation"] == "delete":
            live.pop(key, None)
        elif c["collection"] == LIKE:
            live[key] = c["record"]["subject"]["uri"]
            all_likes += 1
            star.likes_made += live[key] == star.post
        elif c["collection"] == FOLLOW:
            live[key] = c["record"]["subject"]
    # a creator's second like of a post is a duplicate: the post counts the creator once
    star.likes = len({did for (did, col, _), s in live.items() if col == LIKE and s == star.post})
    star.follows = len(
        {did for (did, col, _), s in live.items() if col == FOLLOW and s == star.did}
    )
    return star, star.likes_made / all_likes


async def deadlocks(db: asyncpg.Connection) -> int:
    """Deadlocks PostgreSQL detected in this database, once every other backend has gone (a
    backend reports its statistics at the latest when it exits)."""
    deadline = time.monotonic() + 10
    while await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ):
        assert time.monotonic() < deadline, "other backends still connected"
        await asyncio.sleep(0.05)
    await db.execute("SELECT pg_stat_clear_snapshot()")
    return int(
        await db.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
    )


async def test_two_replicas_keep_a_celebritys_counters_exact(settings, redis, db):
    lines = list(generate(EVENTS, seed=7, celebrity=SHARE))
    star, share = celebrity_of(lines)
    assert share >= 0.4  # the celebrity really is one: the test means nothing otherwise
    assert star.likes > 500 and star.follows > 150
    assert star.likes < star.likes_made  # some of its likes were deleted (or duplicates)
    before = await deadlocks(db)
    await push(redis, settings.live_stream, [normalize_line(line) for line in lines])
    metrics = [Metrics(), Metrics()]
    replicas = [
        Replica(settings.replace(consumer=f"r{n}", batch_size=100, concurrency=3), registry(), m)
        for n, m in enumerate(metrics)
    ]
    await asyncio.wait_for(asyncio.gather(*(r.run(drain=True) for r in replicas)), 45)

    assert all(r.indexed > EVENTS // 10 for r in replicas)  # both replicas took a real part
    group = (await redis.xinfo_groups(settings.live_stream))[0]
    assert (group["pending"], group["lag"], group["entries-read"]) == (0, 0, EVENTS)
    assert await redis.xlen(f"{settings.live_stream}:dlq") == 0
    likes = 'SELECT "likeCount", (SELECT count(*) FROM "like" WHERE subject = $1) ' + (
        "FROM post_agg WHERE uri = $1"
    )
    assert tuple(await db.fetchrow(likes, star.post)) == (star.likes, star.likes)
    follows = 'SELECT "followersCount", (SELECT count(*) FROM follow WHERE "subjectDid" = $1) ' + (
        "FROM profile_agg WHERE did = $1"
    )
    assert tuple(await db.fetchrow(follows, star.did)) == (star.follows, star.follows)
    await assert_no_drift(db)
    assert await deadlocks(db) == before
    retried = [
        m.registry.get_sample_value("indexer_batch_retries_total", {"reason": "contention"})
        for m in metrics
    ]
    assert retried == [None, None]  # no deadlock, no serialization failure, nothing retried


async def test_a_deadlock_is_seen_in_the_statistics(db, database_url):
    """The check above can fail: a real deadlock between two sessions moves the count."""
    await db.execute("CREATE TABLE t (k int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
    before = await deadlocks(db)
    a, b = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        for conn, first in ((a, 1), (b, 2)):
            await conn.execute("BEGIN")
            await conn.execute("UPDATE t SET k = k WHERE k = $1", first)
        crossed = await asyncio.gather(
            a.execute("UPDATE t SET k = k WHERE k = 2"),
            b.execute("UPDATE t SET k = k WHERE k = 1"),
            return_exceptions=True,
        )
        assert sum(isinstance(r, asyncpg.DeadlockDetectedError) for r in crossed) == 1
    finally:
        await a.close()
        await b.close()
    assert await deadlocks(db) == before + 1
