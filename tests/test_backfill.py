"""`indexer backfill` against a fake PLC, PDSes and relay on loopback serving real repo CARs."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from indexer import backfill as backfill_module
from indexer.backfill import Progress
from indexer.backfill_run import Plan, backfill
from indexer.config import Settings
from indexer.constants import backfill_done_key, backfill_failed_key, cursor_key
from indexer.metrics import BackfillMetrics
from indexer.source import host_of
from indexer.workload import LIKE, POST, tid
from tests.fake_jetstream import FakeJetstream
from tests.fake_pds import DID_DOC, GET_REPO, LIST_REPOS, RESET, FakeNetwork, Response, make_network
from tests.fake_repo import FakeRepo
from tests.helpers import assert_no_drift, drain_replicas, push
from tests.observe import indexer, indexer_env, start_indexer

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def network() -> AsyncIterator[FakeNetwork]:
    net = make_network(n_repos=12, records_per_repo=40, n_pdses=3, seed=5)
    async with net:
        yield net


def _settings(settings: Settings, network: FakeNetwork, **changes: Any) -> Settings:
    return settings.replace(
        plc_url=network.plc.url,
        relay_url=network.relay.url,
        backfill_backoff_s=0.05,
        **changes,
    )


async def _stored(db: asyncpg.Connection) -> dict[str, dict[str, str]]:
    """`{did: {uri: cid}}` of every live record in the database."""
    rows = await db.fetch(
        "SELECT s.did, s.uri, r.cid FROM record_state s JOIN record r USING (uri) WHERE s.live"
    )
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        out.setdefault(row["did"], {})[row["uri"]] = row["cid"]
    return out


def _sample(metrics: BackfillMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def _hash(redis: aioredis.Redis, key: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await redis.hgetall(key)).items()}


async def test_backfill_all_equals_the_repos(
    settings: Settings, network: FakeNetwork, redis: aioredis.Redis, db: asyncpg.Connection
) -> None:
    """12 repos on 3 PDSes, one request per PDS at a time: the database holds exactly the
    repos' records with their JSON, counters equal count(*), and a second run adds nothing."""
    settings = _settings(settings, network, backfill_per_host=1, backfill_concurrency=4)
    for pds in network.pdses:
        pds.delay = 0.02  # long enough for requests to overlap if the bound let them
    metrics = BackfillMetrics()
    result = await backfill(settings, Plan(None, page_size=5), metrics=metrics)
    assert (result.progress.done, result.progress.failed, result.progress.records) == (12, 0, 480)
    assert _sample(metrics, "indexer_backfill_repos_total", outcome="done") == 12
    assert _sample(metrics, "indexer_backfill_records_total", operation="create") == 480
    assert _sample(metrics, "indexer_backfill_repos_in_flight") == 0
    assert result.complete
    await drain_replicas(settings, 2)
    assert await _stored(db) == network.expected()
    for did, repo in network.repos.items():
        rows = await db.fetch("SELECT uri, json FROM record WHERE did = $1", did)
        assert {r["uri"]: json.loads(r["json"]) for r in rows} == repo.json_records()
    await assert_no_drift(db)
    assert [pds.max_in_flight for pds in network.pdses] == [1, 1, 1]
    assert sum(pds.count(GET_REPO) for pds in network.pdses) == 12
    done = await _hash(redis, backfill_done_key(result.stream))
    assert done == {did: repo.rev for did, repo in network.repos.items()}
    assert await redis.get(cursor_key(result.stream, host_of(network.relay.url))) is None

    length = await redis.xlen(result.stream)
    again = await backfill(settings, Plan(None))
    assert (again.progress.skipped, again.progress.done) == (12, 0)
    assert await redis.xlen(result.stream) == length
    assert sum(pds.count(GET_REPO) for pds in network.pdses) == 12  # skipped before fetching


