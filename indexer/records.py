"""Rows of the generic `record` table removed (the rev guard writes the live ones), and the
`actor` row of every author."""

from __future__ import annotations

from indexer.db import Connection, json_rows, rows_json

_REMOVE = "DELETE FROM record WHERE uri = ANY($1::varchar[])"
# The earliest event time seen wins, so the row does not depend on delivery order. New actors
# are inserted without locking existing rows (ON CONFLICT DO UPDATE would lock every one of
# them until commit, serializing replicas on shared authors). The UPDATE is its own statement so
# that it sees rows another batch committed while this one waited on them, and it locks only
# the rare row whose time moves earlier. Dids already committed are left out before the insert:
# ON CONFLICT checks a key against every version of its row, so it would wait for any batch
# that updated that actor (its handle, its time) to commit; a plain read does not.
_NEW_ACTORS = (
    'INSERT INTO actor (did, "indexedAt") '
    f"SELECT * FROM ({json_rows(('varchar', 'varchar'))}) AS n(did, t) "
    "WHERE NOT EXISTS (SELECT 1 FROM actor a WHERE a.did = n.did) ORDER BY 1 "
    "ON CONFLICT (did) DO NOTHING RETURNING did"
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
    added = {r["did"] for r in await conn.fetch(_NEW_ACTORS, rows_json(sorted(authors.items())))}
    known = sorted((d, t) for d, t in authors.items() if d not in added)
    if known:
        await conn.execute(_EARLIER_ACTORS, rows_json(known))
