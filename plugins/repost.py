"""app.bsky.feed.repost: `repost`, its `feed_item`, and the subject post's `repostCount`."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.aggregates import Deltas
from indexer.db import Connection
from indexer.events import StrongRef
from indexer.plugin import Op, sort_at
from plugins import _feed_item as feed_item
from plugins._unique import UniquePlugin, UniqueTable
from plugins.like import SUBJECT_COLUMNS, subject_rows


class RepostRecord(msgspec.Struct):
    subject: StrongRef
    createdAt: Any = None
    via: StrongRef | None = None


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
        await feed_item.add(conn, items)

    async def removed(self, conn: Connection, rows: list[Any], deltas: Deltas) -> None:
        await super().removed(conn, rows, deltas)
        await feed_item.remove(conn, [r["uri"] for r in rows])