async def test_repos_in_flight_are_bounded_in_total(
    settings: Settings, network: FakeNetwork
) -> None:
    """With room for 4 requests per host but BACKFILL_CONCURRENCY 2, no more than 2 requests
    are ever being answered across the PLC and the PDSes together, and 2 are."""
    settings = _settings(settings, network, backfill_per_host=4, backfill_concurrency=2)
    servers = [network.plc, *network.pdses]
    for server in servers:
        server.delay = 0.05
    result = await backfill(settings, Plan(list(network.repos)))
    assert result.progress.done == 12
    hits = [hit for server in servers for hit in server.hits]
    assert len(hits) == 24  # a DID document and a repo each
    events = sorted([(h.arrived, 1) for h in hits] + [(h.answered or 0.0, -1) for h in hits])
    in_flight = list(itertools.accumulate(change for _, change in events))
    assert max(in_flight) == 2


async def test_the_repo_is_the_truth_at_its_rev(
    settings: Settings, network: FakeNetwork, redis: aioredis.Redis, db: asyncpg.Connection
) -> None:
    """Records we hold that the repo no longer has are deleted at the repo's rev, unless a live
    op newer than that rev made them."""
    settings = _settings(settings, network)
    repo = next(iter(network.repos.values()))
    await backfill(settings, Plan([repo.did]))
    await drain_replicas(settings, 1)
    gone = [key for key in sorted(repo.records) if key[0] == POST][:3]
    for collection, rkey in gone:
        repo.delete(collection, rkey)
    # A post created live after the repo's rev: the repo we fetch does not have it yet.
    newer = tid(_rev_time(repo) + 5_000_000, 1)
    late = {"$type": POST, "text": "live, newer", "createdAt": "2024-11-19T07:06:40.000Z"}
    await push(redis, settings.live_stream, [_envelope(repo, "create", POST, "late", newer, late)])
    await drain_replicas(settings, 1)
    result = await backfill(settings, Plan([repo.did]))
    assert (result.progress.done, result.progress.deletes) == (1, 4)  # 3 gone, and `late`
    await drain_replicas(settings, 1)
    stored = (await _stored(db))[repo.did]
    assert set(stored) == set(repo.expected()) | {repo.uri(POST, "late")}
    await assert_no_drift(db)


def _rev_time(repo: FakeRepo) -> int:
    """The microseconds of a repo's rev (a TID's top 53 bits)."""
    alphabet = "234567abcdefghijklmnopqrstuvwxyz"
    value = 0
    for char in repo.rev:
        value = value * 32 + alphabet.index(char)
    return value >> 10


def _envelope(
    repo: FakeRepo, op: str, collection: str, rkey: str, rev: str, record: Any = None
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": op, "seq": 1, "time": "2024-11-19T07:06:40.000Z", "did": repo.did,
        "commit": "bafycommit", "rev": rev, "collection": collection, "rkey": rkey,
    }  # fmt: skip
    if record is not None:
        event |= {"cid": f"bafylive{rkey}{rev}", "record": record}
    return event


def _race(network: FakeNetwork) -> tuple[list[dict[str, Any]], dict[str, str | None]]:
    """Live ops on the repos' own posts, half older than the repo's rev, half newer; and the
    text each post must end with (None: deleted)."""
    ops, want = [], {}
    for n, repo in enumerate(network.repos.values()):
        posts = [key for key in sorted(repo.records) if key[0] == POST][:4]
        at = _rev_time(repo)
        older, newer = tid(at - 1000, 7), tid(at + 1000 + n, 7)
        for i, (collection, rkey) in enumerate(posts):
            uri = repo.uri(collection, rkey)
            rev = older if i < 2 else newer
            if i % 2 == 0:
                text = f"live update {uri}"
                record = {"$type": POST, "text": text, "createdAt": "2024-11-19T07:06:40.000Z"}
                ops.append(_envelope(repo, "update", collection, rkey, rev, record))
                want[uri] = text if rev == newer else repo.records[(collection, rkey)]["text"]
            else:
                ops.append(_envelope(repo, "delete", collection, rkey, rev))
                want[uri] = None if rev == newer else repo.records[(collection, rkey)]["text"]
    return ops, want


