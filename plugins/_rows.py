"""Tables with one row per record, keyed by uri, and no counters (lists, feed generators, ...).

A create or an update writes the whole row (the rev guard already chose the winning version),
a delete removes it. A record the plugin refuses on its content gets no row; its op carries
the reason (`Op.rejected`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from indexer.aggregates import Deltas
from indexer.constants import MAX_TEXT_CHARS
from indexer.db import Connection, rows_json
from indexer.normalize import clean_optional
from indexer.plugin import Op, bulk_insert
from plugins.profile import blob_cid

__all__ = ["RowPlugin", "blob_cid", "json_text"]


def json_text(raw: Any) -> str | None:
    """A JSON value kept as text (`descriptionFacets`), or None when absent, null or too big.

    Never truncated: half a JSON document would break the readers that parse it.
    """
    text = bytes(raw).decode("utf-8", "replace") if raw else ""
    if not text or text == "null" or len(text) > MAX_TEXT_CHARS:
        return None
    return clean_optional(text, MAX_TEXT_CHARS)


class RowPlugin:
    """A plugin over one table keyed by uri; subclasses give the table, its columns and `row`."""

    collection: str
    table: str
    cols: tuple[str, ...]  # every column is varchar; the first is uri
    decode: Callable[[bytes], Any]

    def __init__(self) -> None:
        sets = ", ".join(f'"{c}" = excluded."{c}"' for c in self.cols[1:])
        self._upsert = bulk_insert(
            self.table,
            self.cols,
            ("varchar",) * len(self.cols),
            f"ON CONFLICT (uri) DO UPDATE SET {sets}",
        )
        self._delete = f'DELETE FROM "{self.table}" WHERE uri = ANY($1::varchar[]) RETURNING *'

    def accepts(self, rkey: str) -> bool:
        return True

    def row(self, op: Op) -> tuple[Any, ...] | None:
        """The row of this record, or None (with `op.rejected` set) when it is refused."""
        raise NotImplementedError

    async def written(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """Rows now in the table, created or changed (subclasses may write more)."""

    async def removed(self, conn: Connection, rows: list[Any]) -> None:
        """Rows gone from the table, as DELETE ... RETURNING gave them."""

    async def insert(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await self._write(conn, ops)

    async def update(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        refused = await self._write(conn, ops)
        if refused:  # accepted in an earlier version: that row must go
            await self.delete(conn, refused, deltas)

    async def _write(self, conn: Connection, ops: list[Op]) -> list[Op]:
        """Upsert the rows of the accepted ops; return the refused ops."""
        rows, refused = [], []
        for op in ops:
            row = self.row(op)
            if row is None:
                refused.append(op)
            else:
                rows.append(row)
        if rows:
            await conn.execute(self._upsert, rows_json(rows))
            await self.written(conn, rows)
        return refused

    async def delete(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        gone = await conn.fetch(self._delete, [op.uri for op in ops])
        if gone:
            await self.removed(conn, list(gone))
