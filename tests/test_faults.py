"""Fault injection: replicas crash, servers restart, poison arrives, and nothing is lost.

Each scenario runs real `indexer run` processes against real servers and injects its fault for
real (kill -9, server restarts, terminated backends, a Redis still loading its AOF, SIGTERM).
Afterwards the database must equal the state the same events give without incident, every
counter must equal its count(*), the dead-letter stream must hold the poison and nothing else,
and the stream must be trimmed. Each scenario's figures are printed (pytest -s) and, with
FAULT_FIGURES=path, appended to that file as a JSON line.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from indexer.config import Settings
from indexer.devservers import PostgresServer, RedisServer, throwaway_redis
from indexer.drift import drift
from indexer.events import normalize_line
from indexer.stream import StreamConsumer
from indexer.workload import write_jsonl
from tests.helpers import (
    LIKE,
    POST,
    bad_entries,
    create,
    drain_replicas,
    like_record,
    snapshot,
    unindexable_uri,
    uri,
)
from tests.observe import indexer_env

EVENTS = 8000
STREAM_BOUND = 200  # entries left after trimming: at most a couple of stream nodes
_CLAIMED = re.compile(rb"claimed (\d+) of")


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aof_redis() -> Iterator[RedisServer]:
    """A Redis of its own that keeps every write in its AOF, so it can be killed and restarted."""
    with throwaway_redis(options={"appendonly": "yes", "appendfsync": "always"}) as server:
        yield server


@pytest.fixture(scope="module")
def events_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "events.jsonl"
    write_jsonl(path, EVENTS, seed=21)
    return path


@pytest.fixture(scope="module")
async def reference(
    postgres_server: PostgresServer, redis_server: RedisServer, migrated_template: str,
    events_file: Path,
) -> dict[str, list[tuple[Any, ...]]]:  # fmt: skip
    """What the events give when indexed without incident, in a database of their own."""
    postgres_server.create_database("fault_reference", template=migrated_template)
    try:
        settings = Settings(
            redis_url=redis_server.url, database_url=postgres_server.dsn("fault_reference"),
            streams=("fault_reference",), group="reference", metrics_port=0, block_ms=100,
        )  # fmt: skip
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await _push_lines(client, "fault_reference", _lines(events_file))
        finally:
            await client.aclose()
        await drain_replicas(settings, 1)
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await snapshot(conn)
        finally:
            await conn.close()
    finally:
        postgres_server.drop_database("fault_reference")


@pytest.fixture
def fault_settings(settings: Settings, aof_redis: RedisServer) -> Settings:
    return settings.replace(redis_url=aof_redis.url)


@pytest.fixture
async def client(fault_settings: Settings) -> AsyncIterator[aioredis.Redis]:
    # retries, so that it carries on after the server restarts
    c = aioredis.Redis.from_url(
        fault_settings.redis_url, retry=Retry(ExponentialBackoff(), 20),
        retry_on_error=[RedisConnectionError, BusyLoadingError],
    )  # fmt: skip
    yield c
    await c.aclose()


# --- the parts of a scenario ----------------------------------------------------------------


def _lines(path: Path) -> list[bytes]:
    return [normalize_line(line) for line in path.read_bytes().splitlines() if line.strip()]


async def _push_lines(client: aioredis.Redis, stream: str, events: list[bytes]) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(events), 1000):
        async with client.pipeline(transaction=False) as pipe:
            for event in events[start : start + 1000]:
                pipe.xadd(stream, {"event": event})
            ids += [i.decode() for i in await pipe.execute()]
    return ids


class Fleet:
    """Replica processes (`indexer run --drain`), each logging to a file that outlives it."""

    def __init__(self, settings: Settings, logdir: Path, **env: str) -> None:
        self.env = (
            indexer_env(
                settings,
                INDEXER_BATCH_SIZE="100",
                INDEXER_CLAIM_IDLE_S="1",
                INDEXER_TRIM_INTERVAL_S="0.5",
                INDEXER_STARTUP_TIMEOUT_S="60",
                INDEXER_SHUTDOWN_GRACE_S="10",
            )
            | env
        )
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Path] = []

    def start(self, name: str, *, drain: bool = True) -> subprocess.Popen[bytes]:
        log = self.logdir / f"{name}-{len(self.logs)}.log"
        self.logs.append(log)
        args = ["run", "--consumer", name, *(["--drain"] if drain else [])]
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "indexer.cli", *args], env=self.env,
                                    stderr=out)  # fmt: skip
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(10)

    async def finish(self, within_s: float = 120) -> None:
        """Every replica still running exits 0 (drained) within the time."""
        deadline = time.monotonic() + within_s
        for name, proc in self.procs.items():
            while proc.poll() is None:
                assert time.monotonic() < deadline, f"{name} did not finish:\n{self.text()[-3000:]}"
                await asyncio.sleep(0.05)
            assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{self.text()[-3000:]}"

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def claimed(self) -> int:
        """Deliveries beyond the first: every redelivery is a claim, and every claim is logged."""
        return sum(int(n) for log in self.logs for n in _CLAIMED.findall(log.read_bytes()))

    def text(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs)


class AckWatch:
    """Samples how many entries the group has ACKed (entries-read minus pending), every 20 ms."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()

    async def __aenter__(self) -> AckWatch:
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._done.set()
        assert self._task is not None
        await self._task

    async def _poll(self) -> None:
        client = aioredis.Redis.from_url(self._settings.redis_url, socket_timeout=1)
        try:
            while not self._done.is_set():
                # A sample is dated when it is asked for: a reply Redis computed before a fault
                # but read after it must not count as an ACK after the fault.
                asked = time.monotonic()
                try:
                    groups = await client.xinfo_groups(self._settings.live_stream)
                    mine = [g for g in groups if g["name"].decode() == self._settings.group]
                    if mine:
                        acked = int(mine[0]["entries-read"] or 0) - int(mine[0]["pending"])
                        self.samples.append((asked, acked))
                except (RedisError, OSError):
                    pass  # the fault itself: Redis is down or loading
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    def first_ack_after(self, fault: float) -> float:
        """Seconds from the fault to the first ACK after it."""
        before = [acked for at, acked in self.samples if at <= fault]
        base = before[-1] if before else 0
        return next((at - fault for at, acked in self.samples if at > fault and acked > base),
                    math.nan)  # fmt: skip


