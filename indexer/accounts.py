"""Account, identity and repo events, applied in their batch's transaction; the deletion fence.

Each of these events carries an order key, `<event time>#<seq>`, and only the newest per did
changes anything, so replays and any delivery order end in the same rows:

- `identity`: `actor.handle` (lowercased; null clears it). A handle held by another actor is
  taken from it only if this event is newer than the one that gave it that handle; otherwise
  this actor's handle becomes null. Claims of one handle by concurrent batches serialize on a
  transaction-level advisory lock per handle (the unique index would otherwise refuse one);
  the holder loses the handle only if it still has it when the claim commits (it may have
  moved to another handle meanwhile, under that handle's lock, in another batch).
- `account`: `actor."upstreamStatus"`, as the AppView records it: null when active, else the
  status (`takendown`, `suspended`, `deactivated`, ...). Rows are kept.
- `account` with status `deleted`: status `deleted`, handle cleared, and the fence
  `account_fence(did, "deletedAt", pending)`. The account's records are removed afterwards, in
  bounded chunks, by `indexer.deletion`; the fence says the deletion is pending until then.
- `repo`: `actor_sync("commitCid", "repoRev")`, newest rev wins.

The fence (guarantee 3): `fences()` gives the pipeline, for the dids of a batch, the time of
their deletion; a record event not newer than it is applied as a delete at its rev, so a late,
replayed or reordered event never brings a record or a count back, and the rev guard still ends
in the same state whatever the order. A batch that read "no fence" while a deletion was being
committed is waited for by the deletion (see `indexer.deletion`), which is why `fences()` makes
sure its transaction has an id before it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from indexer.constants import MAX_CID_CHARS, MAX_SHORT_CHARS
from indexer.db import Connection
from indexer.events import Account, Identity, Repo
from indexer.normalize import clean_text
from indexer.plugin import columns

DELETED: Final = "deleted"
_HANDLE_LOCK: Final = 0x1DE8_0002  # pg_advisory_xact_lock(namespace, hashtext(handle))

_NEWER_HANDLES = (
    'INSERT INTO account_state (did, "handleKey") '
    "SELECT * FROM unnest($1::varchar[], $2::varchar[]) ORDER BY 1 "
    'ON CONFLICT (did) DO UPDATE SET "handleKey" = excluded."handleKey" '
    'WHERE account_state."handleKey" IS NULL OR account_state."handleKey" < excluded."handleKey" '
    "RETURNING did"
)
_HANDLE_KEYS = (
    'SELECT did, "handleKey" FROM account_state WHERE did = ANY($1::varchar[]) '
    "ORDER BY did FOR UPDATE"
)
# One round trip: the newer status keys recorded, and the statuses of those dids set.
_STATUSES = (
    "WITH won AS ("
    + _NEWER_HANDLES.replace('"handleKey"', '"statusKey"')
    + '), moved AS (UPDATE actor a SET "upstreamStatus" = s.status '
    "FROM won JOIN unnest($1::varchar[], $3::varchar[]) AS s(did, status) ON s.did = won.did "
    "WHERE a.did = won.did) SELECT did FROM won"
)
_HOLDER = (
    'SELECT a.did, s."handleKey" AS key FROM actor a LEFT JOIN account_state s ON s.did = a.did '
    "WHERE a.handle = $1 AND a.did <> $2"
)
_SET_HANDLE = "UPDATE actor SET handle = $2 WHERE did = $1"
# Only while the holder still has it: the holder may move to another handle in a concurrent
# batch (under that handle's lock, not this one's); its new handle must survive this clear.
_TAKE_HANDLE = "UPDATE actor SET handle = NULL WHERE did = $1 AND handle = $2"
_LOCK_HANDLES = (  # in lock-key order, so concurrent batches cannot deadlock on them
    "SELECT pg_advisory_xact_lock($1, k) "
    "FROM (SELECT DISTINCT hashtext(h) AS k FROM unnest($2::varchar[]) AS h ORDER BY 1) AS c"
)
_FENCE = (
    'INSERT INTO account_fence (did, "deletedAt", pending) '
    "SELECT d, t, true FROM unnest($1::varchar[], $2::varchar[]) AS f(d, t) ORDER BY 1 "
    'ON CONFLICT (did) DO UPDATE SET "deletedAt" = excluded."deletedAt", pending = true '
    'WHERE account_fence."deletedAt" < excluded."deletedAt" RETURNING did'
)
_REPO = (
    'INSERT INTO actor_sync (did, "commitCid", "repoRev") '
    "SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[]) ORDER BY 1 "
    'ON CONFLICT (did) DO UPDATE SET "commitCid" = excluded."commitCid", '
    '"repoRev" = excluded."repoRev" '
    'WHERE actor_sync."repoRev" IS NULL OR actor_sync."repoRev" < excluded."repoRev" '
    "RETURNING did"
)
_FENCES = 'SELECT did, "deletedAt" FROM indexer_account_fences($1::varchar[])'


@dataclass(slots=True)
class AccountOp:
    """An identity, account or repo event with its normalized time and order key."""

    event: Identity | Account | Repo
    time: str
    key: str

    @property
    def did(self) -> str:
        return self.event.did


def order_key(time: str, seq: int) -> str:
    """Sorts as the events happened: by normalized event time, then by seq (-1 for backfill)."""
    return f"{time}#{max(seq, -1) + 1:020d}"


def status_of(event: Account) -> str | None:
    """`upstreamStatus` as the AppView records it: null when active, else the status."""
    if event.status == DELETED:
        return DELETED
    if event.active:
        return None
    # the lexicon requires a status with active=false; without one, take the mildest
    return clean_text(event.status or "deactivated", MAX_SHORT_CHARS)


async def apply_account_ops(conn: Connection, ops: list[AccountOp]) -> set[int]:
    """Apply the events; return the ids of the ops that changed something.

    Every did of `ops` must have its `actor` row already: the pipeline makes them first, for
    the whole batch, so that every transaction locks actors before anything else.
    """
    if not ops:
        return set()
    applied: set[int] = set()
    applied |= await _handles(conn, ops)
    applied |= await _statuses(conn, ops)
    applied |= await _fences(conn, ops)
    applied |= await _repos(conn, ops)
    return applied


async def fences(conn: Connection, dids: list[str]) -> dict[str, str]:
    """The deletion time of each fenced did among `dids`, in one round trip.

    The transaction gets an id before the read (inside `indexer_account_fences`, migration 003):
    a deletion committed after this read then waits for this transaction to end before it looks
    for the account's records (see `indexer.deletion`).
    """
    if not dids:
        return {}
    return {r["did"]: r["deletedAt"] for r in await conn.fetch(_FENCES, dids)}


def _newest(ops: list[AccountOp]) -> dict[str, AccountOp]:
    best: dict[str, AccountOp] = {}
    for op in ops:
        if op.did not in best or op.key > best[op.did].key:
            best[op.did] = op
    return best


async def _winners(conn: Connection, sql: str, newest: dict[str, AccountOp]) -> set[str]:
    """Record each did's order key where it is newer; the dids whose key moved."""
    rows = sorted((did, op.key) for did, op in newest.items())
    return {r["did"] for r in await conn.fetch(sql, *columns(rows, 2))}


