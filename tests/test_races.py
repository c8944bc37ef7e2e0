"""Two batches on one (creator, subject) pair, interleaved on purpose on a real PostgreSQL.

A gated database pauses a batch at a chosen statement or just before its commit, so the other
batch runs in between; the final state must be the one the highest revs say.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec

from indexer.db import connect
from indexer.metrics import Metrics
from indexer.pipeline import Entry, Pipeline
from indexer.replica import Replica
from plugins import registry
from tests.helpers import LIKE, POST, assert_no_drift, create, delete, like_record, push, uri

P1 = uri(1, POST, "p1")


class _Paused:
    """A connection that stops before the first statement containing `marker`."""

    def __init__(self, conn: Any, marker: str | None, gate: GatedDatabase) -> None:
        self._conn, self._marker, self._gate = conn, marker, gate

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name not in ("fetch", "execute"):
            return attr

        async def call(sql: str, *args: Any) -> Any:
            if self._marker and self._marker in sql:
                self._marker = None
                self._gate.reached.set()
                await self._gate.go.wait()
            return await attr(sql, *args)

        return call


class GatedDatabase:
    """Stands in for indexer.db.Database: real connections, with pauses a test controls."""

    def __init__(self, url: str, *, pause_at: str | None = None, hold_commit: bool = False):
        self._url, self._pause_at, self._hold = url, pause_at, hold_commit
        self.reached, self.go = asyncio.Event(), asyncio.Event()
        self.before_commit, self.release = asyncio.Event(), asyncio.Event()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        conn = await connect(self._url)
        try:
            async with conn.transaction():
                yield _Paused(conn, self._pause_at, self)
                if self._hold:
                    self.before_commit.set()
                    await self.release.wait()
        finally:
            await conn.close()


def _batch(*events: dict[str, Any]) -> list[Entry]:
    return [Entry("s", f"{n}-0", msgspec.json.encode(e)) for n, e in enumerate(events, 1)]


async def _state(db: asyncpg.Connection) -> tuple[Any, ...]:
    likes = sorted(r["uri"].rsplit("/", 1)[1] for r in await db.fetch('SELECT uri FROM "like"'))
    dups = sorted(
        (r["uri"].rsplit("/", 1)[1], r["duplicateOf"].rsplit("/", 1)[1])
        for r in await db.fetch('SELECT uri, "duplicateOf" FROM duplicate_record')
    )
    count = await db.fetchval('SELECT "likeCount" FROM post_agg WHERE uri = $1', P1)
    return likes, dups, count


async def _pipeline(url: str, **gate: Any) -> tuple[Pipeline, GatedDatabase]:
    database = GatedDatabase(url, **gate)
    return Pipeline(database, registry()), database  # type: ignore[arg-type]


async def _while_held(url: str, held: list[Entry], other: list[Entry]) -> None:
    """`held` runs up to its commit and waits there; `other` starts meanwhile (and may wait for
    it); after 0.3 s `held` commits, and both finish."""
    plain, _ = await _pipeline(url)
    paused, gate = await _pipeline(url, hold_commit=True)
    first = asyncio.create_task(paused.process(held))
    await gate.before_commit.wait()
    second = asyncio.create_task(plain.process(other))
    await asyncio.sleep(0.3)
    gate.release.set()
    await asyncio.gather(first, second)


async def test_duplicate_recorded_while_its_original_is_deleted(database_url, db):
    plain, _ = await _pipeline(database_url)
    await plain.process(_batch(create(3, LIKE, "l1", like_record(P1), 10)))
    await _while_held(
        database_url,
        _batch(create(3, LIKE, "l5", like_record(P1), 15)),  # l5 a duplicate of l1, held
        _batch(delete(3, LIKE, "l1", 16)),
    )
    assert await _state(db) == (["l5"], [], 1)
    await assert_no_drift(db)


async def test_original_demoted_while_a_concurrent_batch_deletes_it(database_url, db):
    """A's l1 sorts first and takes l5's place, recording l5 as its duplicate; B deletes l5 and
    waits at the row A removed. B's delete found no row to remove, and A's duplicate row for l5
    was committed after B's statement began: B must still remove it."""
    plain, _ = await _pipeline(database_url)
    await plain.process(_batch(create(3, LIKE, "l5", like_record(P1), 10)))
    await _while_held(
        database_url,
        _batch(create(3, LIKE, "l1", like_record(P1), 15)),  # l5 demoted to l1's duplicate
        _batch(delete(3, LIKE, "l5", 16)),  # its rev guard takes l5; its delete waits for A
    )
    assert await _state(db) == (["l1"], [], 1)
    await assert_no_drift(db)


