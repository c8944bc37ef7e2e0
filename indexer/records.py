"""Rows of the generic `record` table removed (the rev guard writes the live ones), and the
`actor` row of every author."""

from __future__ import annotations

from indexer.db import Connection, json_rows, rows_json

_REMOVE = "DELETE FROM record WHERE uri = ANY($1::varchar[])"
# The earliest event time seen wins, so the row does not depend on delivery order. New actors
# are inserted without locking existing rows (ON CONFLICT DO UPDATE would lock every one of
# them until commit, serializing replicas on shared authors). Dids already committed are left
# out before the insert: ON CONFLICT checks a key against every version of its row, so it would
# wait for any batch that updated that actor (its handle, its time) to commit; a plain read does
# not. The same read gives their time, and the statement returns only the dids that may need an
# earlier one: those it read with a later time, and those another batch inserted after its
# snapshot (ON CONFLICT skipped them). An actor's time only ever moves earlier, so a did read
# with a time no later than the batch's needs nothing. Those few go to the UPDATE, a statement
# of its own so that it sees rows another batch committed while this one waited on them, and
# locks only the rows whose time moves.
_ACTORS = (
    'WITH seen AS (SELECT n.did, n.t, a.did IS NULL AS new, a."indexedAt" AS was '
    f"FROM ({json_rows(('varchar', 'varchar'))}) AS n(did, t) "
    "LEFT JOIN actor a ON a.did = n.did), "
    'added AS (INSERT INTO actor (did, "indexedAt") SELECT did, t FROM seen WHERE new ORDER BY 1 '
    "ON CONFLICT (did) DO NOTHING RETURNING did) "
    "SELECT did, t FROM seen WHERE CASE WHEN new THEN did NOT IN (SELECT did FROM added) "
    "ELSE t < was END ORDER BY 1"
)
_EARLIER_ACTORS = (
    'UPDATE actor a SET "indexedAt" = b.t '
    f"FROM ({json_rows(('varchar', 'varchar'))}) AS b(did, t) "
    'WHERE a.did = b.did AND b.t < a."indexedAt"'
)


async def remove_records(conn: Connection, uris: list[str]) -> None:
    """Delete these records from `record` (the rev guard writes the live ones,
    `indexer.guard`)."""
    if uris:
        await conn.execute(_REMOVE, uris)


async def ensure_actors(conn: Connection, authors: dict[str, str]) -> None:
    """An `actor` row (did, indexedAt) for every author seen, even before its handle is known.

    Every DID of a batch gets one, whatever the rev guard decided, with the earliest event time
    seen, so the rows do not depend on the order in which events arrive.
    """
    if not authors:
        return
    rows = await conn.fetch(_ACTORS, rows_json(sorted(authors.items())))
    if rows:
        await conn.execute(_EARLIER_ACTORS, rows_json([(r["did"], r["t"]) for r in rows]))
