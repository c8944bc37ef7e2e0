"""app.bsky.graph.listitem: `list_item`; only the list's own author may add to it.

A listitem whose list belongs to another account is refused: no row, counted as `rejected`.
One subject appears once per list; further items of the same pair are duplicates (see
`plugins/_unique.py`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.aggregates import Deltas
from indexer.db import Connection
from indexer.normalize import clean_text, normalize_datetime
from indexer.plugin import Op
from plugins._unique import UniquePlugin, UniqueTable


class ListItemRecord(msgspec.Struct):
    subject: str
    list: str
    createdAt: Any = None


def list_owner(list_uri: str) -> str | None:
    """The DID in `at://DID/app.bsky.graph.list/...`, or None when it is no at-uri."""
    if not list_uri.startswith("at://"):
        return None
    return list_uri[5:].split("/", 1)[0] or None


class ListItemPlugin(UniquePlugin):
    collection = "app.bsky.graph.listitem"
    table = UniqueTable(
        "list_item",
        ("uri", "cid", "creator", "subjectDid", "listUri", "createdAt", "indexedAt"),
        ("varchar",) * 7,
        key=("listUri", "subjectDid"),
        returning=(),
    )
    decode = msgspec.json.Decoder(ListItemRecord).decode

    def rows(self, ops: list[Op]) -> list[tuple[Any, ...]]:
        return [
            (op.uri, op.cid, op.did, clean_text(op.record.subject), clean_text(op.record.list),
             normalize_datetime(op.record.createdAt), op.indexed_at)
            for op in ops
        ]  # fmt: skip

    async def insert(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        accepted = []
        for op in ops:
            if list_owner(op.record.list) == op.did:
                accepted.append(op)
            else:
                op.rejected = "listitem in a list of another account"
        await super().insert(conn, accepted, deltas)
