"""Tables with one row per (subject, creator): later records of the same pair are duplicates.

A duplicate is recorded in `duplicate_record`, counted nowhere, and promoted to the table (and
counted) when the record it duplicates is deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from indexer.aggregates import Deltas
from indexer.db import Connection
from indexer.plugin import Op, columns, unnest_insert

_PROMOTE = """
WITH pick AS (
    SELECT DISTINCT ON ("duplicateOf") uri, "duplicateOf" AS original
    FROM duplicate_record WHERE "duplicateOf" = ANY($1::varchar[])
    ORDER BY "duplicateOf", "indexedAt", uri
), moved AS (
    DELETE FROM duplicate_record d USING pick WHERE d.uri = pick.uri
    RETURNING d.uri, pick.original
), repointed AS (
    UPDATE duplicate_record d SET "duplicateOf" = moved.uri
    FROM moved WHERE d."duplicateOf" = moved.original AND d.uri <> moved.uri
)
SELECT r.uri, r.did, r.cid, r.json, r.rev, r."indexedAt"
FROM moved JOIN record r ON r.uri = moved.uri
ORDER BY r.uri
"""

_ADD_DUPLICATES = (
    'INSERT INTO duplicate_record (uri, cid, "duplicateOf", "indexedAt") '
    "SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[]) "
    "ORDER BY 1 ON CONFLICT (uri) DO NOTHING"
)


class UniqueTable:
    """Bulk insert and delete for a table with a unique pair key, handling duplicates."""

    def __init__(
        self,
        table: str,
        cols: tuple[str, ...],
        types: tuple[str, ...],
        key: tuple[str, str],
        returning: tuple[str, ...],
    ) -> None:
        self._width = len(cols)
        self._key_at = (cols.index(key[0]), cols.index(key[1]))
        back = ", ".join(f'"{c}"' for c in ("uri", *returning))
        self._insert = unnest_insert(table, cols, types, f"ON CONFLICT DO NOTHING RETURNING {back}")
        self._find = (
            f'SELECT uri, "{key[0]}" AS a, "{key[1]}" AS b FROM "{table}" '
            f'WHERE ("{key[0]}", "{key[1]}") IN '
            "(SELECT * FROM unnest($1::varchar[], $2::varchar[]))"
        )
        self._delete = f'DELETE FROM "{table}" WHERE uri = ANY($1::varchar[]) RETURNING {back}'

    async def insert(self, conn: Connection, rows: list[tuple[Any, ...]]) -> list[Any]:
        """Insert rows (uri first, cid second, indexedAt last); return those actually inserted."""
        if not rows:
            return []
        inserted = await conn.fetch(self._insert, *columns(rows, self._width))
        if len(inserted) < len(rows):
            done = {r["uri"] for r in inserted}
            await self._record_duplicates(conn, [row for row in rows if row[0] not in done])
        return list(inserted)

    async def _record_duplicates(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        ia, ib = self._key_at
        found = await conn.fetch(self._find, [r[ia] for r in rows], [r[ib] for r in rows])
        original = {(f["a"], f["b"]): f["uri"] for f in found}
        dups = []
        for row in rows:
            first = original.get((row[ia], row[ib]))
            if first is not None and first != row[0]:
                dups.append((row[0], row[1], first, row[-1]))
        if dups:
            await conn.execute(_ADD_DUPLICATES, *columns(dups, 4))

    async def delete(self, conn: Connection, uris: list[str]) -> tuple[list[Any], list[Any]]:
        """Delete rows by uri; return (rows deleted, duplicate records promoted in their place)."""
        if not uris:
            return [], []
        deleted = await conn.fetch(self._delete, uris)
        await conn.execute("DELETE FROM duplicate_record WHERE uri = ANY($1::varchar[])", uris)
        if not deleted:
            return [], []
        promoted = await conn.fetch(_PROMOTE, [r["uri"] for r in deleted])
        return list(deleted), list(promoted)


class UniquePlugin:
    """A plugin over a UniqueTable: subclasses give the rows and what one row counts."""

    collection: str
    table: UniqueTable
    decode: Callable[[bytes], Any]

    def accepts(self, rkey: str) -> bool:
        return True

    def rows(self, ops: list[Op]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def count(self, row: Any, by: int, deltas: Deltas) -> None:
        """Move the counters one row (from RETURNING) contributes to, by +1 or -1."""

    async def insert(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await self.insert_rows(conn, ops, deltas)

    async def update(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await self.delete(conn, ops, deltas)
        await self.insert(conn, ops, deltas)

    async def delete(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await self.delete_rows(conn, ops, deltas)

    async def insert_rows(self, conn: Connection, ops: list[Op], deltas: Deltas) -> list[Any]:
        """Insert, count, and return the rows actually inserted (RETURNING)."""
        inserted = await self.table.insert(conn, self.rows(ops))
        for row in inserted:
            self.count(row, 1, deltas)
        return inserted

    async def delete_rows(self, conn: Connection, ops: list[Op], deltas: Deltas) -> list[Any]:
        """Delete, uncount, promote duplicates; return the rows actually deleted."""
        deleted, promoted = await self.table.delete(conn, [op.uri for op in ops])
        for row in deleted:
            self.count(row, -1, deltas)
        await self.insert(conn, promoted_ops(self.collection, self.decode, promoted), deltas)
        return deleted


def promoted_ops(collection: str, decode: Callable[[bytes], Any], rows: list[Any]) -> list[Op]:
    """Ops for duplicate records promoted after their original was deleted."""
    return [
        Op(
            uri=r["uri"],
            did=r["did"],
            collection=collection,
            rkey=r["uri"].rsplit("/", 1)[1],
            rev=r["rev"],
            cid=r["cid"],
            record=decode(r["json"].encode()),
            json=r["json"],
            indexed_at=r["indexedAt"],
        )
        for r in rows
    ]
