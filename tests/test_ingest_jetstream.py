"""`indexer ingest jetstream` against a fake Jetstream on loopback (never the public network)."""

from __future__ import annotations

import asyncio
import os
import time

import msgspec
import pytest
import redis.asyncio as aioredis

from indexer.config import ConfigError, load_settings
from indexer.constants import cursor_key
from indexer.ingester import Ingester, IngesterMetrics
from indexer.jetstream import JetstreamSource
from indexer.source import Position, host_of
from tests.fake_jetstream import GARBAGE_BINARY, GARBAGE_TEXT, FakeJetstream
from tests.ingest_helpers import (
    cli_env,
    envelopes_of,
    ingest_settings,
    kill_9_repeatedly,
    length_at_least,
    running,
    sample,
    start_cli,
    stream_entries,
    until,
    without_seq,
    workload,
)


@pytest.fixture
async def client(redis_server):
    redis = aioredis.Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


@pytest.mark.parametrize("compress", [False, True], ids=["json", "zstd"])
async def test_every_event_reaches_the_stream_with_its_cursor(redis_server, client, compress):
    events = workload(3000)
    settings = ingest_settings(redis_server.url, jetstream_compress=compress)
    async with FakeJetstream(events) as fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source) as (ingester, metrics):
            await until(length_at_least(client, settings.live_stream, 3000), what="3000 entries")
            assert sample(metrics, "ingester_connected", source="jetstream") == 1
        assert sample(metrics, "ingester_connected", source="jetstream") == 0
        assert fake.queries[0]["wantedCollections"] == ["app.bsky.*"]
        assert fake.queries[0].get("compress") == (["true"] if compress else None)
        assert "cursor" not in fake.queries[0]  # nothing saved: live
    assert await stream_entries(client, settings.live_stream) == envelopes_of(events)
    host = host_of(fake.url)
    assert int(await client.get(cursor_key(settings.live_stream, host))) == events[-1]["time_us"]
    kinds = {e["commit"]["operation"] if e["kind"] == "commit" else e["kind"] for e in events}
    added = {k: sample(metrics, "ingester_events_total", source="jetstream", kind=k) for k in kinds}
    assert sum(added.values()) == 3000 == ingester.added
    assert added["create"] > 2000 and added["delete"] > 100
    assert sample(metrics, "ingester_backpressure") == 0
    assert sample(metrics, "ingester_cursor_lag_seconds") > 0  # the workload's events are old


async def test_restart_resumes_from_the_saved_cursor_rewound_without_duplicates(
    redis_server, client
):
    events = workload(4000)
    settings = ingest_settings(redis_server.url, jetstream_rewind_s=0.5)
    async with FakeJetstream(events, stall_after=1500, faulty_connections=1) as fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source) as (first, _):
            await until(length_at_least(client, settings.live_stream, 1500), what="the first 1500")
        assert first.saved is not None and first.saved.cursor == events[1499]["time_us"]
        async with running(settings, source) as (_, metrics):
            await until(length_at_least(client, settings.live_stream, 4000), what="the rest")
    assert fake.cursors == [None, events[1499]["time_us"] - 500_000]
    assert await stream_entries(client, settings.live_stream) == envelopes_of(events)
    # the rewind replayed about half a second of events; all were recognized and skipped
    replayed = sum(1 for e in events[:1500] if e["time_us"] >= fake.cursors[1])
    assert sample(metrics, "ingester_skipped_total", source="jetstream", reason="duplicate") == (
        replayed
    )
    assert replayed > 100


async def test_drops_stalls_and_garbage_are_survived_and_counted(redis_server, client):
    events = workload(3000)
    gap = next(i for i in range(2000, 3000) if events[i + 1]["time_us"] - events[i]["time_us"] > 1)
    unknown = {"did": "did:plc:unknown", "time_us": events[gap]["time_us"] + 1, "kind": "new"}
    events.insert(gap + 1, unknown)
    settings = ingest_settings(
        redis_server.url, ingester_stall_timeout_s=0.5, jetstream_rewind_s=0.1
    )
    garbage = {100: GARBAGE_TEXT, 700: GARBAGE_BINARY, 1200: "\x00not json either"}
    schedule = [("drop", 400), ("drop", 400), ("stall", 400), ("stall", 400)]
    async with FakeJetstream(events, schedule=schedule, garbage_at=garbage) as fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source) as (_, metrics):
            await until(length_at_least(client, settings.live_stream, 3000), what="all")
    assert await stream_entries(client, settings.live_stream) == envelopes_of(
        [e for e in events if e is not unknown]
    )
    skipped = {
        reason: sample(metrics, "ingester_skipped_total", source="jetstream", reason=reason)
        for reason in ("bad_frame", "unknown")
    }
    assert skipped == {"bad_frame": 3, "unknown": 1}
    closed = sample(metrics, "ingester_disconnects_total", source="jetstream", reason="closed")
    stalled = sample(metrics, "ingester_disconnects_total", source="jetstream", reason="stalled")
    assert closed == 2 and stalled >= 2
    assert fake.connections >= 5


