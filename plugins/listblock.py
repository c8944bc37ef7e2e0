"""app.bsky.graph.listblock: `list_block`, one per (creator, list); no counters."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.normalize import clean_text, normalize_datetime
from indexer.plugin import Op
from plugins._unique import UniquePlugin, UniqueTable


class ListBlockRecord(msgspec.Struct):
    subject: str
    createdAt: Any = None


class ListBlockPlugin(UniquePlugin):
    collection = "app.bsky.graph.listblock"
    table = UniqueTable(
        "list_block",
        ("uri", "cid", "creator", "subjectUri", "createdAt", "indexedAt"),
        ("varchar",) * 6,
        key=("creator", "subjectUri"),
        returning=(),
    )
    decode = msgspec.json.Decoder(ListBlockRecord).decode

    def rows(self, ops: list[Op]) -> list[tuple[Any, ...]]:
        return [
            (op.uri, op.cid, op.did, clean_text(op.record.subject),
             normalize_datetime(op.record.createdAt), op.indexed_at)
            for op in ops
        ]  # fmt: skip
