"""End to end: fake server -> ingester -> two replicas -> PostgreSQL, against `ingest file`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import msgspec
import pytest

from indexer.ingest_file import ingest_file
from indexer.jetstream import JetstreamSource
from indexer.relay import RelaySource
from tests.fake_jetstream import GARBAGE_TEXT, FakeJetstream
from tests.fake_relay import FakeRelay
from tests.helpers import assert_no_drift, drain_replicas, snapshot
from tests.ingest_helpers import running, until, workload

EVENTS = 3000


@pytest.fixture
def reference_url(postgres_server, migrated_template) -> Iterator[str]:
    name = f"ref_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(name, template=migrated_template)
    yield postgres_server.dsn(name)
    postgres_server.drop_database(name)


async def _reference(settings, events: list[dict[str, Any]], url: str, tmp_path) -> dict[str, Any]:
    """The state the same events give through `indexer ingest file`, in a database of its own."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(msgspec.json.encode(e) for e in events) + b"\n")
    ref = settings.replace(
        database_url=url, streams=(settings.live_stream + "_ref",), group=settings.group + "_ref"
    )
    assert (await ingest_file(ref, str(path))).added == len(events)
    await drain_replicas(ref, 1)
    conn = await asyncpg.connect(url)
    try:
        return await snapshot(conn)
    finally:
        await conn.close()


async def _drained_by_two(redis, settings) -> None:
    """Two replicas drain the group: every entry the server sent was read and ACKed."""
    assert await drain_replicas(settings, 2) > EVENTS * 0.9
    (group,) = await redis.xinfo_groups(settings.live_stream)
    assert (group["entries-read"], group["lag"], group["pending"]) == (EVENTS, 0, 0)


def _fast(settings):
    return settings.replace(ingester_backoff_s=0.02, jetstream_rewind_s=0.3)


async def _ingested(redis, settings, n: int) -> None:
    async def check() -> bool:
        return await redis.xlen(settings.live_stream) >= n

    await until(check, what=f"{n} entries")


async def test_jetstream_to_two_replicas_matches_ingest_file(
    settings, redis, db, reference_url, tmp_path
):
    events = workload(EVENTS, seed=5)
    settings = _fast(settings)
    fake = FakeJetstream(events, schedule=[("drop", 1200)], garbage_at={300: GARBAGE_TEXT})
    async with fake:
        source = JetstreamSource(settings.replace(jetstream_urls=(fake.url,)))
        async with running(settings, source) as (ingester, _):
            await _ingested(redis, settings, EVENTS)
    assert ingester.added == EVENTS == await redis.xlen(settings.live_stream)
    await _drained_by_two(redis, settings)
    assert await snapshot(db) == await _reference(settings, events, reference_url, tmp_path)
    await assert_no_drift(db)


async def test_relay_to_two_replicas_gives_the_same_rows_and_counts(
    settings, redis, db, reference_url, tmp_path
):
    events = workload(EVENTS, seed=6)
    settings = _fast(settings)
    async with FakeRelay(events, schedule=[("drop", 1000)]) as fake:
        source = RelaySource(settings.replace(relay_url=fake.base_url))
        async with running(settings, source) as (ingester, _):
            await _ingested(redis, settings, EVENTS)
    assert ingester.added == EVENTS
    await _drained_by_two(redis, settings)
    mine = await snapshot(db)
    reference = await _reference(settings, events, reference_url, tmp_path)
    # The relay carries real CIDs where the workload has made-up ones: same rows, other cids.
    assert {t: len(rows) for t, rows in mine.items()} == {
        t: len(rows) for t, rows in reference.items()
    }
    for table in ("post_agg", "profile_agg", "like", "follow", "repost", "block", "feed_item"):
        assert mine[table] == reference[table], table
    await assert_no_drift(db)
