"""app.bsky.graph.follow: `follow`; the subject's followersCount, the creator's followsCount."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.aggregates import Deltas
from indexer.normalize import clean_text, normalize_datetime
from indexer.plugin import Op
from plugins._unique import UniquePlugin, UniqueTable


class GraphRecord(msgspec.Struct):
    """A record whose subject is an account: follows and blocks."""

    subject: str
    createdAt: Any = None


GRAPH_COLUMNS = ("uri", "cid", "creator", "subjectDid", "createdAt", "indexedAt")


def graph_rows(ops: list[Op]) -> list[tuple[Any, ...]]:
    return [
        (op.uri, op.cid, op.did, clean_text(op.record.subject),
         normalize_datetime(op.record.createdAt), op.indexed_at)
        for op in ops
    ]  # fmt: skip


class FollowPlugin(UniquePlugin):
    collection = "app.bsky.graph.follow"
    table = UniqueTable(
        "follow", GRAPH_COLUMNS, ("varchar",) * 6, key=("creator", "subjectDid"),
        returning=("creator", "subjectDid"),
    )  # fmt: skip
    decode = msgspec.json.Decoder(GraphRecord).decode

    def rows(self, ops: list[Op]) -> list[tuple[Any, ...]]:
        return graph_rows(ops)

    def count(self, row: Any, by: int, deltas: Deltas) -> None:
        deltas.profile(row["subjectDid"], "followersCount", by)
        deltas.profile(row["creator"], "followsCount", by)
