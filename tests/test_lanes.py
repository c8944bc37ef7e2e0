"""A replica's batches in flight never share an account (indexer.lanes), and a stop finishes
what the lanes hold."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import msgspec
import pytest

from indexer.events import normalize_line
from indexer.lanes import Lanes, lane_of
from indexer.metrics import Metrics
from indexer.pipeline import Entry, Outcome
from indexer.replica import Replica
from indexer.workload import generate
from plugins import registry
from tests.helpers import FOLLOW, assert_no_drift, create, did, follow_record, push

pytestmark = pytest.mark.timeout(60)


def entry(did: str, n: int = 0, stream: str = "s") -> Entry:
    event = {"type": "identity", "did": did, "seq": n}
    return Entry(stream, f"{n}-0", msgspec.json.encode(event))


def did_of(e: Entry) -> str:
    assert e.raw is not None
    return str(msgspec.json.decode(e.raw)["did"])


def test_an_accounts_entries_share_a_lane_and_the_accounts_spread():
    dids = [f"did:plc:{n:024d}" for n in range(400)]
    for account in dids:
        assert len({lane_of(entry(account, n), 3) for n in range(5)}) == 1
    per_lane = Counter(lane_of(entry(d), 3) for d in dids)
    assert sorted(per_lane) == [0, 1, 2]
    assert min(per_lane.values()) > 400 // 3 * 0.7  # CRC-32 spreads them about evenly
    assert {lane_of(entry(d), 1) for d in dids} == {0}
    # unreadable entries go to lane 0, where the pipeline dead-letters them with the reason
    assert lane_of(Entry("s", "1-0", b"{not json"), 3) == 0
    assert lane_of(Entry("s", "1-0", None), 3) == 0


def test_lanes_hold_one_batch_per_lane_and_give_them_oldest_first():
    lanes = Lanes(2, batch_size=3)
    dids = [f"did:plc:{n:024d}" for n in range(40)]
    zero = [d for d in dids if lane_of(entry(d), 2) == 0][:4]
    one = [d for d in dids if lane_of(entry(d), 2) == 1][:2]
    assert lanes.room()
    lanes.put([entry(d, n) for n, d in enumerate(zero[:3])])
    assert lanes.room() and len(lanes) == 3  # 3 + 3 <= 6
    lanes.put([entry(zero[3], 3), *(entry(d, 4 + n) for n, d in enumerate(one))])
    assert not lanes.room() and len(lanes) == 6
    assert (lanes.waiting(0), lanes.waiting(1)) == (4, 2)
    assert [did_of(e) for e in lanes.take(0, 3)] == zero[:3]
    assert [did_of(e) for e in lanes.take(0, 3)] == zero[3:]
    assert [did_of(e) for e in lanes.take(1, 3)] == one
    assert lanes.take(1, 3) == [] and len(lanes) == 0 and lanes.room()


def test_a_lane_gives_the_live_streams_entries_first():
    lanes = Lanes(1, batch_size=4, first="live")
    lanes.put([entry("did:plc:a", n, "backfill") for n in range(3)])
    lanes.put([entry("did:plc:a", n, "live") for n in range(3, 5)])
    assert [(e.stream, e.id) for e in lanes.take(0, 3)] == [
        ("live", "3-0"), ("live", "4-0"), ("backfill", "0-0"),
    ]  # fmt: skip
    assert [e.id for e in lanes.take(0, 3)] == ["1-0", "2-0"]
    assert lanes.fullest() == 0 and len(lanes) == 0


async def test_a_worker_waiting_for_its_lane_wakes_when_entries_come():
    lanes = Lanes(2, batch_size=3)
    account = next(d for d in (f"did:plc:{n:024d}" for n in range(40)) if lane_of(entry(d), 2))
    waiter = asyncio.create_task(lanes.changed(5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    lanes.put([entry(account)])
    await asyncio.wait_for(waiter, 1)
    assert lanes.waiting(1) == 1


async def test_a_replicas_batches_in_flight_never_share_an_account(settings, redis, db):
    """Few accounts, small batches, three workers: without lanes nearly every pair of batches
    in flight would share an author; with them two share one only when a worker helps with
    another's full lane (taken from a lane not its own), and everything is indexed."""
    lines = list(generate(3000, seed=3, accounts=60))
    await push(redis, settings.live_stream, [normalize_line(line) for line in lines])
    replica = Replica(settings.replace(batch_size=40, concurrency=3), registry(), Metrics())
    process, take = replica._pipeline.process, replica._lanes.take
    helped: set[str] = set()  # ids of the entries a worker took from another worker's lane
    in_flight: list[tuple[set[str], bool]] = []
    overlapped = 0
    shared: list[set[str]] = []

    def watched_take(lane: int, count: int) -> list[Entry]:
        taken = take(lane, count)
        task = asyncio.current_task()
        if task is not None and task.get_name() != f"worker-{lane}":
            helped.update(e.id for e in taken)
        return taken

    async def watched(entries: list[Entry]) -> Outcome:
        nonlocal overlapped
        batch = ({did_of(e) for e in entries}, entries[0].id in helped)
        for other in in_flight:
            overlapped += 1
            if batch[0] & other[0] and not (batch[1] or other[1]):
                shared.append(batch[0] & other[0])
        in_flight.append(batch)
        try:
            return await process(entries)
        finally:
            in_flight.remove(batch)

    replica._lanes.take = watched_take  # type: ignore[method-assign]
    replica._pipeline.process = watched  # type: ignore[method-assign]
    await asyncio.wait_for(replica.run(drain=True), 45)

    assert overlapped > 20  # batches really were in flight together
    assert shared == []
    group = (await redis.xinfo_groups(settings.live_stream))[0]
    assert (group["pending"], group["lag"], group["entries-read"]) == (0, 0, 3000)
    assert await redis.xlen(f"{settings.live_stream}:dlq") == 0
    await assert_no_drift(db)


