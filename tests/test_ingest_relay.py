"""`indexer ingest relay` against a fake relay serving real DAG-CBOR frames and CAR blocks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import cbrrr
import msgspec
import pytest
import redis.asyncio as aioredis

from indexer.car import car_blocks
from indexer.constants import cursor_key
from indexer.events import time_from_us
from indexer.relay import RelaySource
from indexer.source import BadFrame, host_of
from tests.fake_relay import (
    CBOR_GARBAGE,
    FakeRelay,
    car,
    commit_frame,
    error_frame,
    frame,
    frames_for,
    relay_record,
)
from tests.ingest_helpers import (
    cli_env,
    envelopes_of,
    ingest_settings,
    kill_9_repeatedly,
    length_at_least,
    running,
    sample,
    stream_entries,
    until,
    workload,
)

DID = "did:plc:special"
LINK = cbrrr.CID.cidv1_dag_cbor_sha256_32_from(b"an image").encode()
T = time_from_us(1_732_000_100_000_000)


@pytest.fixture
async def client(redis_server):
    redis = aioredis.Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


def _cid(record: dict[str, Any]) -> str:
    return cbrrr.CID.cidv1_dag_cbor_sha256_32_from(
        cbrrr.encode_dag_cbor(record, atjson_mode=True)
    ).encode()


def _as_relay_sends(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The envelopes the relay path should give for workload events: as Jetstream's, but with
    the relay's seq, the commit's CID and the record's real CID."""
    out = []
    for seq, envelope in enumerate(envelopes_of(events), start=1):
        expected = msgspec.json.decode(envelope) | {"seq": seq}
        expected.pop("commit", None)  # Jetstream has none; the relay's is checked by _decoded
        if "record" in expected:
            expected["record"] = relay_record(expected["record"])
            expected["cid"] = _cid(expected["record"])
        out.append(expected)
    return out


def _decoded(entries: list[bytes]) -> list[dict[str, Any]]:
    decoded = [msgspec.json.decode(e) for e in entries]
    for envelope in decoded:
        assert envelope.pop("commit", "bafy").startswith("bafy")  # the commit's CID, if any
    return decoded


def _special_frames(first_seq: int) -> list[bytes]:
    post = {
        "$type": "app.bsky.feed.post",
        "text": "with an image",
        "createdAt": T,
        "embed": {"$type": "app.bsky.embed.images", "images": [{"image": {"$link": LINK}}]},
        "extra": {"$bytes": "AAECAw"},
    }
    profile = {"$type": "app.bsky.actor.profile", "displayName": "Special", "createdAt": T}
    ops = [
        {"action": "create", "collection": "app.bsky.feed.post", "rkey": "3kpost", "record": post},
        {"action": "update", "collection": "app.bsky.actor.profile", "rkey": "self",
         "record": profile},
        {"action": "delete", "collection": "app.bsky.feed.like", "rkey": "3klike"},
        {"action": "create", "collection": "com.example.thing", "rkey": "1", "record": {"a": 1}},
    ]  # fmt: skip
    seq = first_seq
    too_big = {
        "seq": seq + 1, "rebase": False, "tooBig": True, "repo": DID,
        "commit": cbrrr.CID.cidv1_dag_cbor_sha256_32_from(b"c"), "rev": "3l2", "since": None,
        "blocks": b"", "ops": [], "blobs": [], "time": T,
    }  # fmt: skip
    root = cbrrr.CID.cidv1_dag_cbor_sha256_32_from(b"root")
    sync = {"seq": seq + 2, "did": DID, "rev": "3l3", "time": T, "blocks": car(root, [])}
    return [
        commit_frame(seq, DID, T, ops),
        frame("#commit", too_big),
        frame("#sync", sync),
        frame("#info", {"name": "OutdatedCursor", "message": "a test"}),
        frame("#labels", {"seq": seq + 3, "labels": []}),  # a kind we do not know
        error_frame("ConsumerTooSlow", "a test"),
        frame("#identity", {"seq": seq + 4, "did": DID, "time": T, "handle": "special.test"}),
    ]


