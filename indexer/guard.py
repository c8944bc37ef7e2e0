"""The rev guard: per record, only an op with a newer rev than any seen before changes anything.

`record_state` holds one row per record uri ever seen: its highest rev and whether it is live
(a delete leaves a tombstone, `live = false`). The row is the one lock point per record, so two
replicas applying ops on one record serialize on it, and any delivery order ends in the state
of the highest rev.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from indexer.db import Connection, json_rows, rows_json
from indexer.plugin import Kind, Op, columns

if TYPE_CHECKING:
    from indexer.pipeline import Item


_INSERT = (
    'INSERT INTO record_state (uri, did, rev, live, "updatedAt") '
    f"{json_rows(('varchar', 'varchar', 'varchar', 'bool', 'varchar'))} "
    "ORDER BY 1 ON CONFLICT (uri) DO NOTHING RETURNING uri"
)
_LOCK = (
    "SELECT uri, rev, live FROM record_state WHERE uri = ANY($1::varchar[]) ORDER BY uri FOR UPDATE"
)
_UPDATE = (
    'UPDATE record_state s SET rev = u.rev, live = u.live, "updatedAt" = u.t '
    "FROM unnest($1::varchar[], $2::varchar[], $3::bool[], $4::varchar[]) AS u(uri, rev, live, t) "
    "WHERE s.uri = u.uri"
)


@dataclass(slots=True)
class Change:
    """A record whose visible state changes: it became live, changed while live, or went away."""

    op: Op
    kind: Kind


async def apply_guard(conn: Connection, items: list[Item]) -> list[Change]:
    """Record the winning revs and return the changes to apply, in uri order.

    `items` hold at most one op per uri, sorted by uri.
    """
    if not items:
        return []
    rows = [(i.op.uri, i.op.did, i.op.rev, not i.delete, i.op.indexed_at) for i in items]
    fresh = {r["uri"] for r in await conn.fetch(_INSERT, rows_json(rows))}
    known = [i for i in items if i.op.uri not in fresh]
    current = {}
    if known:
        current = {r["uri"]: r for r in await conn.fetch(_LOCK, [i.op.uri for i in known])}
    changes: list[Change] = []
    newer: list[tuple[str, str, bool, str]] = []
    for item in items:
        live = not item.delete
        if item.op.uri in fresh:
            if live:
                changes.append(Change(item.op, "insert"))
            continue
        state = current[item.op.uri]
        if item.op.rev <= state["rev"]:
            continue
        newer.append((item.op.uri, item.op.rev, live, item.op.indexed_at))
        kind = _kind(was_live=state["live"], live=live)
        if kind is not None:
            changes.append(Change(item.op, kind))
    if newer:
        await conn.execute(_UPDATE, *columns(newer, 4))
    return changes


def _kind(*, was_live: bool, live: bool) -> Kind | None:
    if was_live:
        return "update" if live else "delete"
    return "insert" if live else None
