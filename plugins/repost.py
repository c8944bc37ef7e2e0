"""app.bsky.feed.repost: `repost`, its `feed_item`, and the subject post's `repostCount`."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.aggregates import Deltas
from indexer.db import Connection
from indexer.events import StrongRef
from indexer.normalize import clean_text, normalize_datetime
from indexer.plugin import Op, columns, sort_at
from plugins._unique import UniqueTable, promoted_ops


class RepostRecord(msgspec.Struct):
    subject: StrongRef
    createdAt: Any = None
    via: StrongRef | None = None


_decoder = msgspec.json.Decoder(RepostRecord)
_table = UniqueTable(
    "repost",
    ("uri", "cid", "creator", "subject", "subjectCid", "via", "viaCid", "createdAt", "indexedAt"),
    ("varchar",) * 9,
    key=("creator", "subject"),
    returning="subject",
)
_FEED_ITEM = (
    'INSERT INTO feed_item (uri, cid, type, "postUri", "originatorDid", "sortAt") '
    "SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[], "
    "$5::varchar[], $6::varchar[]) ORDER BY 1 ON CONFLICT (uri) DO NOTHING"
)


class RepostPlugin:
    collection = "app.bsky.feed.repost"

    def decode(self, raw: bytes) -> RepostRecord:
        return _decoder.decode(raw)

    def accepts(self, rkey: str) -> bool:
        return True

    async def insert(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        rows = []
        for op in ops:
            rec: RepostRecord = op.record
            via = rec.via
            rows.append(
                (
                    op.uri,
                    op.cid,
                    op.did,
                    clean_text(rec.subject.uri),
                    clean_text(rec.subject.cid),
                    clean_text(via.uri) if via else None,
                    clean_text(via.cid) if via else None,
                    normalize_datetime(rec.createdAt),
                    op.indexed_at,
                )
            )
        inserted = await _table.insert(conn, rows)
        done = {r["uri"] for r in inserted}
        items = [
            (row[0], row[1], "repost", row[3], row[2], sort_at(row[7], row[8]))
            for row in rows
            if row[0] in done
        ]
        if items:
            await conn.execute(_FEED_ITEM, *columns(items, 6))
        for row in inserted:
            deltas.post(row["subject"], "repostCount", 1)

    async def update(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await self.delete(conn, ops, deltas)
        await self.insert(conn, ops, deltas)

    async def delete(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        deleted, promoted = await _table.delete(conn, [op.uri for op in ops])
        if deleted:
            await conn.execute(
                "DELETE FROM feed_item WHERE uri = ANY($1::varchar[])", [r["uri"] for r in deleted]
            )
        for row in deleted:
            deltas.post(row["subject"], "repostCount", -1)
        await self.insert(conn, promoted_ops(self.collection, self.decode, promoted), deltas)
