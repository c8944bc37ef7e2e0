"""app.bsky.labeler.service: the `labeler` table, rkey `self` only (as profiles); updates apply."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.normalize import normalize_datetime
from indexer.plugin import Op
from plugins._rows import RowPlugin


class LabelerRecord(msgspec.Struct):
    createdAt: Any = None


class LabelerPlugin(RowPlugin):
    collection = "app.bsky.labeler.service"
    table = "labeler"
    cols = ("uri", "cid", "creator", "createdAt", "indexedAt")
    decode = msgspec.json.Decoder(LabelerRecord).decode

    def accepts(self, rkey: str) -> bool:
        return rkey == "self"

    def row(self, op: Op) -> tuple[Any, ...]:
        return (op.uri, op.cid, op.did, normalize_datetime(op.record.createdAt), op.indexed_at)