async def test_fails_over_to_the_next_url(redis_server, client):
    events = workload(2000)
    settings = ingest_settings(redis_server.url)
    async with FakeJetstream(events) as fake:
        dead = "ws://127.0.0.1:1/subscribe"
        source = JetstreamSource(settings.replace(jetstream_urls=(dead, fake.url)))
        async with running(settings, source) as (_, metrics):
            all_in = length_at_least(client, settings.live_stream, 2000)
            await until(all_in, what="all from the 2nd")
    assert await stream_entries(client, settings.live_stream) == envelopes_of(events)
    refused = sample(
        metrics, "ingester_disconnects_total", source="jetstream", reason="unreachable"
    )
    assert refused == 1


async def test_another_host_after_a_failure_gets_its_overlap_written(redis_server, client):
    """Another instance stamps its own times: its rewind overlap is written, not skipped."""
    events = workload(3000)
    settings = ingest_settings(redis_server.url, jetstream_rewind_s=0.2)
    async with FakeJetstream(events) as second, FakeJetstream(events, drop_after=1000) as first:
        source = JetstreamSource(settings.replace(jetstream_urls=(first.url, second.url)))
        async with running(settings, source):
            await until(length_at_least(client, settings.live_stream, 1000), what="the first host")
            await first.stop()
            await until(
                lambda: _has_all(client, settings.live_stream, envelopes_of(events)),
                what="the second host",
            )
    entries = await stream_entries(client, settings.live_stream)
    overlap = len(entries) - len(events)
    assert 0 < overlap == sum(1 for e in events[:1000] if e["time_us"] >= second.cursors[0])
    assert sorted(set(entries)) == sorted(set(envelopes_of(events)))


async def _has_all(client, stream, expected) -> bool:
    return set(await stream_entries(client, stream)) >= set(expected)


async def test_v2_messages_carry_a_sequence_cursor(redis_server, client):
    events = workload(1000)
    settings = ingest_settings(redis_server.url)
    async with FakeJetstream(events, version=2, stall_after=600, faulty_connections=1) as fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source):
            await until(length_at_least(client, settings.live_stream, 600), what="600")
        async with running(settings, source):
            await until(length_at_least(client, settings.live_stream, 1000), what="the rest")
    assert fake.cursors == [None, 600]  # a sequence resumes where it was: no rewind
    entries = [msgspec.json.decode(e) for e in await stream_entries(client, settings.live_stream)]
    assert [e["seq"] for e in entries] == list(range(1, 1001))
    key = cursor_key(settings.live_stream, host_of(fake.url))
    assert await client.get(key) == f"1000@{events[-1]['time_us']}".encode()  # seq and time


def test_decoding_filters_counts_and_bounds(redis_server):
    settings = ingest_settings(redis_server.url, ingester_collections=("app.bsky.feed.like",))
    source = JetstreamSource(settings)
    creates = {
        e["commit"]["collection"]: e
        for e in workload(300)
        if e["kind"] == "commit" and e["commit"]["operation"] == "create"
    }
    like, follow = creates["app.bsky.feed.like"], creates["app.bsky.graph.follow"]
    kept = source.decode(msgspec.json.encode(like))
    assert (kept.seq, kept.time_us) == (None, like["time_us"])
    assert [k for k, _ in kept.envelopes] == ["create"]
    dropped = source.decode(msgspec.json.encode(follow))
    assert dropped.envelopes == [] and dropped.skipped == ("filtered",)
    assert dropped.time_us == follow["time_us"]  # the cursor moves past filtered events
    v2 = source.decode(msgspec.json.encode(like | {"cursor": 7}))
    assert (v2.seq, v2.time_us) == (7, like["time_us"])
    url = "wss://js.example/subscribe?x=1"
    cursor = source.resume_cursor(url, Position("js.example", time_us=1_732_000_005_000_000))
    assert source.subscribe_url(url, cursor) == (
        "wss://js.example/subscribe?x=1&wantedCollections=app.bsky.feed.like&compress=true"
        "&cursor=1732000004500000"  # rewound by half a second
    )