async def test_a_stop_finishes_what_the_lanes_hold(settings, redis):
    """Entries read into a lane are pending on this consumer: after a stop request they are
    still committed and ACKed, and nothing more is read."""
    lines = list(generate(2000, seed=4, accounts=50))
    await push(redis, settings.live_stream, [normalize_line(line) for line in lines])
    replica = Replica(settings.replace(batch_size=50, concurrency=2), registry(), Metrics())
    process = replica._pipeline.process
    batches: list[int] = []

    async def stop_after_the_first(entries: list[Entry]) -> Outcome:
        batches.append(len(entries))
        replica.stop()
        return await process(entries)

    replica._pipeline.process = stop_after_the_first  # type: ignore[method-assign]
    await asyncio.wait_for(replica.run(), 30)

    group = (await redis.xinfo_groups(settings.live_stream))[0]
    assert group["pending"] == 0
    read = group["entries-read"]
    assert 50 <= read < 2000  # a read fills both lanes; then it stopped reading
    assert sum(batches) == read and len(batches) > 1  # every lane's entries were written


async def test_entries_for_a_waiting_worker_are_not_held_up_by_a_blocking_read(settings, redis):
    """One worker reads at a time: the others wait for what it routes to them, so an entry for
    another worker's lane is written at once, not when that worker's own blocking read (10 s
    here) would have ended. Two entries of lane 0 one after the other: whichever worker was
    blocked first takes the first, so a worker 1 blocked on the stream would take one of them."""
    replica = Replica(
        settings.replace(batch_size=50, concurrency=2, block_ms=10_000), registry(), Metrics()
    )
    author = next(n for n in range(1, 40) if lane_of(entry(did(n)), 2) == 0)
    run = asyncio.create_task(replica.run())
    try:
        for n in (1, 2):
            await asyncio.sleep(0.3)  # the workers idle, waiting on the stream or on the reader
            started = time.monotonic()
            event = create(author, FOLLOW, f"3kfollow{n}", follow_record(90 + n), n)
            await push(redis, settings.live_stream, [event])
            while True:
                group = (await redis.xinfo_groups(settings.live_stream))[0]
                if (group["entries-read"], group["pending"]) == (n, 0):
                    break
                assert time.monotonic() - started < 4, group
                await asyncio.sleep(0.02)
    finally:
        replica.stop()
        await asyncio.wait_for(run, 15)


async def test_one_accounts_run_of_entries_is_shared_by_the_workers(settings, redis, db):
    """A backfill adds a repo's records one after the other: all in one lane. When the other
    lanes are empty and that one full, their workers help with it (as without lanes)."""
    events = [create(7, FOLLOW, f"3kf{n:05d}", follow_record(100 + n), n) for n in range(1, 1201)]
    await push(redis, settings.live_stream, events)
    replica = Replica(settings.replace(batch_size=100, concurrency=2), registry(), Metrics())
    process = replica._pipeline.process
    workers: Counter[str] = Counter()

    async def watched(entries: list[Entry]) -> Outcome:
        task = asyncio.current_task()
        workers[task.get_name() if task else "?"] += len(entries)
        return await process(entries)

    replica._pipeline.process = watched  # type: ignore[method-assign]
    await asyncio.wait_for(replica.run(drain=True), 45)

    assert sorted(workers) == ["worker-0", "worker-1"], workers
    assert sum(workers.values()) == 1200
    assert await db.fetchval("SELECT count(*) FROM follow WHERE creator = $1", did(7)) == 1200
    await assert_no_drift(db)