@pytest.mark.parametrize("order", ["backfill first", "live first", "together"])
async def test_backfill_racing_live_ops_ends_in_the_highest_revs(
    settings: Settings,
    network: FakeNetwork,
    redis: aioredis.Redis,
    db: asyncpg.Connection,
    order: str,
) -> None:
    """Live updates and deletes of the repos' posts, older and newer than the repos' revs,
    arriving before, after or while the backfill is indexed: the highest rev wins every time."""
    settings = _settings(settings, network)
    ops, want = _race(network)
    if order == "live first":
        await push(redis, settings.live_stream, ops)
        await drain_replicas(settings, 2)
    if order == "together":
        await push(redis, settings.live_stream, ops)
        replicas = asyncio.create_task(drain_replicas(settings, 2))
        await backfill(settings, Plan(None))
        await replicas
    else:
        await backfill(settings, Plan(None))
    await drain_replicas(settings, 2)
    if order == "backfill first":
        await push(redis, settings.live_stream, ops)
        await drain_replicas(settings, 2)
    texts = dict(await db.fetch("SELECT uri, text FROM post WHERE uri = ANY($1)", list(want)))
    assert {uri: texts.get(uri) for uri in want} == want
    assert None in want.values() and len(set(want.values())) > len(network.repos)
    await assert_no_drift(db)


async def test_kill_9_mid_backfill_resumes_without_loss_or_double_counting(
    settings: Settings, redis: aioredis.Redis, db: asyncpg.Connection
) -> None:
    """`indexer backfill all` killed three times while replicas index: every record once."""
    network = make_network(n_repos=30, records_per_repo=30, n_pdses=2, seed=9)
    async with network:
        for pds in network.pdses:
            pds.delay = 0.1
        settings = _settings(settings, network, backfill_concurrency=2)
        env = indexer_env(
            settings, PLC_URL=network.plc.url, RELAY_URL=network.relay.url,
            BACKFILL_CONCURRENCY="2", BACKFILL_BACKOFF_S="0.05",
        )  # fmt: skip
        done_key = backfill_done_key(settings.streams[1])
        replicas = asyncio.create_task(drain_replicas(settings.replace(block_ms=2000), 2))
        kills = 0
        for target in (5, 12, 20):
            proc = await start_indexer(env, "backfill", "all", "--page-size", "4")
            while await redis.hlen(done_key) < target:
                assert proc.returncode is None
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            kills += 1
        code, out, err = await indexer(env, "backfill", "all", "--page-size", "4", within_s=120)
        assert code == 0, err
        assert "every listed repo is finished" in out
        await replicas
        await drain_replicas(settings, 2)
        assert await _stored(db) == network.expected()
        await assert_no_drift(db)
        fetched = sum(pds.count(GET_REPO) for pds in network.pdses)
        # Only repos in hand at a kill are fetched again: at most 2 per kill.
        assert 30 <= fetched <= 30 + 2 * kills, fetched
        assert await redis.hlen(done_key) == 30


