"""The consumer's reads (XREADGROUP replies as the server sends them) under RESP2 and RESP3."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from indexer.stream import StreamConsumer


@pytest.mark.parametrize("protocol", [2, 3])
async def test_reads_take_the_event_field_wherever_it_stands(settings, protocol):
    live, backfill = settings.streams
    client = aioredis.Redis.from_url(settings.redis_url, protocol=protocol)
    try:
        consumer = StreamConsumer(settings, client)
        await consumer.ensure_groups()
        first = await client.xadd(live, {"event": b'{"n":1}'})
        second = await client.xadd(live, {"source": b"x", "event": b'{"n":2}', "z": b"1"})
        third = await client.xadd(live, {"other": b"no event here"})
        queued = await client.xadd(backfill, {"event": b'{"n":4}'})

        entries = await consumer.read_new(10, 0)
        assert [(e.stream, e.id, e.raw) for e in entries] == [
            (live, first.decode(), b'{"n":1}'),
            (live, second.decode(), b'{"n":2}'),
            (live, third.decode(), None),
        ]
        # The live stream has nothing new: the other streams are read.
        entries = await consumer.read_new(10, 0)
        assert [(e.stream, e.id, e.raw) for e in entries] == [
            (backfill, queued.decode(), b'{"n":4}')
        ]
        assert await consumer.read_new(10, 0) == []

        # An entry deleted while pending comes back without fields: no event, nothing lost.
        await client.xdel(live, second)
        pending = await consumer.read_pending(live, "0", 10)
        assert [(e.id, e.raw) for e in pending] == [
            (first.decode(), b'{"n":1}'),
            (second.decode(), None),
            (third.decode(), None),
        ]
    finally:
        await client.aclose()


async def test_claimed_entries_keep_their_event_and_count_a_delivery(settings, redis):
    live = settings.live_stream
    await StreamConsumer(settings, redis).ensure_groups()
    ids = [(await redis.xadd(live, {"event": f'{{"n":{n}}}'.encode()})).decode() for n in range(3)]
    other = StreamConsumer(settings.replace(consumer="other"), redis)
    assert len(await other.read_new(10, 0)) == 3

    mine = StreamConsumer(settings, redis)
    pending = await mine.idle_pending(live, 0, 10)
    claimed = await mine.claim(live, pending, 0)
    assert [(e.id, e.raw, e.deliveries) for e in claimed] == [
        (ids[n], f'{{"n":{n}}}'.encode(), 2) for n in range(3)
    ]


async def test_the_callers_client_keeps_redis_pys_replies(settings, redis):
    live = settings.live_stream
    consumer = StreamConsumer(settings, redis)
    await consumer.ensure_groups()
    first = await redis.xadd(live, {"event": b'{"n":1}'})
    second = await redis.xadd(live, {"event": b'{"n":2}'})
    assert [(e.id, e.raw) for e in await consumer.read_new(1, 0)] == [(first.decode(), b'{"n":1}')]
    reply = await redis.xreadgroup(settings.group, "someone", {live: ">"}, count=1)
    assert reply == [[live.encode(), [(second, {b"event": b'{"n":2}'})]]]
