"""`indexer lag` against a prepared stream: entries, a group, some delivered, some pending."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from datetime import UTC, datetime, timedelta

import pytest

from indexer.constants import dlq_stream
from indexer.lag import collect
from indexer.stream import StreamConsumer
from tests.helpers import push
from tests.observe import free_port, indexer, indexer_env, start_indexer


def _identity(n: int, seconds_ago: float) -> dict[str, object]:
    moment = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return {"type": "identity", "did": f"did:plc:lag{n}", "time": moment.isoformat()}


@pytest.fixture
async def prepared(settings, redis):
    """10 entries with event times 100 s ago (the first) to 91 s ago (the last); consumer `a`
    read 4 and ACKed the first, `b` read 2 and ACKed both: lag 4, pending 3 (entries 2 to 4)."""
    live = settings.live_stream
    ids = await push(redis, live, [_identity(n, 100 - n) for n in range(10)])
    await redis.xgroup_create(live, settings.group, id="0")
    await redis.xreadgroup(settings.group, "a", {live: ">"}, count=4)
    await redis.xack(live, settings.group, ids[0])
    await redis.xreadgroup(settings.group, "b", {live: ">"}, count=2)
    await redis.xack(live, settings.group, ids[4], ids[5])
    await redis.xadd(dlq_stream(live), {"event": b"{}", "reason": "bad"})
    await redis.xadd(dlq_stream(live), {"event": b"{}", "reason": "bad"})
    return ids


async def test_lag_json_reports_each_figure(settings, prepared):
    pushed_at = int(prepared[1].split("-")[0]) / 1000
    code, out, err = await indexer(indexer_env(settings), "lag", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["over_limits"] == []
    live, backfill = (g for g in doc["groups"] if g["group"] == settings.group)
    assert live["stream"] == settings.live_stream
    assert (live["length"], live["lag"], live["pending"], live["dlq_length"]) == (10, 4, 3, 2)
    assert live["lag_exact"] is True and live["exists"] is True
    assert live["last_delivered_id"] == prepared[5]
    # the oldest pending entry is the second one: its age counts from its id
    age = time.time() - pushed_at
    assert age - 2 < live["oldest_pending_s"] < age + 2
    # its event happened 99 s ago: that is how far behind the network the group is
    assert 98 < live["behind_s"] < 110
    consumers = {c["name"]: c for c in live["consumers"]}
    assert sorted(consumers) == ["a", "b"]
    assert (consumers["a"]["pending"], consumers["b"]["pending"]) == (3, 0)
    assert all(0 <= c["idle_s"] < 30 for c in consumers.values())
    # the backfill stream does not exist yet
    assert backfill["stream"] == settings.streams[1]
    assert (backfill["exists"], backfill["length"], backfill["lag"]) == (False, 0, 0)


async def test_limits_make_it_exit_1(settings, prepared):
    env = indexer_env(settings)
    where = f"{settings.live_stream}/{settings.group}"
    code, _, err = await indexer(env, "lag", "--max-lag", "3")
    assert code == 1
    assert f"over limit: {where}: lag 4 > 3" in err
    assert (await indexer(env, "lag", "--max-lag", "4"))[0] == 0
    code, out, _ = await indexer(env, "lag", "--json", "--max-age", "50")
    assert code == 1
    [over] = json.loads(out)["over_limits"]
    assert re.fullmatch(rf"{where}: (99|1\d\d) s behind the network > 50.0 s", over), over
    assert (await indexer(env, "lag", "--max-age", "500", "--max-lag", "10"))[0] == 0


async def test_max_age_spares_a_group_that_has_finished(settings, redis, prepared):
    """With nothing left to do, the age of the newest event is the network's quiet, not ours."""
    live = settings.live_stream
    await redis.xreadgroup(settings.group, "a", {live: ">"})
    await redis.xack(live, settings.group, *prepared)
    env = indexer_env(settings)
    code, out, err = await indexer(env, "lag", "--json", "--max-age", "50")
    assert code == 0, err
    doc = json.loads(out)
    mine = next(g for g in doc["groups"] if g["stream"] == live and g["group"] == settings.group)
    assert (mine["lag"], mine["pending"], doc["over_limits"]) == (0, 0, [])
    assert 90 < mine["behind_s"] < 110  # still shown: how old the newest entry is


