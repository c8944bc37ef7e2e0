"""app.bsky.feed.like: the `like` table and the subject post's `likeCount`."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.aggregates import Deltas
from indexer.db import Connection
from indexer.events import StrongRef
from indexer.normalize import clean_text, normalize_datetime
from indexer.plugin import Op
from plugins._unique import UniqueTable, promoted_ops


class LikeRecord(msgspec.Struct):
    subject: StrongRef
    createdAt: Any = None
    via: StrongRef | None = None


_decoder = msgspec.json.Decoder(LikeRecord)
_VARCHAR9 = ("varchar",) * 9
_table = UniqueTable(
    "like",
    ("uri", "cid", "creator", "subject", "subjectCid", "via", "viaCid", "createdAt", "indexedAt"),
    _VARCHAR9,
    key=("subject", "creator"),
    returning="subject",
)


class LikePlugin:
    collection = "app.bsky.feed.like"

    def decode(self, raw: bytes) -> LikeRecord:
        return _decoder.decode(raw)

    def accepts(self, rkey: str) -> bool:
        return True

    async def insert(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        rows = []
        for op in ops:
            rec: LikeRecord = op.record
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
        for row in await _table.insert(conn, rows):
            deltas.post(row["subject"], "likeCount", 1)

    async def update(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await self.delete(conn, ops, deltas)
        await self.insert(conn, ops, deltas)

    async def delete(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        deleted, promoted = await _table.delete(conn, [op.uri for op in ops])
        for row in deleted:
            deltas.post(row["subject"], "likeCount", -1)
        await self.insert(conn, promoted_ops(self.collection, self.decode, promoted), deltas)
