"""app.bsky.feed.like: the `like` table and the subject post's `likeCount`."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.aggregates import Deltas
from indexer.events import StrongRef
from indexer.normalize import clean_text, normalize_datetime
from indexer.plugin import Op
from plugins._unique import UniquePlugin, UniqueTable


class LikeRecord(msgspec.Struct):
    subject: StrongRef
    createdAt: Any = None
    via: StrongRef | None = None


SUBJECT_COLUMNS = (
    "uri", "cid", "creator", "subject", "subjectCid", "via", "viaCid", "createdAt", "indexedAt",
)  # fmt: skip


def subject_rows(ops: list[Op]) -> list[tuple[Any, ...]]:
    """Rows of SUBJECT_COLUMNS for records with a strong-ref `subject` and optional `via`."""
    rows = []
    for op in ops:
        subject, via = op.record.subject, op.record.via
        rows.append((
            op.uri, op.cid, op.did, clean_text(subject.uri), clean_text(subject.cid),
            clean_text(via.uri) if via else None, clean_text(via.cid) if via else None,
            normalize_datetime(op.record.createdAt), op.indexed_at,
        ))  # fmt: skip
    return rows


class LikePlugin(UniquePlugin):
    collection = "app.bsky.feed.like"
    table = UniqueTable(
        "like", SUBJECT_COLUMNS, ("varchar",) * 9, key=("subject", "creator"),
        returning=("subject",),
    )  # fmt: skip
    decode = msgspec.json.Decoder(LikeRecord).decode

    def rows(self, ops: list[Op]) -> list[tuple[Any, ...]]:
        return subject_rows(ops)

    def count(self, row: Any, by: int, deltas: Deltas) -> None:
        deltas.post(row["subject"], "likeCount", by)
