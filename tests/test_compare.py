"""`indexer compare` against a fake Jetstream: the database holds all but a known fraction."""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import time
import uuid
from collections import Counter
from typing import Any

import asyncpg
import msgspec
import pytest

from indexer.compare import CompareOptions, SourceSilence, compare, subscribe_url
from indexer.events import normalize_line
from indexer.health import Health
from indexer.workload import FOLLOW, LIKE, POST, REPOST, generate
from tests.fake_jetstream import FakeJetstream
from tests.helpers import push
from tests.observe import (
    free_port,
    get,
    indexer,
    indexer_env,
    scrape,
    start_indexer,
    until,
    value,
)

COLLECTIONS = (POST, LIKE, FOLLOW, REPOST)
SKIP_EVERY = 7  # one create in seven of these collections never reaches the database


class Network:
    """A fixed stream of Jetstream events and what the database should lack of it."""

    def __init__(self, n: int) -> None:
        self.events: list[dict[str, Any]] = [msgspec.json.decode(e) for e in generate(n, seed=5)]
        self.creates: Counter[str] = Counter()
        self.skipped: dict[str, set[str]] = {c: set() for c in COLLECTIONS}
        for event in self.events:
            commit = event.get("commit") or {}
            if commit.get("operation") == "create" and commit["collection"] in COLLECTIONS:
                collection = commit["collection"]
                self.creates[collection] += 1
                if sum(self.creates.values()) % SKIP_EVERY == 3:
                    self.skipped[collection].add(_uri(event))

    def indexed_lines(self) -> list[bytes]:
        """Envelopes of every event except those touching a skipped record."""
        lost = set().union(*self.skipped.values())
        lines = []
        for event in self.events:
            if event.get("kind") == "commit" and _uri(event) in lost:
                continue
            try:
                lines.append(normalize_line(msgspec.json.encode(event)))
            except ValueError:
                continue
        return lines

    def expected(self, collection: str) -> tuple[int, int]:
        """(creates on the network, creates in the database)."""
        network = self.creates[collection]
        return network, network - len(self.skipped[collection])


def _uri(event: dict[str, Any]) -> str:
    commit = event["commit"]
    return f"at://{event['did']}/{commit['collection']}/{commit['rkey']}"


@pytest.fixture(scope="module")
def network() -> Network:
    return Network(1500)


@pytest.fixture
async def indexed(settings, redis, drain, network):
    """The database after indexing the network's events minus the skipped records."""
    await push(redis, settings.live_stream, network.indexed_lines())
    await drain()
    return network


def _assert_exact(result, network: Network) -> None:
    by_collection = {c.collection: c for c in result.collections}
    assert sorted(by_collection) == sorted(COLLECTIONS)
    for collection in COLLECTIONS:
        c = by_collection[collection]
        assert (c.network, c.indexed) == network.expected(collection), collection
        assert c.network > 20 and c.indexed < c.network  # every collection lost some
        assert c.coverage_pct == pytest.approx(100 * c.indexed / c.network)
        assert c.network_per_s == pytest.approx(c.network / result.window_s)
        assert c.indexed_per_s == pytest.approx(c.indexed / result.window_s)
        assert c.missing_examples == sorted(network.skipped[collection])[:3]


async def test_reports_exactly_the_missing_fraction(settings, indexed):
    async with FakeJetstream(indexed.events) as fake:
        opts = CompareOptions(fake.url, COLLECTIONS, warmup_s=0, duration_s=1.0, grace_s=0)
        result = await compare(opts, settings.database_url)
    assert result.reconnects == 0
    assert fake.queries[0]["wantedCollections"] == list(COLLECTIONS)
    _assert_exact(result, indexed)
    total_network = sum(indexed.creates[c] for c in COLLECTIONS)
    assert result.network_total == total_network


async def test_a_disconnect_mid_window_restarts_it(settings, indexed):
    async with FakeJetstream(indexed.events, drop_after=400, faulty_connections=1) as fake:
        opts = CompareOptions(fake.url, COLLECTIONS, warmup_s=0, duration_s=1.0, grace_s=0)
        result = await compare(opts, settings.database_url)
    assert fake.connections == 2
    assert result.reconnects == 1
    _assert_exact(result, indexed)  # not inflated by the first connection's 400 events


async def test_cli_json_and_min_coverage(settings, indexed):
    env = indexer_env(settings)
    async with FakeJetstream(indexed.events) as fake:
        args = ["compare", "--url", fake.url, "--duration", "1", "--warmup", "0", "--grace", "0"]
        args += [a for c in COLLECTIONS for a in ("--collection", c)]
        code, out, err = await indexer(env, *args, "--json", "--min-coverage", "90")
        assert code == 1, err
        doc = json.loads(out)
        worst = min(c["coverage_pct"] for c in doc["collections"])
        assert f"coverage {worst:.2f}% below 90%" in err
        for c in doc["collections"]:
            assert (c["network"], c["indexed"]) == indexed.expected(c["collection"])
        code, out, err = await indexer(env, *args, "--min-coverage", "80")
        assert code == 0, err
        assert "coverage" in out and "%" in out


