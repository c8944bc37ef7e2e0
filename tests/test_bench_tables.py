"""The benchmark's digests of the written tables: they compare the state 1 and 2 replicas reach."""

from __future__ import annotations

import statistics
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from rich.console import Console

from bench.options import parse_args
from bench.run import Bench
from bench.tables import GROWN_MARK, inspect
from indexer.devservers import PostgresServer, RedisServer
from tests.conftest import TEMPLATE_DB

POST = "at://did:plc:a/app.bsky.feed.post/1"
# Every counter column of the two counter tables, with the key of a row to put it on.
COUNTER_COLUMNS = [
    ("post_agg", "uri", POST, c)
    for c in ("likeCount", "replyCount", "repostCount", "quoteCount", "bookmarkCount")
] + [
    ("profile_agg", "did", "did:plc:a", c) for c in ("followersCount", "followsCount", "postsCount")
]


async def _digests(database_url: str, measured_only: bool = False) -> dict[str, str]:
    return (await inspect(database_url, measured_only)).digests


async def _counted_rows(db: asyncpg.Connection) -> None:
    """A row with a count in each counter table: the state both digests share."""
    await db.execute('INSERT INTO post_agg (uri, "likeCount") VALUES ($1, 3)', POST + "0")
    await db.execute('INSERT INTO profile_agg (did, "postsCount") VALUES ($1, 2)', "did:plc:b")


async def test_a_row_of_zero_counters_is_left_out_of_the_digest(
    database_url: str, db: asyncpg.Connection
):
    await _counted_rows(db)
    before = await _digests(database_url)
    await db.execute("INSERT INTO post_agg (uri) VALUES ($1)", POST)
    await db.execute("INSERT INTO profile_agg (did) VALUES ('did:plc:a')")
    inspection = await inspect(database_url, measured_only=False)
    assert inspection.rows["post_agg"] == 2
    assert inspection.rows["profile_agg"] == 2
    assert inspection.digests == before


@pytest.mark.parametrize(("table", "key", "value", "counter"), COUNTER_COLUMNS)
async def test_any_counter_that_differs_changes_the_digest(
    database_url: str, db: asyncpg.Connection, table: str, key: str, value: str, counter: str
):
    await _counted_rows(db)
    await db.execute(f"INSERT INTO {table} ({key}) VALUES ($1)", value)
    zeros = await _digests(database_url)
    await db.execute(f'UPDATE {table} SET "{counter}" = 1 WHERE {key} = $1', value)
    assert (await _digests(database_url))[table] != zeros[table]
    await db.execute(f'UPDATE {table} SET "{counter}" = 0 WHERE {key} = $1', value)
    assert (await _digests(database_url))[table] == zeros[table]


async def test_the_measured_digest_leaves_out_the_grown_rows_and_the_rows_of_zeros(
    database_url: str, db: asyncpg.Connection
):
    await _counted_rows(db)
    before = await _digests(database_url, measured_only=True)
    await db.execute("INSERT INTO post_agg (uri) VALUES ($1)", POST)
    grown = f"did:plc:c{GROWN_MARK}1"
    await db.execute('INSERT INTO profile_agg (did, "followsCount") VALUES ($1, 5)', grown)
    assert await _digests(database_url, measured_only=True) == before
    assert (await _digests(database_url))["profile_agg"] != before["profile_agg"]


async def test_rows_of_one_key_give_one_digest_in_any_order(database_url, db):
    """A post's image embeds share its uri: their order in the table does not change the digest,
    their content does."""
    images = [(POST, str(n), f"bafyimage{n}", f"alt {n}") for n in range(3)]
    insert = (
        'INSERT INTO post_embed_image ("postUri", position, "imageCid", alt) '
        "VALUES ($1, $2, $3, $4)"
    )
    await db.executemany(insert, images)
    before = await _digests(database_url)
    await db.execute("DELETE FROM post_embed_image")
    await db.executemany(insert, images[::-1])
    assert await _digests(database_url) == before
    await db.execute("UPDATE post_embed_image SET alt = 'changed' WHERE position = '1'")
    assert (await _digests(database_url))["post_embed_image"] != before["post_embed_image"]


async def test_the_copy_baseline_loads_the_rows_into_a_fresh_copy_each_time(
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    database_url: str,
    db: asyncpg.Connection,
    tmp_path: Path,
):
    await _counted_rows(db)
    await db.execute(
        """INSERT INTO actor (did, "indexedAt") VALUES ('did:plc:a', '2026-12-07T00:00:00.000Z')"""
    )
    opts = parse_args(["--no-write", "--copy-loads", "2"])
    bench = Bench(opts, redis_server, postgres_server, tmp_path, Console(quiet=True))
    try:
        source = urlsplit(database_url).path.lstrip("/")
        # a second load into the same copy would fail on the rows' keys
        copy = await bench.copy_baseline(source, TEMPLATE_DB, measured_only=False)
        copies = f"SELECT count(*) FROM pg_database WHERE datname = '{source}_copy'"
        left = await bench.admin(copies)
    finally:
        await bench.close()
    assert copy.rows == 3
    assert len(copy.loads) == 2
    assert copy.seconds == statistics.median(copy.loads)
    assert left == 0