async def _rows(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM record_state"))


async def _under_way(db: asyncpg.Connection, more_than: int) -> int:
    """Wait until more than `more_than` records are written (a batch is being committed)."""
    deadline = time.monotonic() + 60
    while (n := await _rows(db)) <= more_than:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    return n


async def _until_acked(client: aioredis.Redis, settings: Settings, ids: set[bytes]) -> float:
    """Wait until none of these entries is pending any more; returns the time it happened."""
    deadline = time.monotonic() + 60
    while True:
        pending = await client.xpending_range(settings.live_stream, settings.group, "-", "+",
                                              100_000)  # fmt: skip
        if not ids & {p["message_id"] for p in pending}:
            return time.monotonic()
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def _verify(
    scenario: str, settings: Settings, client: aioredis.Redis, db: asyncpg.Connection,
    reference: dict[str, list[tuple[Any, ...]]], fleet: Fleet, events: int,
    fault_to_ack_s: float, dead: dict[str, str] | None = None, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """The checks every scenario ends with; returns (and reports) its figures."""
    state = await snapshot(db)
    lost = sum(len(set(reference[t]) - set(state[t])) for t in reference)
    extra_rows = sum(len(set(state[t]) - set(reference[t])) for t in reference)
    drifted = sum((await drift(db)).values())
    dlq = await client.xrange(f"{settings.live_stream}:dlq")
    groups = await client.xinfo_groups(settings.live_stream)
    figures = {
        "scenario": scenario,
        "events": events,
        "lost": lost,
        "duplicates": extra_rows,
        "deliveries_beyond_first": fleet.claimed(),
        "drift": drifted,
        "fault_to_first_ack_s": round(fault_to_ack_s, 3),
        "dead_lettered": len(dlq),
        "stream_length_after": await client.xlen(settings.live_stream),
        **extra,
    }
    _report(figures)
    diff = {t: sorted(set(state[t]) ^ set(reference[t]))[:3] for t in reference
            if set(state[t]) != set(reference[t])}  # fmt: skip
    assert (lost, extra_rows, drifted) == (0, 0, 0), (figures, diff)
    assert (groups[0]["lag"], groups[0]["pending"]) == (0, 0)
    reasons = {f[b"id"].decode(): f[b"reason"].decode() for _, f in dlq}
    assert set(reasons) == set(dead or {}), reasons  # the poison, and nothing else
    for entry_id, words in (dead or {}).items():
        assert words in reasons[entry_id], (entry_id, reasons[entry_id])
    assert figures["stream_length_after"] <= STREAM_BOUND
    assert not math.isnan(fault_to_ack_s)
    return figures


def _report(figures: dict[str, Any]) -> None:
    print(json.dumps(figures))
    if target := os.environ.get("FAULT_FIGURES"):
        with Path(target).open("a") as out:
            out.write(json.dumps(figures) + "\n")


# --- the scenarios --------------------------------------------------------------------------


async def test_kill_9_replicas_mid_batch_repeatedly(
    fault_settings, client, db, reference, events_file, tmp_path
):
    """Three replicas; one at a time is killed mid-batch, five times over. Half come back under
    their own name (they redo their own pending entries), half under a new one (the others
    claim what the dead one held)."""
    await _push_lines(client, fault_settings.live_stream, _lines(events_file))
    fleet = Fleet(fault_settings, tmp_path)
    for n in range(3):
        fleet.start(f"r{n}")
    recoveries = []
    total = len(reference["record_state"])
    async with AckWatch(fault_settings) as watch:
        rows = await _under_way(db, 0)
        for kill in range(5):
            if rows + 400 > total:
                break  # too little work left to kill anyone in the middle of it
            rows = await _under_way(db, rows + 150)
            live = sorted(name for name, proc in fleet.procs.items() if proc.poll() is None)
            victim = live[kill % len(live)]
            fleet.kill(victim)
            fault = time.monotonic()
            held = (await client.xpending_range(fault_settings.live_stream, fault_settings.group,
                                                "-", "+", 10_000, consumername=victim))  # fmt: skip
            fleet.start(victim if kill % 2 == 0 else f"{victim}-new{kill}")
            taken = await _until_acked(client, fault_settings, {p["message_id"] for p in held})
            recoveries.append((fault, len(held), taken - fault))
        await fleet.finish()
    figures = await _verify(
        "kill -9 one of three replicas, repeatedly", fault_settings, client, db, reference,
        fleet, EVENTS, watch.first_ack_after(recoveries[0][0]),
        kills=len(recoveries), entries_held_by_killed=sum(h for _, h, _ in recoveries),
        fault_to_held_entries_acked_s=[round(s, 2) for _, _, s in recoveries],
    )  # fmt: skip
    assert figures["kills"] >= 3
    # what the killed replicas held was delivered again, and only that much more (a batch in
    # hand may also be taken over once while a replica restarts)
    assert figures["entries_held_by_killed"] <= figures["deliveries_beyond_first"]


async def test_redis_restart_mid_run(
    fault_settings, client, db, reference, events_file, tmp_path, aof_redis
):
    await _push_lines(client, fault_settings.live_stream, _lines(events_file))
    fleet = Fleet(fault_settings, tmp_path)
    for n in range(2):
        fleet.start(f"r{n}")
    async with AckWatch(fault_settings) as watch:
        await _under_way(db, 1000)
        aof_redis.kill()  # kill -9: with appendfsync always, every acknowledged write is kept
        fault = time.monotonic()
        await asyncio.sleep(1.0)
        # It comes back slowly: the replicas meet LOADING replies in the middle of their run.
        aof_redis.options["key-load-delay"] = "20"
        try:
            aof_redis.start(loaded=False)
        finally:
            del aof_redis.options["key-load-delay"]
        await fleet.finish()
    figures = await _verify(
        "Redis kill -9, restarted with a slow AOF load", fault_settings, client, db, reference,
        fleet, EVENTS, watch.first_ack_after(fault),
    )  # fmt: skip
    assert figures["fault_to_first_ack_s"] >= 1.0  # nothing was ACKed while Redis was down


async def test_postgres_restart_and_terminated_backends(
    fault_settings, client, db, reference, events_file, tmp_path, postgres_server, database_url
):
    await _push_lines(client, fault_settings.live_stream, _lines(events_file))
    fleet = Fleet(fault_settings, tmp_path)
    for n in range(2):
        fleet.start(f"r{n}")
    async with AckWatch(fault_settings) as watch:
        await _under_way(db, 1000)
        await db.close()
        postgres_server.stop_immediate()
        fault = time.monotonic()
        await asyncio.sleep(1.0)
        postgres_server.start()
        back = time.monotonic()
        db = await asyncpg.connect(database_url)
        rows = await _under_way(db, 0)
        await _under_way(db, rows + 500)
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await fleet.finish()
    # ACKs in the first moments after the stop are of batches committed before it: the first
    # ACK that counts is the first after PostgreSQL is back.
    try:
        await _verify(
            "PostgreSQL stop -m immediate, then backends terminated", fault_settings, client, db,
            reference, fleet, EVENTS, back - fault + watch.first_ack_after(back),
            postgres_down_s=round(back - fault, 3), backends_terminated=killed,
        )  # fmt: skip
    finally:
        await db.close()
    assert killed >= 1


async def test_poison_mixed_into_a_large_stream(
    fault_settings, client, db, reference, events_file, tmp_path
):
    """Every kind of bad entry, spread through the stream, plus entries that crashed replicas
    `max_deliveries` times (pending on a dead consumer with that delivery count)."""
    stream = fault_settings.live_stream
    crashers = await _crashed_too_often(client, fault_settings, 3)
    dead = dict.fromkeys(crashers, "delivered 5 times without being committed")
    poison = _poison()
    good = _lines(events_file)
    step = len(good) // (len(poison) + 1)
    for n, (words, raw) in enumerate(poison):
        await _push_lines(client, stream, good[n * step : (n + 1) * step])
        fields = {"event": raw} if raw is not None else {"other": b"x"}
        dead[(await client.xadd(stream, fields)).decode()] = words
    await _push_lines(client, stream, good[len(poison) * step :])
    fleet = Fleet(fault_settings, tmp_path)
    started = time.monotonic()
    async with AckWatch(fault_settings) as watch:
        for n in range(2):
            fleet.start(f"r{n}")
        await fleet.finish()
    await _verify("poison entries of several kinds", fault_settings, client, db, reference,
                  fleet, EVENTS + len(dead), watch.first_ack_after(started), dead=dead)  # fmt: skip


def _poison() -> list[tuple[str, bytes | None]]:
    """(words its reason must contain, the raw event; None for an entry without one)."""
    too_big = create(9, LIKE, "huge", like_record(unindexable_uri()), 30)
    return [*bad_entries().items(), ("database rejected", msgspec.json.encode(too_big)),
            ("no `event` field", None)]  # fmt: skip


async def _crashed_too_often(client: aioredis.Redis, settings: Settings, n: int) -> list[str]:
    """Entries that a consumer read and died with, `max_deliveries` times over: the first of
    the stream, pending on a dead consumer with that delivery count."""
    events = [create(500 + k, LIKE, f"c{k}", like_record(uri(1, POST, "zz")), 70) for k in range(n)]
    ids = await _push_lines(client, settings.live_stream, [msgspec.json.encode(e) for e in events])
    await StreamConsumer(settings, client).ensure_groups()
    await client.xreadgroup(settings.group, "ghost", {settings.live_stream: ">"}, count=n)
    await client.xclaim(settings.live_stream, settings.group, "ghost", 0, ids, retrycount=5)
    return ids


async def test_replicas_started_while_redis_loads_a_large_aof(
    fault_settings, client, db, reference, events_file, tmp_path, aof_redis
):
    await _push_lines(client, fault_settings.live_stream, _lines(events_file))
    filler = [b"x" * 200] * 10_000  # makes the AOF large, so loading takes a while
    await _push_lines(client, f"{fault_settings.live_stream}_filler", filler)
    aof_redis.stop()
    aof_redis.options["key-load-delay"] = "50"  # microseconds per entry: a slow disk
    try:
        aof_redis.start(loaded=False)
    finally:
        del aof_redis.options["key-load-delay"]
    fault = time.monotonic()
    fleet = Fleet(fault_settings, tmp_path)
    async with AckWatch(fault_settings) as watch:
        for n in range(2):
            fleet.start(f"r{n}")
        await fleet.finish()
    loaded_after = watch.samples[0][0] - fault if watch.samples else math.nan
    await client.delete(f"{fault_settings.live_stream}_filler")
    await _verify("replicas started while Redis loads its AOF", fault_settings, client, db,
                  reference, fleet, EVENTS, watch.first_ack_after(fault),
                  redis_loading_s=round(loaded_after, 3))  # fmt: skip
    assert "loading its data" in fleet.text()  # they said what they waited for
    assert loaded_after > 0.5  # and they did wait


async def test_sigterm_during_a_batch(fault_settings, client, db, reference, events_file, tmp_path):
    await _push_lines(client, fault_settings.live_stream, _lines(events_file))
    fleet = Fleet(fault_settings, tmp_path, INDEXER_BATCH_SIZE="300")
    proc = fleet.start("term", drain=False)
    async with AckWatch(fault_settings) as watch:
        await _under_way(db, 500)
        proc.send_signal(signal.SIGTERM)
        fault = time.monotonic()
        assert proc.wait(30) == 0, fleet.text()[-3000:]
        left = await client.xpending_range(fault_settings.live_stream, fault_settings.group,
                                           "-", "+", 10, consumername="term")  # fmt: skip
        consumers = await client.xinfo_consumers(fault_settings.live_stream, fault_settings.group)
        assert left == []
        assert [c["name"] for c in consumers] == []  # it removed itself: nothing was pending
        assert (await client.xinfo_groups(fault_settings.live_stream))[0]["lag"] > 0
        del fleet.procs["term"]
        fleet.start("next")
        await fleet.finish()
    await _verify("SIGTERM during a batch", fault_settings, client, db, reference, fleet,
                  EVENTS, watch.first_ack_after(fault), exit_code=0)  # fmt: skip