async def test_rate_limits_and_server_errors_are_retried_not_skipped(
    settings: Settings, network: FakeNetwork, db: asyncpg.Connection
) -> None:
    """429 with Retry-After, 500, 503 and a reset connection: each repo is fetched in the end,
    after waiting as long as the server asked."""
    settings = _settings(settings, network)
    dids = list(network.repos)[:4]
    scripts = {dids[0]: [429, 500], dids[1]: [503, 503, 500], dids[2]: [RESET], dids[3]: [429]}
    for did, answers in scripts.items():
        network.pds_of(did).fail(did, answers, retry_after=1)
    metrics = BackfillMetrics()
    result = await backfill(settings, Plan(dids), metrics=metrics)
    assert (result.progress.done, result.progress.failed) == (4, 0)
    retries = {r: _sample(metrics, "indexer_backfill_retries_total", reason=r)
               for r in ("rate_limited", "server_error", "network")}  # fmt: skip
    assert retries == {"rate_limited": 2, "server_error": 4, "network": 1}
    for did, answers in scripts.items():
        pds = network.pds_of(did)
        assert pds.count(GET_REPO, did) == len(answers) + 1
        arrivals = pds.arrivals(GET_REPO, did)
        for answer, (sent, retried) in zip(answers, itertools.pairwise(arrivals), strict=True):
            if answer == 429:
                assert retried - sent >= 0.95  # Retry-After: 1
    await drain_replicas(settings, 1)
    stored = await _stored(db)
    assert {did: stored[did] for did in dids} == {
        did: network.repos[did].expected() for did in dids
    }


async def test_repos_that_keep_failing_are_listed_with_the_reason(
    settings: Settings, network: FakeNetwork, redis: aioredis.Redis, tmp_path: Any
) -> None:
    """A repo that keeps answering 500, one taken down and a DID nobody knows end up in the
    failed list with their reason, `backfill repo` exits 1, and a later success clears them."""
    settings = _settings(settings, network)
    env = indexer_env(settings, PLC_URL=network.plc.url, BACKFILL_ATTEMPTS="3",
                      BACKFILL_BACKOFF_S="0.05")  # fmt: skip
    broken, gone, fine = list(network.repos)[:3]
    network.pds_of(broken).fail(broken, [500] * 3)
    network.repos[gone].status = "takendown"
    unknown = "did:plc:nobodyknowsthisone"
    listing = tmp_path / "dids.txt"
    listing.write_text(f"# to backfill\n{broken}\n{gone}\n{unknown}\n\n{fine}\n")
    code, out, err = await indexer(env, "backfill", "--from-file", str(listing))
    assert code == 1, err
    assert "4/4 repos (1 backfilled, 0 skipped, 3 failed)" in out
    code, out, err = await indexer(env, "backfill", "failed", "--json")
    assert code == 0, err
    reasons = {d["did"]: d["reason"] for d in map(json.loads, out.splitlines())}
    assert sorted(reasons) == sorted([broken, gone, unknown])
    assert "HTTP 500" in reasons[broken] and "(3 attempts)" in reasons[broken]
    assert "RepoTakendown" in reasons[gone]
    assert "HTTP 404" in reasons[unknown]
    assert network.pds_of(broken).count(GET_REPO, broken) == 3
    assert network.pds_of(gone).count(GET_REPO, gone) == 1  # not retried

    code, _, err = await indexer(env, "backfill", "repo", broken)
    assert code == 0, err
    failed = await _hash(redis, backfill_failed_key(settings.streams[1]))
    assert sorted(failed) == sorted([gone, unknown])
    code, _, err = await indexer(env, "backfill", "repo", "not-a-did")
    assert (code, err.strip()) == (2, "error: not a did:plc or did:web: 'not-a-did'")


async def test_adding_pauses_at_the_high_water_mark(
    settings: Settings, network: FakeNetwork, redis: aioredis.Redis
) -> None:
    """With no replica reading, the backfill stream stops growing near the high-water mark and
    the backfill waits; a replica draining it lets the backfill finish."""
    settings = _settings(settings, network, backfill_high_water_mark=100, backfill_concurrency=1)
    stream = settings.streams[1]
    await redis.xgroup_create(stream, settings.group, id="0", mkstream=True)
    metrics = BackfillMetrics()
    running = asyncio.create_task(backfill(settings, Plan(None), metrics=metrics))
    await asyncio.sleep(2.0)
    assert not running.done()
    assert _sample(metrics, "indexer_backfill_backpressure") == 1
    assert 100 <= await redis.xlen(stream) < 100 + 40  # one repo's records over the mark at most
    while not running.done():  # each drain ends when the stream is empty for a moment
        await drain_replicas(settings, 1)
    assert (await running).progress.done == 12
    assert _sample(metrics, "indexer_backfill_backpressure") == 0


