"""`feed_item`: the author-feed entries that posts and reposts both write."""

from __future__ import annotations

from typing import Any

from indexer.db import Connection, rows_json
from indexer.plugin import bulk_insert

COLUMNS = ("uri", "cid", "type", "postUri", "originatorDid", "sortAt")


def insert_sql(param: int = 1, where: str = "") -> str:
    """The insert of rows of COLUMNS from `$param`, those where `where` holds (already present
    ones are kept)."""
    return bulk_insert(
        "feed_item", COLUMNS, ("varchar",) * 6, "ON CONFLICT (uri) DO NOTHING",
        param=param, where=where,
    )  # fmt: skip


_INSERT = insert_sql()
_DELETE = "DELETE FROM feed_item WHERE uri = ANY($1::varchar[])"


async def add(conn: Connection, items: list[tuple[Any, ...]]) -> None:
    """Insert rows of COLUMNS (already present ones are kept)."""
    if items:
        await conn.execute(_INSERT, rows_json(items))


async def remove(conn: Connection, uris: list[str]) -> None:
    """Delete the feed items of these records."""
    if uris:
        await conn.execute(_DELETE, uris)
