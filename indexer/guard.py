"""The rev guard: per record, only an op with a newer rev than any seen before changes anything.

`record_state` holds one row per record uri ever seen: its highest rev and whether it is live
(a delete leaves a tombstone, `live = false`). The row is the one lock point per record, so two
replicas applying ops on one record serialize on it, and any delivery order ends in the state
of the highest rev. The generic `record` table is written in the same statement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from indexer.db import Connection, rows_json
from indexer.plugin import Kind, Op
from indexer.records import remove_records

if TYPE_CHECKING:
    from indexer.pipeline import Item


_COLUMNS = (
    ("uri", "varchar"), ("did", "varchar"), ("rev", "varchar"), ("live", "bool"),
    ("t", "varchar"), ("cid", "varchar"), ("json", "text"), ("gone", "bool"),
)  # fmt: skip
# The guard and the `record` rows it lets through, in one round trip: guard rows are inserted
# or, where the op's rev is newer, updated, in uri order (the one lock order of every
# transaction on them). ON CONFLICT DO UPDATE locks every conflicting row, updated or not, and
# reads its latest committed version, so a concurrent batch's op on the same record is waited
# for and compared with, as SELECT ... FOR UPDATE would. RETURNING gives the rows whose state
# changed: fresh ones (`liveBefore` NULL) and newer revs (`liveBefore` the state replaced).
# Live ones are upserted into `record` (ON CONFLICT sees rows committed after the statement's
# snapshot too). Records gone are deleted from `record` by the next statement: a DELETE here
# would scan with the snapshot taken before the guard waited, and miss a row that the batch
# it waited for had just committed.
# The duplicates (`duplicate_record`) of the records this batch deletes or updates (`gone`: it
# may remove them from their typed table) are locked in the same pass, in the same uri order,
# by a row of rev '' that never wins: a batch removing an original later locks its duplicates
# to promote one (plugins/_unique.py), and taking those locks only then, out of uri order,
# deadlocked with a batch whose guard held one of them and waited for a uri the first held.
# (Their rows exist: `record_state` rows are never deleted. OFFSET 0 keeps the lookup one index
# probe per removed record; joined, the planner may scan the whole of `duplicate_record`.)
_APPLY = (
    "WITH input AS ("
    f"SELECT {', '.join(f'(r->>{i})::{t} AS {n}' for i, (n, t) in enumerate(_COLUMNS))} "
    "FROM jsonb_array_elements($1::jsonb) AS r), "
    'won AS (INSERT INTO record_state AS s (uri, did, rev, live, "updatedAt") '
    "SELECT uri, did, rev, live, t FROM input "
    "UNION ALL SELECT d.uri, '', '', false, '' FROM input i CROSS JOIN LATERAL "
    '(SELECT x.uri FROM duplicate_record x WHERE x."duplicateOf" = i.uri OFFSET 0) d '
    "WHERE i.gone AND d.uri NOT IN (SELECT uri FROM input) "
    "AND EXISTS (SELECT 1 FROM record_state e WHERE e.uri = d.uri) "
    "ORDER BY uri "
    "ON CONFLICT (uri) DO UPDATE SET rev = excluded.rev, live = excluded.live, "
    '"updatedAt" = excluded."updatedAt", "liveBefore" = s.live WHERE s.rev < excluded.rev '
    'RETURNING uri, live, coalesce("liveBefore", false) AS "wasLive"), '
    "written AS ("
    'INSERT INTO record (uri, cid, did, json, rev, "indexedAt") '
    "SELECT i.uri, i.cid, i.did, i.json, i.rev, i.t FROM input i JOIN won w ON w.uri = i.uri "
    "WHERE w.live ORDER BY 1 "
    "ON CONFLICT (uri) DO UPDATE SET cid = excluded.cid, json = excluded.json, "
    'rev = excluded.rev, "indexedAt" = excluded."indexedAt") '
    'SELECT uri, "wasLive" FROM won'
)


@dataclass(slots=True)
class Change:
    """A record whose visible state changes: it became live, changed while live, or went away."""

    op: Op
    kind: Kind


async def apply_guard(conn: Connection, items: list[Item]) -> list[Change]:
    """Record the winning revs, write `record`, and return the changes to apply, in uri order.

    `items` hold at most one op per uri, sorted by uri.
    """
    if not items:
        return []
    rows = [
        (
            i.op.uri,
            i.op.did,
            i.op.rev,
            not i.delete,
            i.op.indexed_at,
            i.op.cid,
            i.op.json,
            i.delete or i.operation == "update",
        )
        for i in items
    ]
    won = {r["uri"]: r["wasLive"] for r in await conn.fetch(_APPLY, rows_json(rows))}
    changes: list[Change] = []
    for item in items:
        was_live = won.get(item.op.uri)
        if was_live is not None and (kind := _kind(was_live=was_live, live=not item.delete)):
            changes.append(Change(item.op, kind))
    await remove_records(conn, [c.op.uri for c in changes if c.kind == "delete"])
    return changes


def _kind(*, was_live: bool, live: bool) -> Kind | None:
    if was_live:
        return "update" if live else "delete"
    return "insert" if live else None
