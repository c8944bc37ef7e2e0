"""Bad input: what can be indexed after normalizing is; the rest is dead-lettered with a reason."""

from __future__ import annotations

import msgspec

from indexer.constants import MAX_TEXT_CHARS, UNPARSEABLE_DATE
from tests.helpers import (
    LIKE,
    POST,
    assert_no_drift,
    bad_entries,
    create,
    like_record,
    post_record,
    push,
    unindexable_uri,
    uri,
)


def _good_but_dirty() -> list[dict[str, object]]:
    p1 = post_record("nul\u0000inside")
    big = post_record("x" * (MAX_TEXT_CHARS + 5000))
    dates = post_record("bad date") | {"createdAt": "yesterday"}
    numeric = post_record("numeric date") | {"createdAt": 12345}
    offset = post_record("offset") | {"createdAt": "2024-05-01T12:00:00.5+02:00"}
    return [
        create(1, POST, "p1", p1, 10),
        create(1, POST, "p2", big, 11),
        create(1, POST, "p3", dates, 12),
        create(1, POST, "p4", numeric, 13),
        create(1, POST, "p5", offset, 14),
        create(2, LIKE, "l1", like_record(uri(1, POST, "p1")), 15),
    ]


async def test_bad_entries_are_dead_lettered_and_good_ones_indexed(settings, redis, db, drain):
    bad = bad_entries()
    good = _good_but_dirty()
    stream = settings.live_stream
    # interleave bad and good entries so they share batches
    ids = await push(redis, stream, [*good[:3], *bad.values(), *good[3:]])
    await redis.xadd(stream, {"other": b"no event field"})
    await drain(batch_size=20)

    dlq = await redis.xrange(f"{stream}:dlq")
    reasons = [fields[b"reason"].decode() for _, fields in dlq]
    assert len(dlq) == len(bad) + 1
    for words in bad:
        assert sum(words in r for r in reasons) == 1, (words, reasons)
    assert sum("no `event` field" in r for r in reasons) == 1
    dead_ids = {fields[b"id"].decode() for _, fields in dlq}
    assert set(ids[3 : 3 + len(bad)]) <= dead_ids
    assert {fields[b"stream"].decode() for _, fields in dlq} == {stream}
    raw_by_reason = {f[b"reason"].decode(): f[b"event"] for _, f in dlq}
    assert b"{not json" in raw_by_reason.values()

    posts = {r["uri"].rsplit("/", 1)[1]: r for r in await db.fetch("SELECT * FROM post")}
    assert set(posts) == {"p1", "p2", "p3", "p4", "p5"}
    assert posts["p1"]["text"] == "nulinside"
    assert len(posts["p2"]["text"]) == MAX_TEXT_CHARS
    assert posts["p3"]["createdAt"] == UNPARSEABLE_DATE
    assert posts["p4"]["createdAt"] == UNPARSEABLE_DATE
    assert posts["p5"]["createdAt"] == "2024-05-01T10:00:00.500Z"
    assert posts["p3"]["sortAt"] == UNPARSEABLE_DATE
    like_count = await db.fetchval(
        'SELECT "likeCount" FROM post_agg WHERE uri = $1', uri(1, POST, "p1")
    )
    assert like_count == 1
    groups = await redis.xinfo_groups(stream)
    assert groups[0]["pending"] == 0
    await assert_no_drift(db)


async def test_lone_surrogate_and_escaped_nul_are_indexed(settings, redis, db, drain):
    raw = msgspec.json.encode(create(1, POST, "s1", post_record("PLACEHOLDER"), 10))
    raw = raw.replace(b"PLACEHOLDER", rb"a\ud800b\u0000c")
    await push(redis, settings.live_stream, [raw])
    await drain()
    assert await db.fetchval("SELECT text FROM post") == "a?bc"
    assert await redis.xlen(f"{settings.live_stream}:dlq") == 0


async def test_row_postgres_rejects_is_isolated_from_its_batch(settings, redis, db, drain):
    """A value only PostgreSQL can refuse (an index row too big) fails alone; its batch commits."""
    huge = unindexable_uri()
    events = [create(2, LIKE, f"l{n}", like_record(uri(1, POST, "p1")), 10 + n) for n in range(9)]
    events.insert(4, create(3, LIKE, "huge", like_record(huge), 30))
    ids = await push(redis, settings.live_stream, events)
    await drain(batch_size=50)
    dlq = await redis.xrange(f"{settings.live_stream}:dlq")
    assert len(dlq) == 1
    assert dlq[0][1][b"reason"].startswith(b"database rejected:")
    assert dlq[0][1][b"id"].decode() == ids[4]
    assert await db.fetchval('SELECT count(*) FROM "like"') == 1  # the 9 are one creator's dupes
    assert await db.fetchval("SELECT count(*) FROM duplicate_record") == 8
    assert await db.fetchval("SELECT count(*) FROM record") == 9
    assert await db.fetchval("SELECT count(*) FROM record WHERE uri LIKE '%/huge'") == 0
    await assert_no_drift(db)