async def test_original_deleted_between_insert_and_lookup(database_url, db):
    plain, _ = await _pipeline(database_url)
    await plain.process(_batch(create(3, LIKE, "l1", like_record(P1), 10)))
    paused, gate = await _pipeline(database_url, pause_at='AS a, "creator" AS b')
    b = asyncio.create_task(paused.process(_batch(create(3, LIKE, "l5", like_record(P1), 15))))
    await gate.reached.wait()
    await plain.process(_batch(delete(3, LIKE, "l1", 16)))  # commits before B looks it up
    gate.go.set()
    await b
    assert await _state(db) == (["l5"], [], 1)
    await assert_no_drift(db)


async def test_promoted_duplicate_deleted_by_a_concurrent_batch(database_url, db):
    plain, _ = await _pipeline(database_url)
    await plain.process(
        _batch(
            create(3, LIKE, "l1", like_record(P1), 10), create(3, LIKE, "l5", like_record(P1), 11)
        )
    )
    assert await _state(db) == (["l1"], [("l5", "l1")], 1)
    await _while_held(
        database_url,
        _batch(delete(3, LIKE, "l1", 20)),  # l5 promoted, held
        _batch(delete(3, LIKE, "l5", 21)),
    )
    assert await _state(db) == ([], [], 0)
    await assert_no_drift(db)


async def test_a_promotion_does_not_deadlock_with_a_batch_on_the_duplicate(database_url, db):
    """A deletes an original (l1) and x1; B deletes l1's duplicate (l5) and x1. A's guard locks
    l5 with its own records, in uri order, so B waits for A at l5. Before, B's guard held l5
    and waited for A at x1 while A's promotion waited for l5: a deadlock."""
    x1 = (4, LIKE, "x1")
    plain, _ = await _pipeline(database_url)
    await plain.process(
        _batch(
            create(3, LIKE, "l1", like_record(P1), 10),
            create(3, LIKE, "l5", like_record(P1), 11),
            create(*x1, like_record(uri(1, POST, "p2")), 12),
        )
    )
    assert await _state(db) == (["l1", "x1"], [("l5", "l1")], 1)
    paused, gate = await _pipeline(database_url, pause_at="ORDER BY s.uri FOR UPDATE")
    a = asyncio.create_task(paused.process(_batch(delete(3, LIKE, "l1", 20), delete(*x1, 20))))
    await gate.reached.wait()  # A's guard has run; A is about to lock l1's duplicates
    b = asyncio.create_task(plain.process(_batch(delete(3, LIKE, "l5", 21), delete(*x1, 21))))
    await asyncio.sleep(0.3)  # B's guard is waiting for A
    gate.go.set()
    await asyncio.gather(a, b)
    assert await _state(db) == ([], [], 0)
    await assert_no_drift(db)


async def test_deeply_nested_entry_is_dead_lettered_not_a_crash_loop(settings, redis, db):
    deep = (
        b'{"type":"create","did":"did:plc:x","rev":"3kaaaaaaaaaaa","collection":"app.bsky.feed'
        b'.like","rkey":"a","record":{"subject":{"uri":"x","cid":"y"},"j":'
        + b"[" * 1200
        + b"]" * 1200
        + b"}}"
    )
    good = [create(2, LIKE, f"l{n}", like_record(P1), 10 + n) for n in range(5)]
    await push(redis, settings.live_stream, [deep, *good])
    replica = Replica(settings, registry(), Metrics())
    await asyncio.wait_for(replica.run(drain=True), 30)
    dlq = await redis.xrange(f"{settings.live_stream}:dlq")
    assert len(dlq) == 1
    assert b"nest" in dlq[0][1][b"reason"].lower()
    assert await db.fetchval("SELECT count(*) FROM record") == 5


Q1 = uri(1, POST, "q1")


