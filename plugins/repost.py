"""app.bsky.feed.repost: `repost`, its `feed_item`, and the subject post's `repostCount`."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.aggregates import Deltas
from indexer.db import Connection
from indexer.events import StrongRef
from indexer.plugin import Op, columns, sort_at, unnest_insert
from plugins._unique import UniquePlugin, UniqueTable
from plugins.like import SUBJECT_COLUMNS, subject_rows


class RepostRecord(msgspec.Struct):
    subject: StrongRef
    createdAt: Any = None
    via: StrongRef | None = None


_FEED_ITEM = unnest_insert(
    "feed_item", ("uri", "cid", "type", "postUri", "originatorDid", "sortAt"), ("varchar",) * 6,
    "ON CONFLICT (uri) DO NOTHING",
)  # fmt: skip
_DELETE_FEED_ITEM = "DELETE FROM feed_item WHERE uri = ANY($1::varchar[])"


class RepostPlugin(UniquePlugin):
    collection = "app.bsky.feed.repost"
    table = UniqueTable(
        "repost", SUBJECT_COLUMNS, ("varchar",) * 9, key=("creator", "subject"),
        returning=("creator", "subject", "createdAt"),
    )  # fmt: skip
    decode = msgspec.json.Decoder(RepostRecord).decode

    def rows(self, ops: list[Op]) -> list[tuple[Any, ...]]:
        return subject_rows(ops)

    def count(self, row: Any, by: int, deltas: Deltas) -> None:
        deltas.post(row["subject"], "repostCount", by)

    async def added(self, conn: Connection, rows: list[Any], deltas: Deltas) -> None:
        await super().added(conn, rows, deltas)
        items = [
            (r["uri"], r["cid"], "repost", r["subject"], r["creator"],
             sort_at(r["createdAt"], r["indexedAt"]))
            for r in rows
        ]  # fmt: skip
        if items:
            await conn.execute(_FEED_ITEM, *columns(items, 6))

    async def removed(self, conn: Connection, rows: list[Any], deltas: Deltas) -> None:
        await super().removed(conn, rows, deltas)
        if rows:
            await conn.execute(_DELETE_FEED_ITEM, [r["uri"] for r in rows])