async def test_every_exports_the_coverage_ratio(settings, indexed):
    port = free_port()
    env = indexer_env(settings, METRICS_PORT=str(port))
    async with FakeJetstream(indexed.events) as fake:
        proc = await start_indexer(
            env, "compare", "--url", fake.url, "--collection", POST, "--collection", LIKE,
            "--every", "1", "--duration", "0.5", "--warmup", "0", "--grace", "0", "--json",
            "--min-coverage", "90",
        )  # fmt: skip
        try:

            async def exported():
                if proc.returncode is not None:  # the stderr is in the assertion below
                    raise AssertionError(f"compare exited early: {proc.returncode}")
                try:
                    samples = await scrape(port)
                except ConnectionRefusedError:  # not serving yet
                    return None
                ratio = value(samples, "indexer_coverage_ratio", collection=LIKE)
                return samples if ratio == ratio else None  # NaN until the first round

            samples = await until(exported)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()  # also says why it exited early
    for collection in (POST, LIKE):
        network, found = indexed.expected(collection)
        ratio = value(samples, "indexer_coverage_ratio", collection=collection)
        assert ratio == pytest.approx(found / network)
        rate = value(samples, "indexer_compare_network_events_per_second", collection=collection)
        assert rate == pytest.approx(network / 0.5)
    first = json.loads(out.decode().splitlines()[0])
    assert {c["collection"] for c in first["collections"]} == {POST, LIKE}
    # --min-coverage does not end the process: each round below it is logged
    assert re.search(
        rf"ERROR indexer.compare: {re.escape(LIKE)}: coverage [\d.]+% below 90%", err.decode()
    )


async def _every(env, url, *args: str) -> asyncio.subprocess.Process:
    return await start_indexer(
        env, "compare", "--url", url, "--collection", POST, "--collection", LIKE,
        "--warmup", "0", "--grace", "0", *args,
    )  # fmt: skip