async def _pairs(db: asyncpg.Connection) -> tuple[Any, ...]:
    """(like rkey, subject rkey) rows, (duplicate, original) rows, likeCount per post rkey."""

    def short(value: str) -> str:
        return value.rsplit("/", 1)[1]

    likes = sorted(
        (short(r["uri"]), short(r["subject"]))
        for r in await db.fetch('SELECT uri, subject FROM "like"')
    )
    dups = sorted(
        (short(r["uri"]), short(r["duplicateOf"]))
        for r in await db.fetch('SELECT uri, "duplicateOf" FROM duplicate_record')
    )
    counts = {
        short(r["uri"]): r["likeCount"]
        for r in await db.fetch('SELECT uri, "likeCount" FROM post_agg WHERE "likeCount" > 0')
    }
    return likes, dups, counts


def _likes(*pairs: tuple[str, str]) -> list[Entry]:
    return _batch(*(create(3, LIKE, k, like_record(s), n) for n, (k, s) in enumerate(pairs, 10)))


def _move(rkey: str, subject: str, r: int) -> dict[str, Any]:
    return create(3, LIKE, rkey, like_record(subject), r, op="update")


async def test_a_duplicate_moved_to_another_pair_is_not_promoted(database_url, db):
    """One batch deletes the original and moves a duplicate to another post."""
    plain, _ = await _pipeline(database_url)
    await plain.process(_likes(("l1", P1), ("l2", Q1), ("l5", P1), ("l7", P1)))
    assert await _pairs(db) == (
        [("l1", "p1"), ("l2", "q1")], [("l5", "l1"), ("l7", "l1")], {"p1": 1, "q1": 1}
    )  # fmt: skip
    await plain.process(_batch(delete(3, LIKE, "l1", 20), _move("l5", Q1, 21)))
    assert await _pairs(db) == ([("l2", "q1"), ("l7", "p1")], [("l5", "l2")], {"p1": 1, "q1": 1})
    await assert_no_drift(db)


async def test_a_moved_duplicate_sorting_first_takes_its_new_pair(database_url, db):
    plain, _ = await _pipeline(database_url)
    await plain.process(_likes(("l1", P1), ("l5", P1), ("l7", P1), ("l9", Q1)))
    await plain.process(_batch(delete(3, LIKE, "l1", 20), _move("l5", Q1, 21)))
    assert await _pairs(db) == ([("l5", "q1"), ("l7", "p1")], [("l9", "l5")], {"p1": 1, "q1": 1})
    await plain.process(_batch(delete(3, LIKE, "l5", 30)))
    assert await _pairs(db) == ([("l7", "p1"), ("l9", "q1")], [], {"p1": 1, "q1": 1})
    await assert_no_drift(db)


async def test_promotion_waits_for_a_concurrent_move_of_the_heir(database_url, db):
    """B moves duplicate l5 to another post and holds its commit; A deletes the original l1."""
    plain, _ = await _pipeline(database_url)
    await plain.process(_likes(("l1", P1), ("l2", Q1), ("l5", P1), ("l7", P1)))
    await _while_held(
        database_url,
        _batch(_move("l5", Q1, 21)),
        _batch(delete(3, LIKE, "l1", 20)),  # deletes l1, then waits on l5's rev-guard row
    )
    assert await _pairs(db) == ([("l2", "q1"), ("l7", "p1")], [("l5", "l2")], {"p1": 1, "q1": 1})
    await assert_no_drift(db)


async def test_a_row_left_behind_under_another_pair_is_dead_lettered_not_retried_forever(
    database_url, db
):
    """Rows written outside the indexer (no rev-guard state) cannot wedge a batch."""
    plain, _ = await _pipeline(database_url)
    await db.execute(
        'INSERT INTO "like" (uri, cid, creator, subject, "subjectCid", "createdAt", "indexedAt") '
        "VALUES ($1, 'c', $2, $3, 'c', 't', 't')",
        uri(3, LIKE, "l1"), "did:plc:user0003", Q1,
    )  # fmt: skip
    outcome = await plain.process(_likes(("l1", P1), ("l2", P1)))
    assert [reason for _, reason in outcome.dead] == [
        f"database rejected: {uri(3, LIKE, 'l1')} is already indexed with another subject"
    ]
    assert await _pairs(db) == ([("l1", "q1"), ("l2", "p1")], [], {"p1": 1})
