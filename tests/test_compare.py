"""`indexer compare` against a fake Jetstream: the database holds all but a known fraction."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from typing import Any

import msgspec
import pytest

from indexer.compare import CompareOptions, compare, subscribe_url
from indexer.events import normalize_line
from indexer.workload import FOLLOW, LIKE, POST, REPOST, generate
from tests.fake_jetstream import FakeJetstream
from tests.helpers import push
from tests.observe import free_port, indexer, indexer_env, scrape, start_indexer, until, value

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
        )  # fmt: skip
        try:

            async def exported():
                try:
                    samples = await scrape(port)
                except ConnectionRefusedError:  # not serving yet
                    return None
                ratio = value(samples, "indexer_coverage_ratio", collection=LIKE)
                return samples if ratio == ratio else None  # NaN until the first round

            samples = await until(exported)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    for collection in (POST, LIKE):
        network, found = indexed.expected(collection)
        ratio = value(samples, "indexer_coverage_ratio", collection=collection)
        assert ratio == pytest.approx(found / network)
        rate = value(samples, "indexer_compare_network_events_per_second", collection=collection)
        assert rate == pytest.approx(network / 0.5)
    first = json.loads(out.decode().splitlines()[0])
    assert {c["collection"] for c in first["collections"]} == {POST, LIKE}


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
