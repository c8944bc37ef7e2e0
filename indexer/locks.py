"""Transaction advisory locks on record uris, for records that depend on each other.

A record written by one transaction and read by another (a post and its replies, a post and its
gate) cannot be seen by the reader until it commits. Writers therefore lock the uri of the record
they share: exclusive to insert or delete it, shared to depend on it. Whoever applies changes
(the pipeline for a batch, account deletion for a chunk) takes the locks of all of them in one
statement, in key order, before any plugin writes (`lock_changes`), so two transactions never
wait for each other in a cycle; the plugins themselves take none (see `Locking`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

from indexer.db import Connection
from indexer.plugin import Locking, Plugin

if TYPE_CHECKING:
    from indexer.guard import Change

# The first key of our two-key advisory locks: one lock space per kind of name.
RECORDS: Final = 0x706F7374  # record uris
HANDLES: Final = 0x1DE8_0002  # handles (indexer.accounts)
_LOCK: Final = (
    "SELECT CASE WHEN x THEN pg_advisory_xact_lock($3, k) "
    "ELSE pg_advisory_xact_lock_shared($3, k) END "
    "FROM (SELECT hashtext(u) AS k, bool_or(x) AS x "
    "FROM unnest($1::varchar[], $2::bool[]) AS t(u, x) GROUP BY 1 ORDER BY 1) AS keys"
)


async def lock_names(
    conn: Connection, keys: Iterable[tuple[str, bool]], space: int = RECORDS
) -> None:
    """Until commit, in one statement and key order: a lock on each name of `space`,
    exclusive where any key asks for it, else shared."""
    pairs = list(keys)
    if pairs:
        await conn.execute(_LOCK, [u for u, _ in pairs], [x for _, x in pairs], space)


async def lock_changes(
    conn: Connection, plugins: Mapping[str, Plugin], changes: Iterable[Change]
) -> None:
    """Until commit: the locks every change needs (`Locking` plugins), in one statement."""
    locking: dict[str, Locking | None] = {}
    keys: list[tuple[str, bool]] = []
    for change in changes:
        collection = change.op.collection
        if collection not in locking:
            plugin = plugins.get(collection)
            locking[collection] = plugin if isinstance(plugin, Locking) else None
        if (owner := locking[collection]) is not None:
            keys.extend(owner.locks(change.op, change.kind))
    await lock_names(conn, keys)