async def test_frames_become_envelopes_with_records_as_appview_json(redis_server, client):
    events = workload(2000)
    frames = frames_for(events) + _special_frames(2001)
    settings = ingest_settings(redis_server.url)
    async with FakeRelay(frames=frames, garbage_at={700: CBOR_GARBAGE}) as fake:
        source = RelaySource(settings.replace(relay_url=fake.base_url))
        async with running(settings, source) as (ingester, metrics):
            await until(length_at_least(client, settings.live_stream, 2004), what="2004 entries")
    entries = _decoded(await stream_entries(client, settings.live_stream))
    assert entries[:2000] == _as_relay_sends(events)
    post, profile, delete, identity = entries[2000:]
    assert post["record"]["embed"]["images"][0]["image"] == {"$link": LINK}
    assert post["record"]["extra"] == {"$bytes": "AAECAw"}
    assert (post["type"], post["seq"], post["did"], post["rkey"]) == ("create", 2001, DID, "3kpost")
    assert (profile["type"], profile["record"]["displayName"]) == ("update", "Special")
    assert (delete["type"], delete["collection"], delete["rkey"]) == (
        "delete", "app.bsky.feed.like", "3klike",
    )  # fmt: skip
    assert identity == {"type": "identity", "seq": 2005, "time": T, "did": DID,
                        "handle": "special.test"}  # fmt: skip
    skipped = {
        reason: sample(metrics, "ingester_skipped_total", source="relay", reason=reason)
        for reason in ("filtered", "too_big", "sync", "info", "unknown", "error", "bad_frame")
    }
    assert skipped == dict.fromkeys(skipped, 1)
    host = host_of(fake.url)
    assert int(await client.get(cursor_key(settings.live_stream, host))) == 2005
    assert ingester.added == 2004
    assert sample(metrics, "ingester_events_total", source="relay", kind="create") > 1500
    assert fake.queries[0] == {}  # nothing saved: live, no cursor


async def test_resumes_from_its_seq_across_drops_stalls_and_restarts(redis_server, client):
    events = workload(3000)
    settings = ingest_settings(redis_server.url, ingester_stall_timeout_s=0.5)
    stream = settings.live_stream
    schedule = [("drop", 500), ("stall", 500), ("stall", 500)]
    async with FakeRelay(events, schedule=schedule) as fake:
        source = RelaySource(settings.replace(relay_url=fake.base_url))
        async with running(settings, source) as (first, _):
            await until(length_at_least(client, stream, 1500), what="1500")
        saved = first.saved.cursor if first.saved else None
        async with running(settings, source) as (_, metrics):
            await until(length_at_least(client, stream, 3000), what="the rest")
    assert saved == 1500
    assert fake.cursors == [None, 500, 1000, 1500]  # exactly where it was: a relay has no rewind
    seqs = [e["seq"] for e in _decoded(await stream_entries(client, stream))]
    assert seqs == list(range(1, 3001))  # none lost, none twice
    assert sample(metrics, "ingester_skipped_total", source="relay", reason="duplicate") == 0


async def test_outdated_and_future_cursors(redis_server, client):
    events = workload(500)
    settings = ingest_settings(redis_server.url)
    async with FakeRelay(events, oldest_seq=101) as fake:
        source = RelaySource(settings.replace(relay_url=fake.base_url))
        async with running(settings, source, start_cursor=10) as (_, metrics):
            await until(length_at_least(client, settings.live_stream, 400), what="from the oldest")
            assert sample(metrics, "ingester_skipped_total", source="relay", reason="info") == 1
        seqs = [e["seq"] for e in _decoded(await stream_entries(client, settings.live_stream))]
        assert seqs == list(range(101, 501))


async def test_a_future_cursor_falls_back_to_the_live_stream(redis_server, client, caplog):
    """The relay's seq was reset below the saved one: say so, once, as an error, and read its
    live stream, whose lower seqs the duplicate check must not drop (nor loop, waiting)."""
    events = workload(100)
    settings = ingest_settings(redis_server.url)
    async with FakeRelay(events) as fake:
        key = cursor_key(settings.live_stream, host_of(fake.url))
        await client.set(key, 5000)
        source = RelaySource(settings.replace(relay_url=fake.base_url))
        with caplog.at_level(logging.ERROR, logger="indexer.ingester"):
            async with running(settings, source) as (ingester, metrics):
                await until(length_at_least(client, settings.live_stream, 100), timeout_s=10)
                await until(lambda: _saved(ingester, 100), what="the last seq saved")
    assert fake.cursors == [5000, None]
    seqs = [e["seq"] for e in _decoded(await stream_entries(client, settings.live_stream))]
    assert seqs == list(range(1, 101))
    assert await client.get(key) == b"100"
    assert sample(metrics, "ingester_skipped_total", source="relay", reason="future_cursor") == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "sequence was reset" in record.getMessage() and "5000" in record.getMessage()


