"""Post columns that depend on other records: `invalidReplyRoot` and `hasThreadGate`/`hasPostGate`.

Each is a function of the live records only, so any order of events ends in the same values:
- `invalidReplyRoot` is true when the parent post is indexed and the reply's root is not the
  parent's root (the parent's `replyRoot`, or the parent itself when it is not a reply); NULL
  while the parent is unknown or valid. It is set when the reply arrives and when its parent
  arrives, and cleared when the parent goes. (The AppView computes it once, when the reply
  arrives: true also for an unknown parent or a parent itself flagged, so its value depends on
  arrival order. Its readers do not read the column; only its indexer does, for that chain.)
- `hasThreadGate` / `hasPostGate` are true while the post's gate is indexed, else NULL; set when
  the post or the gate arrives, cleared when the gate goes (readers test them for truth).

A reply and its parent (a post and its gate) may be written by two transactions at once, each
unable to see the other's uncommitted row. So before reading, each takes a transaction advisory
lock keyed by the uri of the post they share: exclusive when it inserts or deletes that post,
shared when it only depends on it (a reply on its parent, a gate on its post). The second to
lock waits for the first to commit, and its next statement sees the first's row; replies to
one hot post, holding shared locks, do not wait for each other.

Lock order: the caller of the plugins (the pipeline for a batch, account deletion for a chunk)
takes the locks of all its changes (`PostPlugin.locks`, `GatePlugin.locks`) in one statement, in
key order, before any plugin touches a row (`indexer.locks.lock_changes`); the plugins take none.
A delete that held a post's row while waiting for its lock could deadlock with the lock's
holder, about to re-flag that row as a reply of its new post; a batch taking its delete locks
and its insert locks in two statements could deadlock with one doing the crossed deletes and
replies.
"""

from __future__ import annotations

from indexer.db import Connection

# Two statements, each driven by one index (`post_pkey`, `post_replyparent_idx`), the parent
# and the gates read per row by key in scalar subqueries: a join of `post` with itself, or an
# EXISTS, let the planner pick a plan that scans a whole table, which grows with it. Rows already
# right are not written.
_PARENT_ROOT = 'SELECT coalesce(p."replyRoot", p.uri) FROM post p WHERE p.uri = c."replyParent"'
_INVALID = (  # the parent's root is NULL only when the parent is unknown
    f'CASE WHEN ({_PARENT_ROOT}) IS NOT NULL AND c."replyRoot" IS DISTINCT FROM ({_PARENT_ROOT}) '
    "THEN true END"
)
_HAS = '(SELECT true FROM {} g WHERE g."postUri" = c.uri)'  # true, or NULL when there is none
_FLAGS = f"{_INVALID}, {_HAS.format('thread_gate')}, {_HAS.format('post_gate')}"
# The new posts ($1): `invalidReplyRoot` from their parent, and their gate flags (this
# transaction holds their locks).
_RECHECK_NEW = (
    f'UPDATE post c SET ("invalidReplyRoot", "hasThreadGate", "hasPostGate") = ({_FLAGS}) '
    "WHERE c.uri = ANY($1::varchar[]) AND "
    f'(c."invalidReplyRoot", c."hasThreadGate", c."hasPostGate") IS DISTINCT FROM ({_FLAGS})'
)
# ... and the replies to them: `invalidReplyRoot` only (a reply's gate may be changing in
# another transaction: its gate flags are left as the row has them now).
_RECHECK_REPLIES = (
    f'UPDATE post c SET "invalidReplyRoot" = {_INVALID} '
    'WHERE c."replyParent" = ANY($1::varchar[]) '
    f'AND c."invalidReplyRoot" IS DISTINCT FROM {_INVALID}'
)
_ORPHAN_REPLIES = (
    'UPDATE post SET "invalidReplyRoot" = NULL '
    'WHERE "replyParent" = ANY($1::varchar[]) AND "invalidReplyRoot" IS NOT NULL'
)


async def posts_added(conn: Connection, uris: list[str]) -> None:
    """New posts: their flags and their replies' flags (the caller holds their locks)."""
    if uris:
        await conn.execute(_RECHECK_NEW, uris)
        await conn.execute(_RECHECK_REPLIES, uris)


async def posts_removed(conn: Connection, uris: list[str]) -> None:
    """Posts gone: their replies' parent is unknown again (the caller holds their locks)."""
    if uris:
        await conn.execute(_ORPHAN_REPLIES, uris)


async def set_gate(conn: Connection, column: str, post_uris: list[str], present: bool) -> None:
    """A gate of these posts arrived (present) or went away; `column` is the post's flag (the
    caller holds shared locks on the posts)."""
    if not post_uris:
        return
    value = "true" if present else "NULL"
    await conn.execute(
        f'UPDATE post SET "{column}" = {value} WHERE uri = ANY($1::varchar[]) '
        f'AND "{column}" IS DISTINCT FROM {value}',
        post_uris,
    )
