"""app.bsky.graph.follow: `follow`; the subject's followersCount, the creator's followsCount."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.aggregates import Deltas
from indexer.db import Connection
from indexer.normalize import clean_text, normalize_datetime
from indexer.plugin import Op
from plugins._unique import UniqueTable, promoted_ops


class FollowRecord(msgspec.Struct):
    subject: str
    createdAt: Any = None


_decoder = msgspec.json.Decoder(FollowRecord)
_table = UniqueTable(
    "follow",
    ("uri", "cid", "creator", "subjectDid", "createdAt", "indexedAt"),
    ("varchar",) * 6,
    key=("creator", "subjectDid"),
    returning="subjectDid",
)


class FollowPlugin:
    collection = "app.bsky.graph.follow"

    def decode(self, raw: bytes) -> FollowRecord:
        return _decoder.decode(raw)

    def accepts(self, rkey: str) -> bool:
        return True

    async def insert(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        rows = [
            (
                op.uri,
                op.cid,
                op.did,
                clean_text(op.record.subject),
                normalize_datetime(op.record.createdAt),
                op.indexed_at,
            )
            for op in ops
        ]
        creators = {op.uri: op.did for op in ops}
        for row in await _table.insert(conn, rows):
            deltas.profile(row["subjectDid"], "followersCount", 1)
            deltas.profile(creators[row["uri"]], "followsCount", 1)

    async def update(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await self.delete(conn, ops, deltas)
        await self.insert(conn, ops, deltas)

    async def delete(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        deleted, promoted = await _table.delete(conn, [op.uri for op in ops])
        creators = {op.uri: op.did for op in ops}
        for row in deleted:
            deltas.profile(row["subjectDid"], "followersCount", -1)
            deltas.profile(creators[row["uri"]], "followsCount", -1)
        await self.insert(conn, promoted_ops(self.collection, self.decode, promoted), deltas)
