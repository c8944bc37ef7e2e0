"""Tables with one row per pair (a like's subject and creator, a follow's creator and subject).

Of the live records of one pair, the one with the lowest uri (its rkey is a TID, so the earliest
created) is in the table and counted; the others are in `duplicate_record`, pointing at it, and
counted nowhere. That holds whatever order the records arrive in: a record that sorts before
the current original takes its place (the counters do not move), and when the original is
deleted the lowest duplicate is promoted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from indexer import dirty
from indexer.aggregates import Deltas
from indexer.db import Connection, rows_json
from indexer.plugin import Op, bulk_insert, columns

# Live duplicates of deleted originals: their rev-guard rows are locked first, so a concurrent
# batch deleting or changing one of them either went first or waits for this one; then a new
# statement reads what is true now (a row re-checked under FOR UPDATE is fresh, but the rows
# joined to it would be read from the old snapshot). The guard statement already locked the
# duplicates it saw, in uri order with the batch's own records (indexer.guard); this takes
# those again at no cost, and any recorded since.
_LOCK_CANDIDATES = (
    "SELECT s.uri FROM record_state s WHERE s.live AND s.uri IN "
    '(SELECT uri FROM duplicate_record WHERE "duplicateOf" = ANY($1::varchar[])) '
    "ORDER BY s.uri FOR UPDATE"
)
_FRESH_CANDIDATES = (
    'SELECT d.uri, d."duplicateOf" AS original FROM duplicate_record d '
    "JOIN record_state s ON s.uri = d.uri "
    'WHERE d."duplicateOf" = ANY($1::varchar[]) AND s.live ORDER BY d.uri'
)
_RECORDS = (
    'SELECT uri, did, cid, json, rev, "indexedAt" FROM record '
    "WHERE uri = ANY($1::varchar[]) ORDER BY uri"
)
_ADD_DUPLICATES = (
    'INSERT INTO duplicate_record (uri, cid, "duplicateOf", "indexedAt") '
    "SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[]) "
    'ORDER BY 1 ON CONFLICT (uri) DO UPDATE SET "duplicateOf" = excluded."duplicateOf"'
)
_REPOINT = (
    'UPDATE duplicate_record d SET "duplicateOf" = m.new '
    "FROM unnest($1::varchar[], $2::varchar[]) AS m(old, new) "
    'WHERE d."duplicateOf" = m.old'
)
_DROP_DUPLICATES = "DELETE FROM duplicate_record WHERE uri = ANY($1::varchar[])"
_MAX_ROUNDS = 4


class StaleRow(Exception):
    """The table holds a row for this uri that the rev guard does not know as live."""

    sqlstate = "23505"  # a unique violation: dead-lettered by the batch's isolation


class ConcurrentPairChange(Exception):
    """Another batch kept changing the same pair; the whole batch is retried."""

    sqlstate = "40001"  # classified like a serialization failure


@dataclass(slots=True)
class Inserted:
    rows: list[Any]  # inserted, as RETURNING gave them
    conflicts: list[tuple[tuple[Any, ...], str]]  # (row, uri of its pair's original)
    retry: list[tuple[Any, ...]]  # conflicted with an original that has since gone


class UniqueTable:
    """The SQL of one pair-unique table. Rows start with uri and cid and end with indexedAt."""

    def __init__(
        self,
        table: str,
        cols: tuple[str, ...],
        types: tuple[str, ...],
        key: tuple[str, str],
        returning: tuple[str, ...],
    ) -> None:
        self.key_at = (cols.index(key[0]), cols.index(key[1]))
        back = ", ".join(f'"{c}"' for c in ("uri", "cid", "indexedAt", *returning))
        self._insert = bulk_insert(table, cols, types, f"ON CONFLICT DO NOTHING RETURNING {back}")
        # FOR SHARE: the original cannot be deleted or replaced by another batch until this one,
        # which is about to record duplicates of it, has committed.
        self._find = (
            f'SELECT uri, "{key[0]}" AS a, "{key[1]}" AS b FROM "{table}" '
            f'WHERE ("{key[0]}", "{key[1]}") IN '
            "(SELECT * FROM unnest($1::varchar[], $2::varchar[])) ORDER BY uri FOR SHARE"
        )
        self._by_uri = f'SELECT uri FROM "{table}" WHERE uri = ANY($1::varchar[])'
        self._delete = (
            f'DELETE FROM "{table}" WHERE uri = ANY($1::varchar[]) '
            f'RETURNING {back}, "{key[0]}" AS _ka, "{key[1]}" AS _kb'
        )

    async def insert(self, conn: Connection, rows: list[tuple[Any, ...]]) -> Inserted:
        """Insert rows; say which went in, which conflict with an original, which to retry."""
        if not rows:
            return Inserted([], [], [])
        inserted = await conn.fetch(self._insert, rows_json(rows))
        if len(inserted) == len(rows):
            return Inserted(list(inserted), [], [])
        done = {r["uri"] for r in inserted}
        left = [row for row in rows if row[0] not in done]
        ia, ib = self.key_at
        # a statement of its own: it sees originals committed while the insert waited on them
        found = await conn.fetch(self._find, [r[ia] for r in left], [r[ib] for r in left])
        original = {(f["a"], f["b"]): f["uri"] for f in found}
        result = Inserted(list(inserted), [], [])
        for row in left:
            first = original.get((row[ia], row[ib]))
            if first is None:
                result.retry.append(row)  # its original was deleted meanwhile: try again
            elif first != row[0]:
                result.conflicts.append((row, first))
        if result.retry:
            await self._check_not_stale(conn, result.retry)
        return result

    async def _check_not_stale(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """A row whose own uri is taken, by a row of another pair, would never go in."""
        taken = await conn.fetch(self._by_uri, [row[0] for row in rows])
        if taken:
            raise StaleRow(f"{taken[0]['uri']} is already indexed with another subject")

    async def remove(self, conn: Connection, uris: list[str]) -> list[Any]:
        """Delete rows by uri; return those actually deleted."""
        return list(await conn.fetch(self._delete, uris)) if uris else []

    async def remove_records(self, conn: Connection, uris: list[str]) -> list[Any]:
        """Delete records by uri from the table and from `duplicate_record`; return the table's
        rows actually deleted.

        A uri the table does not hold is a duplicate, or was one of the table's rows until a
        batch whose record sorts before it took its place and recorded it as a duplicate: the
        table's delete then waited for that batch, whose `duplicate_record` row committed after
        the delete's snapshot was taken. So duplicates are deleted by a statement of their own,
        after the table's, for the uris it did not find (none, when all were originals).
        """
        if not uris:
            return []
        gone = await self.remove(conn, uris)
        found = {r["uri"] for r in gone}
        if rest := [u for u in uris if u not in found]:
            await conn.execute(_DROP_DUPLICATES, rest)
        return gone


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

    async def added(self, conn: Connection, rows: list[Any], deltas: Deltas) -> None:
        """Rows now in the table: count them (subclasses may write more, such as feed items)."""
        for row in rows:
            self.count(row, 1, deltas)

    async def removed(self, conn: Connection, rows: list[Any], deltas: Deltas) -> None:
        """Rows gone from the table: uncount them."""
        for row in rows:
            self.count(row, -1, deltas)

    async def insert(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        rows = self.rows(ops)
        for _ in range(_MAX_ROUNDS):
            result = await self.table.insert(conn, rows)
            await self.added(conn, result.rows, deltas)
            rows = await self._settle(conn, result.conflicts, deltas) + result.retry
            if not rows:
                return
        raise ConcurrentPairChange(f"{self.collection}: a pair kept changing under this batch")

    async def update(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await self.delete(conn, ops, deltas)
        await self.insert(conn, ops, deltas)

    async def delete(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        uris = [op.uri for op in ops]
        gone = await self.table.remove_records(conn, uris)
        await self.removed(conn, gone, deltas)
        if gone:
            await self._promote(conn, {r["uri"]: (r["_ka"], r["_kb"]) for r in gone}, deltas)

    async def _promote(
        self, conn: Connection, originals: dict[str, tuple[Any, Any]], deltas: Deltas
    ) -> None:
        """The lowest live duplicate of the same pair of each deleted original takes its place."""
        keys = sorted(originals)
        # Lock first, then read what is now true. Nothing locked, nothing to read: a batch about
        # to add a duplicate of one of these originals holds its row FOR SHARE, so it committed
        # before this one deleted the row (and is seen here) or waits for this one's commit.
        if not await conn.fetch(_LOCK_CANDIDATES, keys):
            return
        cands = await conn.fetch(_FRESH_CANDIDATES, keys)
        if not cands:
            return
        records = await conn.fetch(_RECORDS, [c["uri"] for c in cands])
        ops = {o.uri: o for o in promoted_ops(self.collection, self.decode, records)}
        ia, ib = self.table.key_at
        heirs: dict[str, str] = {}
        for c in cands:  # uri order
            op = ops.get(c["uri"])
            if op is None or c["original"] in heirs:
                continue
            row = self.rows([op])[0]
            if (row[ia], row[ib]) == originals[c["original"]]:
                heirs[c["original"]] = c["uri"]
        if not heirs:
            return
        moves = sorted(heirs.items())
        await conn.execute(_DROP_DUPLICATES, [new for _, new in moves])
        await conn.execute(_REPOINT, [old for old, _ in moves], [new for _, new in moves])
        promoted = Deltas()  # the keys a promotion moves are marked for `reconcile --dirty`
        await self.insert(conn, [ops[new] for _, new in moves], promoted)
        await dirty.mark(conn, promoted)
        deltas.merge(promoted)

    async def _settle(
        self, conn: Connection, conflicts: list[tuple[tuple[Any, ...], str]], deltas: Deltas
    ) -> list[tuple[Any, ...]]:
        """Record duplicates; a row sorting before its pair's original replaces it.

        Returns the rows that take an original's place, to be inserted next.
        """
        by_original: defaultdict[str, list[tuple[Any, ...]]] = defaultdict(list)
        for row, original in conflicts:
            by_original[original].append(row)
        dups: list[tuple[Any, ...]] = []
        successor: dict[str, str] = {}
        winners = []
        for original, rows in sorted(by_original.items()):
            rows.sort(key=lambda r: r[0])
            head = rows[0]
            if head[0] < original:
                successor[original] = head[0]
                winners.append(head)
                rows = rows[1:]
            target = successor.get(original, original)
            dups += [(r[0], r[1], target, r[-1]) for r in rows]
        if successor:
            demoted = await self.table.remove(conn, sorted(successor))
            await self.removed(conn, demoted, deltas)
            dups += [(r["uri"], r["cid"], successor[r["uri"]], r["indexedAt"]) for r in demoted]
            moves = sorted(successor.items())
            await conn.execute(_REPOINT, [m[0] for m in moves], [m[1] for m in moves])
        if dups:
            await conn.execute(_ADD_DUPLICATES, *columns(sorted(dups), 4))
        return winners


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
