"""app.bsky.graph.block: the `actor_block` table (no counters)."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.aggregates import Deltas
from indexer.db import Connection
from indexer.normalize import clean_text, normalize_datetime
from indexer.plugin import Op
from plugins._unique import UniqueTable, promoted_ops


class BlockRecord(msgspec.Struct):
    subject: str
    createdAt: Any = None


_decoder = msgspec.json.Decoder(BlockRecord)
_table = UniqueTable(
    "actor_block",
    ("uri", "cid", "creator", "subjectDid", "createdAt", "indexedAt"),
    ("varchar",) * 6,
    key=("creator", "subjectDid"),
    returning="subjectDid",
)


class BlockPlugin:
    collection = "app.bsky.graph.block"

    def decode(self, raw: bytes) -> BlockRecord:
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
        await _table.insert(conn, rows)

    async def update(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await self.delete(conn, ops, deltas)
        await self.insert(conn, ops, deltas)

    async def delete(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        _, promoted = await _table.delete(conn, [op.uri for op in ops])
        await self.insert(conn, promoted_ops(self.collection, self.decode, promoted), deltas)
