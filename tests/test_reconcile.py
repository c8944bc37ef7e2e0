"""`indexer reconcile`: drift introduced on purpose, repaired while replicas index, with no
concurrent delta lost; --sample only reports; --dirty repairs only the marked keys; the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import asyncpg

from indexer.drift import drift
from indexer.events import normalize_line
from indexer.reconcile import reconcile
from indexer.workload import generate
from tests.helpers import (
    LIKE,
    POST,
    assert_no_drift,
    create,
    drain_replicas,
    like_record,
    post_record,
    push,
    snapshot,
    uri,
)

# 25 random counter rows skewed while replicas run: locked in key order first, as the replicas'
# counter statements lock them, so the skew waits for a batch instead of deadlocking with it.
_SKEW = (
    "WITH s AS MATERIALIZED (SELECT uri FROM post_agg WHERE uri IN "
    "(SELECT uri FROM post_agg ORDER BY random() LIMIT 25) ORDER BY uri FOR UPDATE) "
    'UPDATE post_agg p SET "likeCount" = "likeCount" + 7, "replyCount" = "replyCount" + 1 '
    "FROM s WHERE p.uri = s.uri"
)
_SKEW_PROFILES = (
    "WITH s AS MATERIALIZED (SELECT did FROM profile_agg WHERE did IN "
    "(SELECT did FROM profile_agg ORDER BY random() LIMIT 25) ORDER BY did FOR UPDATE) "
    'UPDATE profile_agg p SET "followersCount" = "followersCount" - 3 FROM s WHERE p.did = s.did'
)


async def _drifted(db: asyncpg.Connection) -> int:
    return sum((await drift(db)).values())


async def test_reconcile_all_repairs_drift_while_replicas_index(
    settings, redis, db, postgres_server, migrated_template
):
    events = [normalize_line(e) for e in generate(4000, seed=5)]
    first, second = events[:1500], events[1500:]
    await push(redis, settings.live_stream, first)
    await drain_replicas(settings, 2)

    await push(redis, settings.live_stream, second)
    replicas = asyncio.create_task(drain_replicas(settings.replace(batch_size=10), 2))
    await asyncio.sleep(0.3)
    await db.execute(_SKEW)
    await db.execute(_SKEW_PROFILES)
    assert await _drifted(db) > 0
    assert not replicas.done()
    report = await reconcile(settings.database_url, "all", chunk=40)
    assert not replicas.done(), "reconcile must overlap the live stream to prove something"
    assert report.drifted >= 50 and report.repaired == report.drifted
    await replicas
    assert await _drifted(db) == 0  # no delta applied during the repair was lost
    await assert_no_drift(db)

    # the same events on a database nobody disturbed end in the same rows and counters
    name = "reconcile_reference"
    postgres_server.create_database(name, template=migrated_template)
    try:
        clean = settings.replace(
            streams=(settings.live_stream + "_clean",),
            group="clean",
            database_url=postgres_server.dsn(name),
        )
        await push(redis, clean.live_stream, events)
        await drain_replicas(clean, 1)
        ref = await asyncpg.connect(clean.database_url)
        try:
            assert await snapshot(db) == await snapshot(ref)
        finally:
            await ref.close()
    finally:
        postgres_server.drop_database(name)
    again = await reconcile(settings.database_url, "all")
    assert (again.drifted, again.repaired) == (0, 0) and again.checked > 100


async def _small_world(settings, redis) -> None:
    p = [uri(1, POST, f"p{n}") for n in range(4)]
    events = [create(1, POST, f"p{n}", post_record(), n + 1) for n in range(4)]
    events += [create(2 + n, LIKE, "l", like_record(p[n % 4]), 10 + n) for n in range(8)]
    await push(redis, settings.live_stream, events)
    await drain_replicas(settings, 1)


async def test_sample_reports_without_writing(settings, redis, db):
    await _small_world(settings, redis)
    await db.execute('UPDATE post_agg SET "likeCount" = 40 WHERE uri = $1', uri(1, POST, "p1"))
    await db.execute('UPDATE profile_agg SET "postsCount" = 0')  # also counts as drift
    before = await snapshot(db)
    report = await reconcile(settings.database_url, "sample", sample=100)
    assert report.checked == 4 + 1  # every post_agg row and the one profile_agg row
    assert (report.drifted, report.repaired) == (2, 0)
    assert report.by_counter == {"likeCount": 1, "postsCount": 1}
    assert await snapshot(db) == before


async def test_dirty_repairs_only_the_marked_keys(settings, redis, db):
    await _small_world(settings, redis)
    p1, p2 = uri(1, POST, "p1"), uri(1, POST, "p2")
    await db.execute('UPDATE post_agg SET "likeCount" = 9 WHERE uri = ANY($1)', [p1, p2])
    await db.execute("INSERT INTO dirty_counter VALUES ('post_agg', $1), ('post_agg', 'x')", p1)
    report = await reconcile(settings.database_url, "dirty")
    assert (report.checked, report.drifted, report.repaired) == (2, 1, 1)
    counts = dict(
        await db.fetch('SELECT uri, "likeCount" FROM post_agg WHERE uri = ANY($1)', [p1, p2])
    )
    assert counts == {p1: 2, p2: 9}
    assert await db.fetchval("SELECT count(*) FROM dirty_counter") == 0
    assert (await drift(db))["likeCount"] == 1


async def test_cli(settings, redis):
    await _small_world(settings, redis)
    env = {"DATABASE_URL": settings.database_url, "PATH": ""}
    cmd = [sys.executable, "-m", "indexer.cli", "reconcile"]

    def run(*args: str, environ: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *args], env=environ, capture_output=True, text=True,
                              timeout=60)  # fmt: skip

    done = run("--all", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) | {"examples": []} == {
        "mode": "all", "checked": 5, "drifted": 0, "repaired": 0, "drifted_by_counter": {},
        "examples": [],
    }  # fmt: skip
    text = run("--sample", "3")
    assert text.returncode == 0
    assert text.stdout.startswith("reconcile --sample: 4 keys checked, 0 drifted, 0 repaired")
    both = run("--all", "--dirty")
    assert both.returncode == 2
    assert both.stderr.strip() == "error: give exactly one of --dirty, --all, --sample N"
    bad = run("--dirty", environ={"DATABASE_URL": "postgresql://u:pw@127.0.0.1:1/x", "PATH": ""})
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: cannot connect to postgresql://u:***@127.0.0.1:1/x")
    assert "Traceback" not in bad.stderr