def _jetstream_creates(network: FakeNetwork) -> list[dict[str, Any]]:
    """Every record of the network as a Jetstream create at its repo's rev, in time order."""
    events = []
    for repo in network.repos.values():
        for uri, record in sorted(repo.json_records().items()):
            collection, rkey = uri.split("/")[-2:]
            cid = repo.record_cid(collection, rkey)
            commit = {"rev": repo.rev, "operation": "create", "collection": collection,
                      "rkey": rkey, "record": record, "cid": cid}  # fmt: skip
            events.append({"did": repo.did, "kind": "commit", "commit": commit})
    return [e | {"time_us": 1_732_000_000_000_000 + n} for n, e in enumerate(events)]


async def test_compare_repair_backfills_the_repos_with_missing_records(
    settings: Settings, network: FakeNetwork
) -> None:
    """`compare --repair` finds the repos whose creates the database lacks and backfills them:
    the next comparison finds everything."""
    settings = _settings(settings, network)
    dids = list(network.repos)
    await backfill(settings, Plan(dids[:8]))
    await drain_replicas(settings, 1)
    env = indexer_env(settings, PLC_URL=network.plc.url)
    async with FakeJetstream(_jetstream_creates(network)) as fake:
        args = ["compare", "--url", fake.url, "--duration", "1", "--warmup", "0", "--grace", "0"]
        args += ["--collection", POST, "--collection", LIKE, "--json"]
        code, out, err = await indexer(env, *args, "--repair")
        assert code == 0, err
        before = {c["collection"]: c for c in json.loads(out)["collections"]}
        assert sorted(before[POST]["missing_repos"]) == sorted(dids[8:])
        assert before[POST]["coverage_pct"] < 100 and before[LIKE]["coverage_pct"] < 100
        assert "repair: backfilling 4 repo(s)" in err
        await drain_replicas(settings, 1)
        code, out, err = await indexer(env, *args)
        assert code == 0, err
        after = {c["collection"]: c for c in json.loads(out)["collections"]}
    assert {c: after[c]["coverage_pct"] for c in (POST, LIKE)} == {POST: 100.0, LIKE: 100.0}
    assert after[POST]["missing_repos"] == []


async def test_a_repo_that_breaks_unexpectedly_fails_alone(
    settings: Settings, network: FakeNetwork, redis: aioredis.Redis, monkeypatch: Any
) -> None:
    """A PDS redirecting in a loop and a repo that trips an unexpected error end in the failed
    list with their reason; the other repos are backfilled and the run finishes."""
    settings = _settings(settings, network)
    looping, broken, *fine = list(network.repos)
    pds = network.pds_of(looping)
    route = pds.route

    def redirecting(endpoint: str, did: str | None, query: Any) -> Response:
        if endpoint == GET_REPO and did == looping:
            target = f"/xrpc/{GET_REPO}?did={did}"
            return Response(302, b"", "text/plain", {"Location": target})
        return route(endpoint, did, query)

    monkeypatch.setattr(pds, "route", redirecting)
    real_read_repo = backfill_module.read_repo

    def read_repo(car: bytes) -> Any:
        snapshot = real_read_repo(car)
        if snapshot.did == broken:
            raise RuntimeError("a bug met this repo")
        return snapshot

    monkeypatch.setattr(backfill_module, "read_repo", read_repo)
    result = await asyncio.wait_for(backfill(settings, Plan(list(network.repos))), 60)
    assert (result.progress.done, result.progress.failed) == (len(fine), 2)
    failed = await _hash(redis, backfill_failed_key(settings.streams[1]))
    assert sorted(failed) == sorted([looping, broken])
    assert "TooManyRedirects" in json.loads(failed[looping])["reason"]
    assert "RuntimeError: a bug met this repo" in json.loads(failed[broken])["reason"]
    done = await _hash(redis, backfill_done_key(settings.streams[1]))
    assert sorted(done) == sorted(fine)