def test_saved_positions_are_read_old_and_new_and_compared_like_with_like(redis_server):
    source = JetstreamSource(ingest_settings(redis_server.url))
    t = 1_732_000_005_000_000
    assert source.saved_position("a", str(t)) == Position("a", time_us=t)  # v1, any version
    assert source.saved_position("a", f"600@{t}") == Position("a", seq=600, time_us=t)
    assert source.saved_position("a", "600") == Position("a", seq=600)  # v2 of older versions
    assert Position("a", seq=600, time_us=t).saved_value() == f"600@{t}"
    assert Position("a", time_us=t).saved_value() == str(t)
    # a sequence resumes only on its own host; elsewhere the event time does, rewound
    v2 = Position("a:1", seq=600, time_us=t)
    assert source.resume_cursor("ws://a:1/subscribe", v2) == 600
    assert source.resume_cursor("ws://b:1/subscribe", v2) == t - 500_000
    assert source.resume_cursor("ws://a:1/subscribe", Position("a:1", time_us=t)) == t - 500_000
    # seq with seq of the same host, else time with time; another host repeats nothing
    assert Position("a", seq=600, time_us=t + 9).repeats(Position("a", 600, t))
    assert not Position("a", seq=601, time_us=t - 9).repeats(Position("a", 600, t))
    assert Position("a", seq=5, time_us=t).repeats(Position("a", time_us=t))
    assert not Position("a", seq=5, time_us=t + 1).repeats(Position("a", time_us=t))
    assert not Position("b", seq=5, time_us=t).repeats(Position("a", 600, t))


async def test_v2_failover_resumes_another_host_from_the_event_time(redis_server, client):
    """A v2 sequence means nothing on another instance: it gets the time, rewound, and no event
    is lost (the second instance started later and numbers the same events from 1)."""
    events = workload(1000)
    settings = ingest_settings(redis_server.url)
    async with (
        FakeJetstream(events[300:], version=2) as second,
        FakeJetstream(events, version=2, drop_after=600) as first,
    ):
        source = JetstreamSource(settings.replace(jetstream_urls=(first.url, second.url)))
        async with running(settings, source):
            await until(length_at_least(client, settings.live_stream, 600), what="the first host")
            await first.stop()
            await until(
                lambda: _has_all_but_seq(client, settings.live_stream, envelopes_of(events)),
                timeout_s=10,
                what="the second host",
            )
    assert second.cursors == [events[599]["time_us"] - 500_000]


async def test_restart_resumes_from_the_newest_position_of_any_host(redis_server, client):
    """Saved v2 positions of two hosts: the newest by event time wins, whatever their sequences
    (the second host started later and numbers from 1 at event 500), and the other host is given
    its time; a sequence goes only to the host that numbered it."""
    events = workload(1500)
    settings = ingest_settings(redis_server.url, jetstream_rewind_s=0.1)
    stream = settings.live_stream
    async with (
        FakeJetstream(events, version=2, schedule=[("drop", 600)]) as a,
        FakeJetstream(events[500:1000], version=2) as b,
    ):
        source = JetstreamSource(settings.replace(jetstream_urls=(a.url, b.url)))
        async with running(settings, source):
            await until(
                lambda: _has_all_but_seq(client, stream, envelopes_of(events[:1000])),
                what="a's 600, then b's",
            )
        t599, t999 = events[599]["time_us"], events[999]["time_us"]
        assert b.cursors == [t599 - 100_000]
        host_a, host_b = host_of(a.url), host_of(b.url)
        assert await client.get(cursor_key(stream, host_a)) == f"600@{t599}".encode()
        assert await client.get(cursor_key(stream, host_b)) == f"500@{t999}".encode()
        async with running(settings, source):
            await until(
                lambda: _has_all_but_seq(client, stream, envelopes_of(events)),
                timeout_s=10,
                what="the rest from a",
            )
    assert a.cursors == [None, t999 - 100_000]


async def _has_all_but_seq(client, stream, expected) -> bool:
    return without_seq(await stream_entries(client, stream)) >= without_seq(expected)


