"""`feed_item`: the author-feed entries that posts and reposts both write."""

from __future__ import annotations

from typing import Any

from indexer.db import Connection, rows_json
from indexer.plugin import bulk_insert

COLUMNS = ("uri", "cid", "type", "postUri", "originatorDid", "sortAt")
TYPES = ("varchar",) * 6
TAIL = "ON CONFLICT (uri) DO NOTHING"
_INSERT = bulk_insert("feed_item", COLUMNS, TYPES, TAIL)
_DELETE = "DELETE FROM feed_item WHERE uri = ANY($1::varchar[])"


async def add(conn: Connection, items: list[tuple[Any, ...]]) -> None:
    """Insert rows of COLUMNS (already present ones are kept)."""
    if items:
        await conn.execute(_INSERT, rows_json(items))


async def remove(conn: Connection, uris: list[str]) -> None:
    """Delete the feed items of these records."""
    if uris:
        await conn.execute(_DELETE, uris)