def _handle_of(op: AccountOp) -> str | None:
    if isinstance(op.event, Identity) and op.event.handle:
        return clean_text(op.event.handle.lower(), MAX_SHORT_CHARS)
    return None  # an identity without a handle, or a deletion: the handle is cleared


async def _handles(conn: Connection, ops: list[AccountOp]) -> set[int]:
    claims = [
        op
        for op in ops
        if isinstance(op.event, Identity)
        or (isinstance(op.event, Account) and op.event.status == DELETED)
    ]
    newest = _newest(claims)
    if not newest:
        return set()
    # The key that gave each did of the batch its current handle: until its own op below is
    # applied, a holder in this batch holds its handle by its key from before the batch.
    gave: dict[str, str | None] = dict.fromkeys(newest)
    claimed = sorted({h for op in newest.values() if (h := _handle_of(op))})
    if claimed:
        await conn.execute(_LOCK_HANDLES, _HANDLE_LOCK, claimed)
        rows = await conn.fetch(_HANDLE_KEYS, sorted(newest))
        gave |= {r["did"]: r["handleKey"] for r in rows}
    won = await _winners(conn, _NEWER_HANDLES, newest)
    applied = set()
    for did, op in sorted(newest.items(), key=lambda r: r[1].key):
        if did not in won:
            continue
        handle: str | None = _handle_of(op)
        if handle is not None:
            holder = await conn.fetchrow(_HOLDER, handle, did)
            key = None if holder is None else gave.get(holder["did"], holder["key"])
            if key is not None and key > op.key:
                handle = None  # a newer event gave this handle to another account
            elif holder is not None:
                await conn.execute(_TAKE_HANDLE, holder["did"], handle)
        await conn.execute(_SET_HANDLE, did, handle)
        gave[did] = op.key
        applied.add(id(op))
    return applied


async def _statuses(conn: Connection, ops: list[AccountOp]) -> set[int]:
    newest = _newest([op for op in ops if isinstance(op.event, Account)])
    if not newest:
        return set()
    rows = [
        (d, op.key, status_of(op.event))
        for d, op in sorted(newest.items())
        if isinstance(op.event, Account)
    ]
    won = {r["did"] for r in await conn.fetch(_STATUSES, *columns(rows, 3))}
    return {id(op) for d, op in newest.items() if d in won}


async def _fences(conn: Connection, ops: list[AccountOp]) -> set[int]:
    deletions = [op for op in ops if isinstance(op.event, Account) and op.event.status == DELETED]
    latest: dict[str, AccountOp] = {}
    for op in deletions:  # the fence is the newest deletion time, whatever the status since
        if op.did not in latest or op.time > latest[op.did].time:
            latest[op.did] = op
    if not latest:
        return set()
    rows = sorted((d, op.time) for d, op in latest.items())
    moved = {r["did"] for r in await conn.fetch(_FENCE, *columns(rows, 2))}
    return {id(op) for d, op in latest.items() if d in moved}


async def _repos(conn: Connection, ops: list[AccountOp]) -> set[int]:
    newest: dict[str, AccountOp] = {}
    for op in ops:
        if isinstance(op.event, Repo) and op.event.rev:
            seen = newest.get(op.did)
            if seen is None or (isinstance(seen.event, Repo) and op.event.rev > seen.event.rev):
                newest[op.did] = op
    rows = []
    for did, op in sorted(newest.items()):
        assert isinstance(op.event, Repo)
        cid = clean_text(op.event.commit, MAX_CID_CHARS)
        rows.append((did, cid, clean_text(op.event.rev, 64)))
    if not rows:
        return set()
    moved = {r["did"] for r in await conn.fetch(_REPO, *columns(rows, 3))}
    return {id(op) for d, op in newest.items() if d in moved}