async def _stop(proc: asyncio.subprocess.Process) -> str:
    """SIGTERM (unless it already exited), then its exit code and stderr checked."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    return err.decode()


async def _ratio(port: int) -> float | None:
    """The coverage ratio of LIKE, or None before the server answers."""
    try:
        return value(await scrape(port), "indexer_coverage_ratio", collection=LIKE)
    except ConnectionRefusedError:
        return None


async def test_every_is_unhealthy_while_jetstream_is_silent(settings, indexed):
    """Rounds shorter than INDEXER_STALL_AFTER_S still add up: a source that says nothing turns
    /health to 503 and /ready says why; the coverage ratio is NaN while no creates arrive."""
    port = free_port()
    env = indexer_env(settings, METRICS_PORT=str(port), INDEXER_STALL_AFTER_S="2")
    expected = indexed.expected(LIKE)[1] / indexed.expected(LIKE)[0]
    async with FakeJetstream(indexed.events) as fake:
        proc = await _every(env, fake.url, "--every", "1", "--duration", "0.5")
        try:

            async def good():
                ratio = await _ratio(port)
                return ratio is not None and ratio == pytest.approx(expected)

            await until(good)
            assert (await get(port, "/health"))[0] == 200
            assert await get(port, "/ready") == (200, "ready\n")
            fake.stall_after = 0  # connections stay open, nothing arrives
            status, reason = await until(lambda: _answer_if(port, "/health", 503), within_s=30)
            assert re.fullmatch(r"no progress for [2-9](\.\d)? s\n", reason), reason
            assert math.isnan(await _ratio(port))  # not the last good figure
            status, reason = await get(port, "/ready")
            assert status == 503 and "jetstream: no messages in the last 0.5 s window" in reason
            fake.stall_after = None  # it talks again
            await until(good)
            assert (await get(port, "/health"))[0] == 200
        finally:
            await _stop(proc)


async def _measured(port: int) -> bool:
    ratio = await _ratio(port)
    return ratio is not None and not math.isnan(ratio)


async def _answer_if(port: int, path: str, status: int) -> tuple[int, str] | None:
    answer = await get(port, path)
    return answer if answer[0] == status else None


async def test_every_stays_healthy_between_rounds_longer_than_the_stall_limit(settings, indexed):
    port = free_port()
    env = indexer_env(settings, METRICS_PORT=str(port), INDEXER_STALL_AFTER_S="1")
    async with FakeJetstream(indexed.events) as fake:
        proc = await _every(env, fake.url, "--every", "4", "--duration", "0.3")
        try:
            await until(lambda: _measured(port))
            started = time.monotonic()
            while time.monotonic() - started < 2.5:  # waiting for the next round
                assert await get(port, "/health") == (200, "alive, idle\n")
                await asyncio.sleep(0.2)
        finally:
            await _stop(proc)


def test_silence_is_counted_while_listening_and_carried_across_rounds():
    health = Health(stall_after_s=0.3)
    silence = SourceSilence(health)
    silence.listen()
    time.sleep(0.2)
    silence.rest(reached=True)  # a quiet round, but not yet too long
    assert health.live() == (True, "alive, idle")
    time.sleep(0.3)  # between rounds: nobody listens, nothing counts
    health.beat()
    assert health.live()[0] is True
    silence.listen()
    time.sleep(0.15)  # 0.2 + 0.15 s of silence while listening
    ok, reason = health.live()
    assert not ok and re.fullmatch(r"no progress for 0\.[3-5] s", reason), reason
    silence.rest(reached=True)
    assert health.live()[0] is False  # too long: it stays unhealthy between rounds
    silence.listen()
    silence.heard()
    assert health.live()[0] is True
    silence.rest(reached=False)  # unreachable: the clock runs on
    time.sleep(0.35)
    health.beat()
    assert health.live()[0] is False


async def test_every_survives_database_errors(settings, indexed, db):
    """A round that cannot read the database is logged, its figures are NaN and /ready says
    why; the next round runs."""
    port = free_port()
    env = indexer_env(settings, METRICS_PORT=str(port))
    async with FakeJetstream(indexed.events) as fake:
        proc = await _every(env, fake.url, "--every", "1", "--duration", "0.3")
        try:
            await until(lambda: _measured(port))
            await db.execute("ALTER TABLE record_state RENAME TO record_state_away")
            await db.execute("ALTER TABLE record RENAME TO record_away")
            assert await until(lambda: _answer_if(port, "/ready", 503))
            assert math.isnan(await _ratio(port))
            reason = (await get(port, "/ready"))[1]
            assert "postgres: the database has no record table: run `indexer migrate`" in reason
            await db.execute("ALTER TABLE record_away RENAME TO record")
            await db.execute("ALTER TABLE record_state_away RENAME TO record_state")
            await until(lambda: _answer_if(port, "/ready", 200))
            assert not math.isnan(await _ratio(port))
        finally:
            err = await _stop(proc)
    assert "comparison failed: the database has no record table" in err


async def test_unmigrated_database_is_one_line(settings, postgres_server):
    name = f"empty_{uuid.uuid4().hex[:8]}"
    postgres_server.create_database(name)
    try:
        env = indexer_env(settings, DATABASE_URL=postgres_server.dsn(name))
        async with FakeJetstream([]) as fake:
            code, out, err = await indexer(
                env, "compare", "--url", fake.url, "--duration", "0.2", "--warmup", "0",
                "--grace", "0", "--collection", LIKE,
            )  # fmt: skip
    finally:
        postgres_server.drop_database(name)
    assert code == 1 and out == "", err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        "error: the database has no record table: run `indexer migrate`"
    )


async def test_a_connection_lost_mid_query_is_one_line(settings, indexed, db):
    """PostgreSQL drops the session while compare waits on a lock (as in a restart)."""
    env = indexer_env(settings)
    async with FakeJetstream(indexed.events) as fake:
        async with db.transaction():
            await db.execute("LOCK TABLE record_state IN ACCESS EXCLUSIVE MODE")
            proc = await start_indexer(
                env, "compare", "--url", fake.url, "--duration", "0.3", "--warmup", "0",
                "--grace", "0", "--collection", LIKE,
            )  # fmt: skip

            # another session: pg_stat_activity is a snapshot within a transaction
            watcher = await asyncpg.connect(settings.database_url)
            try:

                async def waiting():
                    return await watcher.fetchval(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE '%record_state%'"
                    )

                pid = await until(waiting, within_s=60)
                assert await watcher.fetchval("SELECT pg_terminate_backend($1)", pid)
            finally:
                await watcher.close()
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 1 and out == b"", text
    assert "Traceback" not in text
    assert text.splitlines()[-1].startswith("error: database at postgresql://"), text


async def test_unreachable_jetstream_is_one_line(settings):
    env = indexer_env(settings)
    url = f"ws://127.0.0.1:{free_port()}/subscribe"
    code, out, err = await indexer(
        env, "compare", "--url", url, "--duration", "0.2", "--warmup", "0", within_s=90
    )
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith(f"error: jetstream at {url}:")


def test_subscribe_url_adds_the_collections():
    assert subscribe_url("wss://js.example/subscribe?compress=false", (POST, LIKE)) == (
        "wss://js.example/subscribe?compress=false"
        "&wantedCollections=app.bsky.feed.post&wantedCollections=app.bsky.feed.like"
    )