async def test_a_saved_v1_time_then_v2_messages_compare_times(redis_server, client):
    """The host saved a time_us while it spoke v1 and now sends v2: its events are compared by
    time with that position, not by sequence (which would drop every one as a duplicate)."""
    events = workload(500)
    settings = ingest_settings(redis_server.url)
    stream = settings.live_stream
    async with FakeJetstream(events, version=2) as fake:
        key = cursor_key(stream, host_of(fake.url))
        await client.set(key, events[100]["time_us"])
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source) as (_, metrics):
            await until(length_at_least(client, stream, 399), timeout_s=10, what="the rest")
    assert fake.cursors == [events[100]["time_us"] - 500_000]
    assert await stream_entries(client, stream) == envelopes_of(events[101:], first_seq=102)
    replayed = sum(1 for e in events[:101] if e["time_us"] >= fake.cursors[0])
    duplicates = sample(metrics, "ingester_skipped_total", source="jetstream", reason="duplicate")
    assert duplicates == replayed > 100
    assert await client.get(key) == f"500@{events[-1]['time_us']}".encode()


async def test_out_of_range_and_future_times_are_skipped_and_counted(redis_server, client):
    """A time_us past year 9999 cannot be converted, one a day ahead would make every later
    event look like a duplicate: both are bad frames, and ingestion goes on."""
    events = workload(300)
    year_10000 = events[50] | {"time_us": 253_402_300_800_000_000}
    tomorrow = events[150] | {"time_us": int((time.time() + 86_400) * 1_000_000)}
    garbage = {50: msgspec.json.encode(year_10000), 150: msgspec.json.encode(tomorrow)}
    settings = ingest_settings(redis_server.url)
    async with FakeJetstream(events, garbage_at=garbage) as fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source) as (_, metrics):
            await until(length_at_least(client, settings.live_stream, 300), timeout_s=10)
    assert await stream_entries(client, settings.live_stream) == envelopes_of(events)
    assert sample(metrics, "ingester_skipped_total", source="jetstream", reason="bad_frame") == 2
    assert fake.connections == 1


@pytest.mark.parametrize("compress", [False, True], ids=["json", "zstd"])
async def test_an_oversized_message_is_skipped_and_the_stream_moves_on(
    redis_server, client, compress
):
    """Over 1 MiB: read whole, counted and skipped, never a closed socket that resumes before
    it (and reads it again) after every reconnect."""
    events = workload(40)
    big = next(
        i
        for i, e in enumerate(events[10:], 10)
        if e["kind"] == "commit" and e["commit"]["operation"] == "create"
    )
    events[big] = msgspec.json.decode(msgspec.json.encode(events[big]))
    events[big]["commit"]["record"]["junk"] = "x" * 1_100_000
    settings = ingest_settings(redis_server.url, jetstream_compress=compress)
    async with FakeJetstream(events) as fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source) as (ingester, metrics):
            await until(length_at_least(client, settings.live_stream, 39), timeout_s=10)
            assert ingester.saved is not None
            assert ingester.saved.cursor == events[-1]["time_us"]
    rest = events[:big] + events[big + 1 :]
    assert await stream_entries(client, settings.live_stream) == envelopes_of(rest)
    assert sample(metrics, "ingester_skipped_total", source="jetstream", reason="too_big") == 1
    assert fake.connections == 1


async def test_an_explicit_cursor_starts_exactly_there(redis_server, client):
    """`--cursor` is where to start, not a saved position: no rewind."""
    events = workload(1000)
    settings = ingest_settings(redis_server.url)
    async with FakeJetstream(events) as fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        start = events[400]["time_us"]
        async with running(settings, source, start_cursor=start):
            await until(length_at_least(client, settings.live_stream, 600), what="600")
    assert fake.cursors == [start]
    assert await stream_entries(client, settings.live_stream) == envelopes_of(events[400:])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_backpressure_blocks_at_the_high_water_mark_and_releases(redis_server, client):
    events = workload(20_000)
    settings = ingest_settings(
        redis_server.url, high_water_mark=500, low_water_mark=250, ingester_queue_size=50
    )
    stream, group = settings.live_stream, settings.group
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    # paced, so that the server is still sending when it sheds its slow consumer
    async with FakeJetstream(events, rate=10_000) as fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source) as (ingester, metrics):

            async def paused() -> bool:
                return sample(metrics, "ingester_backpressure") == 1

            await until(paused, what="backpressure")
            await asyncio.sleep(0.3)
            length, rss, received = await client.xlen(stream), _rss_bytes(), ingester.received
            await asyncio.sleep(1.0)
            # blocked: nothing added, the socket unread, the queue full and no bigger
            assert await client.xlen(stream) == length
            assert 500 <= length <= 550  # a batch overshoots by a tenth of the mark at most
            assert ingester.received == received < len(events)
            assert ingester.queued == 50
            assert sample(metrics, "ingester_stream_backlog") == length  # nothing ACKed yet
            assert sample(metrics, "ingester_queue_size") == 50
            assert _rss_bytes() - rss < 8 * 2**20
            fake.disconnect_all()  # the server sheds its slow consumer meanwhile
            assert fake.sent < len(events)
            acked = await _consume(client, stream, group, len(events))
            assert sample(metrics, "ingester_backpressure") == 0
    assert acked == len(events)
    assert fake.connections >= 2  # it came back from its cursor
    assert await stream_entries(client, stream) == envelopes_of(events)  # none lost, none twice


