"""app.bsky.graph.starterpack: the `starter_pack` table; updates apply."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.normalize import clean_optional, normalize_datetime
from indexer.plugin import Op
from plugins._rows import RowPlugin


class StarterPackRecord(msgspec.Struct):
    name: str | None = None
    createdAt: Any = None


class StarterPackPlugin(RowPlugin):
    collection = "app.bsky.graph.starterpack"
    table = "starter_pack"
    cols = ("uri", "cid", "creator", "name", "createdAt", "indexedAt")
    decode = msgspec.json.Decoder(StarterPackRecord).decode

    def row(self, op: Op) -> tuple[Any, ...]:
        rec: StarterPackRecord = op.record
        return (
            op.uri, op.cid, op.did, clean_optional(rec.name), normalize_datetime(rec.createdAt),
            op.indexed_at,
        )  # fmt: skip