async def test_a_did_web_repo_is_found_through_its_well_known_document(
    settings: Settings, network: FakeNetwork, db: asyncpg.Connection
) -> None:
    """A did:web account: its document from `/.well-known/did.json` of its host names the PDS,
    and the repo is backfilled like a did:plc one (the PLC directory is never asked)."""
    settings = _settings(settings, network)
    pds = network.pdses[1]
    repo = FakeRepo(pds.web_did)
    for n in range(5):
        record = {"$type": POST, "text": f"web {n}", "createdAt": "2024-11-19T07:06:40.000Z"}
        repo.put(POST, tid(1_732_000_000_000_000 + n, 3), record)
    pds.add(repo)
    network.plc.reset_stats()
    result = await backfill(settings, Plan([repo.did]))
    assert (result.progress.done, result.progress.records) == (1, 5)
    assert pds.count(DID_DOC) == 1 and network.plc.count(DID_DOC) == 0
    await drain_replicas(settings, 1)
    assert (await _stored(db))[repo.did] == repo.expected()


async def test_a_relay_that_stops_listing_ends_the_run_with_its_cursor_kept(
    settings: Settings, network: FakeNetwork, redis: aioredis.Redis, monkeypatch: Any
) -> None:
    """listRepos failing on its second page: `backfill all` finishes the repos it was given,
    keeps the cursor after them, exits 1 with one line; the next run resumes from there."""
    settings = _settings(settings, network)
    env = indexer_env(settings, PLC_URL=network.plc.url, RELAY_URL=network.relay.url,
                      BACKFILL_ATTEMPTS="2", BACKFILL_BACKOFF_S="0.05")  # fmt: skip
    dids = sorted(network.repos)
    relay = network.relay
    route = relay.route

    def failing(endpoint: str, did: str | None, query: Any) -> Response:
        if endpoint == LIST_REPOS and query.get("cursor") == dids[3]:
            return Response(502, b"{}")
        return route(endpoint, did, query)

    monkeypatch.setattr(relay, "route", failing)
    code, out, err = await indexer(env, "backfill", "all", "--page-size", "4")
    assert code == 1, err
    assert err.strip().splitlines()[-1] == (
        f"error: listRepos of {relay.url} failed: listRepos: HTTP 502 (2 attempts); "
        "what was listed before is finished and the cursor kept: run it again to go on"
    )
    assert "Traceback" not in err
    stream = settings.streams[1]
    assert sorted(await _hash(redis, backfill_done_key(stream))) == dids[:4]
    assert await redis.get(cursor_key(stream, host_of(relay.url))) == dids[3].encode()

    monkeypatch.setattr(relay, "route", route)
    relay.reset_stats()
    code, out, err = await indexer(env, "backfill", "all", "--page-size", "4")
    assert code == 0, err
    assert "8 repos (8 backfilled, 0 skipped, 0 failed)" in out
    assert relay.hits[0].query.get("cursor") == dids[3]
    assert sorted(await _hash(redis, backfill_done_key(stream))) == dids


def test_progress_line_gives_the_rate_and_an_eta_when_the_total_is_known() -> None:
    started = time.monotonic() - 10.0
    known = Progress(total=4, done=1, skipped=1, records=100, deletes=3, started=started)
    line = known.line()
    assert line.startswith("2/4 repos (1 backfilled, 1 skipped, 0 failed), 100 records, 3 deletes")
    assert re.search(r", (9|10) records/s, ETA 1[01] s$", line), line
    listed = Progress(done=3, records=50, started=started).line()
    assert listed.startswith("3 repos (3 backfilled, 0 skipped, 0 failed), 50 records")
    assert "ETA" not in listed