async def test_the_queue_is_bounded_in_bytes_too(redis_server, client):
    """With room for 10,000 frames but 20,000 bytes, a blocked writer stops the reader at the
    byte bound (plus the frame in hand at most); released, every event arrives once."""
    events = workload(5000)
    settings = ingest_settings(
        redis_server.url, high_water_mark=500, low_water_mark=250,
        ingester_queue_size=10_000, ingester_queue_bytes=20_000,
    )  # fmt: skip
    stream, group = settings.live_stream, settings.group
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    largest = max(len(e) for e in envelopes_of(events))
    async with FakeJetstream(events) as fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source) as (ingester, metrics):

            async def full() -> bool:
                return ingester.queued_bytes >= 20_000

            await until(full, what="the byte bound")
            await asyncio.sleep(0.5)
            received = ingester.received
            await asyncio.sleep(0.5)
            assert ingester.received == received  # the socket is not read meanwhile
            assert 20_000 <= ingester.queued_bytes < 20_000 + largest
            assert ingester.queued < 100  # far under the frame bound
            assert sample(metrics, "ingester_queue_bytes") == ingester.queued_bytes
            acked = await _consume(client, stream, group, len(events))
    assert acked == len(events)
    assert await stream_entries(client, stream) == envelopes_of(events)  # none lost, none twice


async def _consume(client, stream, group, total: int) -> int:
    """Read and ACK as a replica would, until `total` entries were ACKed."""
    acked = 0
    deadline = time.monotonic() + 30
    while acked < total:
        assert time.monotonic() < deadline, f"only {acked} of {total} entries came"
        reply = await client.xreadgroup(group, "c", {stream: ">"}, count=100, block=100)
        ids = [entry_id for _, entries in reply or [] for entry_id, _ in entries]
        if ids:
            await client.xack(stream, group, *ids)
            acked += len(ids)
    return acked


async def test_kill_9_while_streaming_loses_nothing_and_repeats_nothing(redis_server, client):
    """The real CLI killed four times mid-stream: the saved cursor always matches the last entry,
    and the stream ends with every event exactly once."""
    events = workload(30_000)
    settings = ingest_settings(redis_server.url)
    stream = settings.live_stream
    async with FakeJetstream(events) as fake:
        env = cli_env(settings, JETSTREAM_URL=fake.url)
        key = cursor_key(stream, host_of(fake.url))
        out, err, code = await kill_9_repeatedly(
            client, env, "jetstream", key, kills=4, step=2000, total=len(events), stream=stream
        )
    assert code == 0, err[-2000:]
    assert out.startswith("added ") and f"cursor {events[-1]['time_us']} saved" in out
    assert fake.connections == 5
    assert await stream_entries(client, stream) == envelopes_of(events)


