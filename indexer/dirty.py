"""Counter keys marked for `indexer reconcile --dirty`: those an account deletion or a
duplicate promotion moved. Marking is idempotent and never blocks on other markers for long
(keys are inserted in sorted order, ON CONFLICT DO NOTHING)."""

from __future__ import annotations

from typing import Final

from indexer.aggregates import Deltas
from indexer.db import Connection

POST: Final = "post_agg"
PROFILE: Final = "profile_agg"
_MARK = (
    "INSERT INTO dirty_counter (kind, key) "
    "SELECT * FROM unnest($1::varchar[], $2::varchar[]) ORDER BY 1, 2 ON CONFLICT DO NOTHING"
)


async def mark(conn: Connection, deltas: Deltas) -> None:
    """Mark every key these deltas move."""
    posts, profiles = deltas.keys()
    if not posts and not profiles:
        return
    kinds = [POST] * len(posts) + [PROFILE] * len(profiles)
    await conn.execute(_MARK, kinds, posts + profiles)
