"""Tables with one row per (subject, creator): later records of the same pair are duplicates.

A duplicate is recorded in `duplicate_record`, counted nowhere, and promoted to the table (and
counted) when the record it duplicates is deleted.
"""

from __future__ import annotations

from typing import Any

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
        returning: str,
    ) -> None:
        self._width = len(cols)
        self._key_at = (cols.index(key[0]), cols.index(key[1]))
        self._insert = unnest_insert(
            table, cols, types, f'ON CONFLICT DO NOTHING RETURNING uri, "{returning}"'
        )
        self._find = (
            f'SELECT uri, "{key[0]}" AS a, "{key[1]}" AS b FROM "{table}" '
            f'WHERE ("{key[0]}", "{key[1]}") IN '
            "(SELECT * FROM unnest($1::varchar[], $2::varchar[]))"
        )
        self._delete = (
            f'DELETE FROM "{table}" WHERE uri = ANY($1::varchar[]) RETURNING uri, "{returning}"'
        )

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


def promoted_ops(collection: str, decode: Any, rows: list[Any]) -> list[Op]:
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