async def test_unreachable_server_is_one_line_and_exit_1(redis_server):
    settings = ingest_settings(redis_server.url)
    proc = await start_cli(
        cli_env(settings, JETSTREAM_URL="ws://127.0.0.1:1/subscribe"), "jetstream"
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("error: cannot reach jetstream at ws://127.0.0.1:1/subscribe: ")
    assert "Traceback" not in err.decode()


async def test_a_corrupt_saved_cursor_is_one_line_naming_the_key_and_exit_2(redis_server, client):
    """A saved cursor that is not one stops the start with what to do, not a traceback; the
    key is left as it was for the operator to look at."""
    settings = ingest_settings(redis_server.url)
    url = "ws://127.0.0.1:1/subscribe"
    key = cursor_key(settings.live_stream, host_of(url))
    await client.set(key, b"12x@")
    proc = await start_cli(cli_env(settings, JETSTREAM_URL=url), "jetstream")
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert err.decode().strip().splitlines()[-1] == (
        f"error: the cursor saved in {key} is not a cursor: '12x@'; "
        "delete the key to start live, or give --cursor"
    )
    assert await client.get(key) == b"12x@"


def test_settings_of_the_ingesters():
    settings = load_settings({"INGESTER_HIGH_WATER_MARK": "1000", "JETSTREAM_COMPRESS": "off"})
    assert (settings.low_water_mark_resolved, settings.jetstream_compress) == (800, False)
    assert load_settings({"INGESTER_COLLECTIONS": "a.b.*, c.d"}).ingester_collections == (
        "a.b.*", "c.d",
    )  # fmt: skip
    for env, message in (
        ({"INGESTER_QUEUE_SIZE": "0"}, "INGESTER_QUEUE_SIZE must be at least 1, got 0"),
        ({"INGESTER_QUEUE_BYTES": "0"}, "INGESTER_QUEUE_BYTES must be at least 1, got 0"),
        ({"INGESTER_LOW_WATER_MARK": "2000000"}, "INGESTER_LOW_WATER_MARK must be between"),
        ({"JETSTREAM_COMPRESS": "maybe"}, "JETSTREAM_COMPRESS has an invalid value: 'maybe'"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings(env)


async def test_health_turns_503_when_the_source_goes_silent(redis_server, client):
    """The socket stays open while nothing arrives: /health says so, with the seconds."""
    from indexer.health import serving
    from tests.observe import free_port, get

    events = workload(300)
    settings = ingest_settings(redis_server.url, stall_after_s=0.5, ingester_stall_timeout_s=30)
    async with FakeJetstream(events, stall_after=300) as fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source) as (ingester, metrics):
            port = free_port()
            async with serving(metrics.registry, ingester.health, port):
                await until(length_at_least(client, settings.live_stream, 300), what="300 entries")
                assert await get(port, "/ready") == (200, "ready\n")
                assert (await get(port, "/health"))[0] == 200
                await asyncio.sleep(0.8)  # the fake keeps the socket open and sends nothing
                status, body = await get(port, "/health")
                assert status == 503
                assert body.startswith("no progress for ")
                assert float(body.split()[3]) >= 0.5


async def test_one_event_ahead_of_the_others_does_not_hide_those_after_it(redis_server, client):
    """Half an hour ahead is odd but possible: it is added, and the older events after it are
    not taken for repeats (only the overlap right after a resume is checked)."""
    events = workload(300)
    ahead = events[150] | {"time_us": int((time.time() + 1800) * 1_000_000)}
    settings = ingest_settings(redis_server.url)
    async with FakeJetstream(events, garbage_at={150: msgspec.json.encode(ahead)}) as fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source) as (_, metrics):
            await until(length_at_least(client, settings.live_stream, 301), timeout_s=10)
    expected = envelopes_of([*events[:150], ahead, *events[150:]])
    assert await stream_entries(client, settings.live_stream) == expected
    assert sample(metrics, "ingester_skipped_total", source="jetstream", reason="duplicate") == 0


async def test_the_backlog_ignores_entries_trimmed_before_delivery(redis_server, client):
    """A foreign XTRIM MAXLEN drops entries the group never read; Redis 7.0 counts them as lag
    forever. The backlog that gates backpressure must not, or the ingester would stay paused."""
    settings = ingest_settings(redis_server.url)
    stream, group = settings.live_stream, settings.group
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    for n in range(10):
        await client.xadd(stream, {"event": b"{}", "n": n})
    for count in (2, None):
        if count is None:
            await client.xtrim(stream, maxlen=3, approximate=False)
        reply = await client.xreadgroup(group, "c", {stream: ">"}, count=count)
        await client.xack(stream, group, *[i for _, entries in reply for i, _ in entries])
    [info] = await client.xinfo_groups(stream)
    assert info["lag"] == 5  # what Redis says
    ingester = Ingester(settings, JetstreamSource(settings), IngesterMetrics("jetstream"))
    try:
        assert await ingester._backlog() == 0
        await client.xadd(stream, {"event": b"{}"})
        # Redis now says 6, more than the stream holds: the stream's length stands in for it
        assert await ingester._backlog() == await client.xlen(stream) == 4
    finally:
        await ingester._redis.aclose()
