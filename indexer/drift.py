"""Counter drift: each counter compared with the `count(*)` of the rows it counts.

Never on the hot path: used by tests after every run, and by operators to check a database.
"""

from __future__ import annotations

from typing import Final

from indexer.db import Connection

# counter -> (aggregate table, its key, the query counting the rows behind it per key)
COUNTERS: Final = {
    "likeCount": ("post_agg", "uri", 'SELECT subject AS k, count(*) AS n FROM "like" GROUP BY 1'),
    "repostCount": ("post_agg", "uri", "SELECT subject AS k, count(*) AS n FROM repost GROUP BY 1"),
    "replyCount": (
        "post_agg",
        "uri",
        'SELECT "replyParent" AS k, count(*) AS n FROM post '
        'WHERE "replyParent" IS NOT NULL GROUP BY 1',
    ),
    "quoteCount": ("post_agg", "uri", "SELECT subject AS k, count(*) AS n FROM quote GROUP BY 1"),
    "followersCount": (
        "profile_agg",
        "did",
        'SELECT "subjectDid" AS k, count(*) AS n FROM follow GROUP BY 1',
    ),
    "followsCount": (
        "profile_agg",
        "did",
        "SELECT creator AS k, count(*) AS n FROM follow GROUP BY 1",
    ),
    "postsCount": ("profile_agg", "did", "SELECT creator AS k, count(*) AS n FROM post GROUP BY 1"),
}


async def drift(conn: Connection) -> dict[str, int]:
    """For every counter, how many keys disagree with their rows (0 everywhere is healthy)."""
    found = {}
    for counter, (table, key, actual) in COUNTERS.items():
        found[counter] = await conn.fetchval(
            f"WITH actual AS ({actual}) SELECT count(*) FROM actual "
            f"FULL JOIN {table} agg ON agg.{key} = actual.k "
            f'WHERE coalesce(actual.n, 0) <> coalesce(agg."{counter}", 0)'
        )
    return found


async def negative_counters(conn: Connection) -> int:
    """How many counter values are below zero (always 0 when counts move only by real rows)."""
    post = await conn.fetchval(
        'SELECT count(*) FROM post_agg WHERE least("likeCount", "repostCount", "replyCount", '
        '"quoteCount") < 0'
    )
    profile = await conn.fetchval(
        'SELECT count(*) FROM profile_agg WHERE least("followersCount", "followsCount", '
        '"postsCount") < 0'
    )
    return int(post) + int(profile)
