"""app.bsky.graph.verification: `verification`, one per (subject, creator); no counters."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.normalize import clean_text, normalize_datetime
from indexer.plugin import Op
from plugins._unique import UniquePlugin, UniqueTable


class VerificationRecord(msgspec.Struct):
    subject: str
    handle: str
    displayName: str
    createdAt: Any = None


class VerificationPlugin(UniquePlugin):
    collection = "app.bsky.graph.verification"
    table = UniqueTable(
        "verification",
        ("uri", "cid", "rkey", "creator", "subject", "handle", "displayName", "createdAt",
         "indexedAt"),
        ("varchar",) * 9,
        key=("subject", "creator"),
        returning=(),
    )  # fmt: skip
    decode = msgspec.json.Decoder(VerificationRecord).decode

    def rows(self, ops: list[Op]) -> list[tuple[Any, ...]]:
        return [
            (op.uri, op.cid, op.rkey, op.did, clean_text(op.record.subject),
             clean_text(op.record.handle), clean_text(op.record.displayName),
             normalize_datetime(op.record.createdAt), op.indexed_at)
            for op in ops
        ]  # fmt: skip
