"""Transaction advisory locks on record uris, for records that depend on each other.

A record written by one transaction and read by another (a post and its replies, a post and its
gate) cannot be seen by the reader until it commits. Writers therefore lock the uri of the record
they share: exclusive to insert or delete it, shared to depend on it. All locks of a call are
taken in one statement, in key order, so two such statements never wait for each other in a
cycle; the pipeline takes those of a whole batch at once (see `Plugin.locks`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from indexer.db import Connection

# The first key of our two-key advisory locks: one lock space for record uris.
_NS: Final = 0x706F7374
_LOCK: Final = (
    f"SELECT CASE WHEN x THEN pg_advisory_xact_lock({_NS}, k) "
    f"ELSE pg_advisory_xact_lock_shared({_NS}, k) END "
    "FROM (SELECT hashtext(u) AS k, bool_or(x) AS x "
    "FROM unnest($1::varchar[], $2::bool[]) AS t(u, x) GROUP BY 1 ORDER BY 1) AS keys"
)


async def lock_uris(conn: Connection, keys: Iterable[tuple[str, bool]]) -> None:
    """Until commit: a lock on each uri, exclusive where any key asks for it, else shared."""
    pairs = list(keys)
    if pairs:
        await conn.execute(_LOCK, [u for u, _ in pairs], [x for _, x in pairs])