async def test_table_and_watch(settings, prepared):
    env = indexer_env(settings) | {"COLUMNS": "200"}
    code, out, _ = await indexer(env, "lag")
    assert code == 0
    row = next(line for line in out.splitlines() if settings.live_stream in line)
    assert [cell.strip() for cell in row.split("│")[3:6]] == [
        "10",
        "4",
        "3",
    ]  # length, lag, pending
    assert "consumers" in out
    proc = await start_indexer(env, "lag", "--watch", "0.2")
    await asyncio.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out_b, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert settings.live_stream in out_b.decode()


async def test_lag_is_counted_from_ids_when_redis_cannot_say(settings, redis, prepared):
    live = settings.live_stream
    await redis.xdel(live, prepared[8])  # a deleted entry after the last delivered id
    [info] = await redis.xinfo_groups(live)
    assert info["lag"] is None  # Redis gives up on lag here
    await redis.xgroup_create(live, "other_group", id="0")
    figures = await collect(redis, settings.streams, settings.group)
    mine = next(f for f in figures if f.stream == live and f.group == settings.group)
    assert (mine.lag, mine.lag_exact, mine.length) == (3, True, 9)
    other = next(f for f in figures if f.group == "other_group")
    assert (other.lag, other.pending, other.consumers) == (9, 0, [])


async def _read_and_ack(redis, settings, count: int) -> None:
    live = settings.live_stream
    reply = await redis.xreadgroup(settings.group, "a", {live: ">"}, count=count)
    await redis.xack(live, settings.group, *(i for i, _ in reply[0][1]))


async def test_entries_trimmed_before_delivery_do_not_count_as_lag(settings, redis):
    """A foreign XTRIM MAXLEN (a compatible ingester) drops entries the group never read: Redis
    7.0 keeps counting them in XINFO GROUPS `lag`, but nothing is left to read."""
    live = settings.live_stream
    await push(redis, live, [_identity(n, 10) for n in range(10)])
    consumer = StreamConsumer(settings, redis)
    await consumer.ensure_groups()
    await _read_and_ack(redis, settings, 2)
    await redis.xtrim(live, maxlen=3, approximate=False)
    figures = await collect(redis, (live,), settings.group)
    [mine] = figures
    assert (mine.length, mine.lag, mine.pending) == (3, 3, 0)  # counted: more than could follow
    await _read_and_ack(redis, settings, 3)
    [info] = await redis.xinfo_groups(live)
    assert info["lag"] > 0  # what Redis says, wrongly
    [mine] = await collect(redis, (live,), settings.group)
    assert (mine.lag, mine.pending, mine.backlog) == (0, 0, 0)
    [state] = [s for s in await consumer.group_states() if s.stream == live]
    assert (state.lag, state.pending) == (0, 0)
    assert await consumer.drained()
    # More arrives: the lag is what is really left, not Redis's figure
    await push(redis, live, [_identity(n, 5) for n in range(2)])
    [mine] = await collect(redis, (live,), settings.group)
    assert mine.lag == 2
    [state] = [s for s in await consumer.group_states() if s.stream == live]
    assert state.lag > 0 and not await consumer.drained()
    code, out, err = await indexer(indexer_env(settings), "lag", "--json", "--max-lag", "2")
    assert code == 0, err
    live_group = next(g for g in json.loads(out)["groups"] if g["stream"] == live)
    assert (live_group["lag"], live_group["lag_exact"]) == (2, True)


async def test_unreachable_redis_is_one_line(settings):
    env = indexer_env(settings) | {"REDIS_URL": f"redis://:secret@127.0.0.1:{free_port()}/0"}
    code, out, err = await indexer(env, "lag")
    assert code == 1 and out == ""
    assert err.startswith("error: redis at redis://:***@127.0.0.1:")
    assert len(err.splitlines()) == 1 and "secret" not in err
