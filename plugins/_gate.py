"""Thread gates and post gates: one gate per post, same author and rkey as the post it gates."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.db import Connection
from indexer.normalize import normalize_datetime
from indexer.plugin import Kind, Op
from plugins._post_flags import set_gate
from plugins._rows import RowPlugin
from plugins.post import POST


class GateRecord(msgspec.Struct):
    post: str
    createdAt: Any = None


def gated_post(op: Op) -> str:
    """The uri of the only post a gate may gate: its author's post of the same rkey."""
    return f"at://{op.did}/{POST}/{op.rkey}"


class GatePlugin(RowPlugin):
    """A gate's row, and its post's flag column (`flag`) while the gate is indexed.

    Its calls expect shared locks on the posts its gates may gate (`locks`, known from the
    gates' uris alone) taken (see `plugins/_post_flags.py`).
    """

    flag: str
    cols = ("uri", "cid", "creator", "postUri", "createdAt", "indexedAt")
    decode = msgspec.json.Decoder(GateRecord).decode

    def row(self, op: Op) -> tuple[Any, ...] | None:
        rec: GateRecord = op.record
        if rec.post != gated_post(op):
            op.rejected = "the gated post is not the gate's author's post of the same rkey"
            return None
        return (op.uri, op.cid, op.did, rec.post, normalize_datetime(rec.createdAt), op.indexed_at)

    def locks(self, op: Op, kind: Kind) -> list[tuple[str, bool]]:
        """The post the gate may gate, shared."""
        return [(gated_post(op), False)]

    async def written(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        await set_gate(conn, self.flag, [row[3] for row in rows], present=True)

    async def removed(self, conn: Connection, rows: list[Any]) -> None:
        await set_gate(conn, self.flag, [row["postUri"] for row in rows], present=False)
