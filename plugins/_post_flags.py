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

_INVALID = (
    'CASE WHEN p.uri IS NOT NULL AND c."replyRoot" IS DISTINCT FROM coalesce(p."replyRoot", p.uri) '
    "THEN true END"
)
_HAS = 'CASE WHEN EXISTS (SELECT 1 FROM {} g WHERE g."postUri" = c.uri) THEN true END'
# The new posts ($1) and the replies to them, in one statement (a new post may be both a reply
# and gated): `invalidReplyRoot` of all of them, from their parent; the gate flags of the new
# posts only, whose locks this transaction holds (a reply's gate may be changing in another
# transaction: its flags are left as the row has them now). Rows already right are not written.
_RECHECK = (
    'UPDATE post t SET "invalidReplyRoot" = f.invalid, '
    '"hasThreadGate" = CASE WHEN f.own THEN f.thread ELSE t."hasThreadGate" END, '
    '"hasPostGate" = CASE WHEN f.own THEN f.post ELSE t."hasPostGate" END '
    "FROM (SELECT c.uri, c.uri = ANY($1::varchar[]), "
    f"{_INVALID}, {_HAS.format('thread_gate')}, {_HAS.format('post_gate')} "
    "FROM (SELECT uri FROM unnest($1::varchar[]) AS u(uri) "
    'UNION SELECT uri FROM post WHERE "replyParent" = ANY($1::varchar[])) AS k '
    'JOIN post c ON c.uri = k.uri LEFT JOIN post p ON p.uri = c."replyParent"'
    ") AS f(uri, own, invalid, thread, post) "
    'WHERE t.uri = f.uri AND (t."invalidReplyRoot" IS DISTINCT FROM f.invalid OR f.own AND '
    '(t."hasThreadGate", t."hasPostGate") IS DISTINCT FROM (f.thread, f.post))'
)
_ORPHAN_REPLIES = (
    'UPDATE post SET "invalidReplyRoot" = NULL '
    'WHERE "replyParent" = ANY($1::varchar[]) AND "invalidReplyRoot" IS NOT NULL'
)


async def posts_added(conn: Connection, uris: list[str]) -> None:
    """New posts: their flags and their replies' flags (the caller holds their locks)."""
    if uris:
        await conn.execute(_RECHECK, uris)


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
