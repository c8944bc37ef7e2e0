"""The benchmark's digests of the written tables: they compare the state 1 and 2 replicas reach."""

from __future__ import annotations

import asyncpg

from bench.tables import inspect

POST = "at://did:plc:a/app.bsky.feed.post/1"


async def _digests(database_url: str) -> dict[str, str]:
    return (await inspect(database_url, measured_only=False)).digests


async def test_a_row_of_zero_counters_is_left_out_of_the_digest(
    database_url: str, db: asyncpg.Connection
):
    empty = await _digests(database_url)
    await db.execute("INSERT INTO post_agg (uri) VALUES ($1)", POST)
    await db.execute("INSERT INTO profile_agg (did) VALUES ('did:plc:a')")
    inspection = await inspect(database_url, measured_only=False)
    assert inspection.rows["post_agg"] == 1
    assert inspection.rows["profile_agg"] == 1
    assert inspection.digests == empty


async def test_a_counter_that_differs_changes_the_digest(database_url: str, db: asyncpg.Connection):
    await db.execute('INSERT INTO post_agg (uri, "quoteCount") VALUES ($1, 0)', POST)
    zero = await _digests(database_url)
    await db.execute('UPDATE post_agg SET "quoteCount" = 1')
    one = await _digests(database_url)
    assert one["post_agg"] != zero["post_agg"]
    await db.execute('INSERT INTO profile_agg (did, "postsCount") VALUES ($1, 2)', "did:plc:a")
    assert (await _digests(database_url))["profile_agg"] != one["profile_agg"]
    await db.execute('UPDATE post_agg SET "quoteCount" = 0')
    assert (await _digests(database_url))["post_agg"] == zero["post_agg"]