async def _saved(ingester, cursor: int) -> bool:
    return ingester.saved is not None and ingester.saved.cursor == cursor


async def test_error_frames_do_not_reset_the_reconnect_backoff(redis_server, client):
    """A relay that answers every connection with an error frame: the frame is no progress, so
    reconnects back off exponentially instead of hammering it at the base delay."""
    settings = ingest_settings(redis_server.url)
    async with FakeRelay(refuse_with=("ConsumerTooSlow", "go away")) as fake:
        source = RelaySource(settings.replace(relay_url=fake.base_url))
        async with running(settings, source) as (_, metrics):
            await asyncio.sleep(1.5)
    errors = sample(metrics, "ingester_skipped_total", source="relay", reason="error")
    assert 3 <= fake.connections <= 12  # 0.02 s doubling, jittered: about 7 in 1.5 s
    assert fake.connections - 1 <= errors <= fake.connections  # the last may be in flight


async def test_allowlist_is_applied_before_the_stream_and_counted(redis_server, client):
    events = workload(1000)
    settings = ingest_settings(redis_server.url, ingester_collections=("app.bsky.feed.like",))
    likes = [e for e in events if e["kind"] != "commit" or "like" in e["commit"]["collection"]]
    async with FakeRelay(events) as fake:
        source = RelaySource(settings.replace(relay_url=fake.base_url))
        async with running(settings, source) as (ingester, metrics):

            async def done() -> bool:
                return ingester.saved is not None and ingester.saved.cursor == 1000

            await until(done, what="the last seq")
    entries = _decoded(await stream_entries(client, settings.live_stream))
    assert len(entries) == len(likes)
    assert {e.get("collection", "app.bsky.feed.like") for e in entries} == {"app.bsky.feed.like"}
    filtered = sample(metrics, "ingester_skipped_total", source="relay", reason="filtered")
    assert filtered == len(events) - len(likes)


def test_car_blocks_are_split_once_and_kept_raw():
    record = {"$type": "x", "ref": {"$link": LINK}}
    data = cbrrr.encode_dag_cbor(record, atjson_mode=True)
    cid = cbrrr.CID.cidv1_dag_cbor_sha256_32_from(data)
    blocks = car_blocks(car(cid, [(cid, data)]))
    assert {k: bytes(v) for k, v in blocks.items()} == {cid.cid_bytes: data}
    source = RelaySource(ingest_settings("redis://127.0.0.1:1/0"))
    assert source.subscribe_url("wss://relay.example", 42) == (
        "wss://relay.example/xrpc/com.atproto.sync.subscribeRepos?cursor=42"
    )
    for bad in (
        frame("#identity", {"seq": "7", "did": DID, "time": T}),  # seq must be an integer
        frame("#account", {"seq": 7, "did": DID, "time": T}),  # no `active`
        cbrrr.encode_dag_cbor({"op": 1, "t": "#identity"}),  # no body
        CBOR_GARBAGE,
    ):
        with pytest.raises(BadFrame):
            source.decode(bad)


async def test_kill_9_while_streaming_loses_nothing_and_repeats_nothing(redis_server, client):
    """`indexer ingest relay` killed three times mid-stream: every frame's ops exactly once."""
    events = workload(15_000)
    settings = ingest_settings(redis_server.url)
    stream = settings.live_stream
    async with FakeRelay(events) as fake:
        env = cli_env(settings, RELAY_URL=fake.base_url)
        key = cursor_key(stream, host_of(fake.url))
        _, err, code = await kill_9_repeatedly(
            client, env, "relay", key, kills=3, step=1500, total=len(events), stream=stream
        )
    assert code == 0, err[-2000:]
    assert fake.cursors[1:] == sorted(fake.cursors[1:]) and len(fake.cursors) == 4
    seqs = [e["seq"] for e in _decoded(await stream_entries(client, stream))]
    assert seqs == list(range(1, len(events) + 1))
