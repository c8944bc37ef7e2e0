"""Account, identity and repo events, applied in their batch's transaction; the deletion fence.

Each of these events carries an order key, `<event time>#<seq>`, and only the newest per did
changes anything, so replays and any delivery order end in the same rows:

- `identity`: the did claims the handle its newest identity event names (lowercased; none
  clears it), recorded in `account_state.claim`; `actor.handle` follows the claims: each handle
  goes to its newest claimant, so a handle freed by a move or a deletion goes to the next
  newest claimant, whatever the order and batching of the events. A batch locks its dids'
  state rows first (in did order), then, after moving their claims, the handles they touch
  (advisory locks in key order), and gives each of those handles to its holder afresh: claims
  of one handle by concurrent batches serialize, and the unique index is never hit.
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

from asyncpg import Record

from indexer.constants import MAX_CID_CHARS, MAX_SHORT_CHARS
from indexer.db import Connection
from indexer.events import Account, Identity, Repo
from indexer.locks import HANDLES, lock_names
from indexer.normalize import clean_text
from indexer.plugin import columns

DELETED: Final = "deleted"

_NEWER_KEYS = (
    'INSERT INTO account_state (did, "statusKey") '
    "SELECT * FROM unnest($1::varchar[], $2::varchar[]) ORDER BY 1 "
    'ON CONFLICT (did) DO UPDATE SET "statusKey" = excluded."statusKey" '
    'WHERE account_state."statusKey" IS NULL OR account_state."statusKey" < excluded."statusKey" '
    "RETURNING did"
)
# One round trip: the newer status keys recorded, and the statuses of those dids set.
_STATUSES = (
    "WITH won AS (" + _NEWER_KEYS + '), moved AS (UPDATE actor a SET "upstreamStatus" = s.status '
    "FROM won JOIN unnest($1::varchar[], $3::varchar[]) AS s(did, status) ON s.did = won.did "
    "WHERE a.did = won.did) SELECT did FROM won"
)
# Every did of the batch's identity and account events gets its state row, then all of them are
# locked in did order, first thing: the rest of the account phase changes only locked rows.
_ENSURE_STATES = (
    "INSERT INTO account_state (did) SELECT * FROM unnest($1::varchar[]) ORDER BY 1 "
    "ON CONFLICT (did) DO NOTHING"
)
_LOCK_STATES = (
    'SELECT s.did, s."handleKey", s.claim, a.handle FROM account_state s '
    "LEFT JOIN actor a ON a.did = s.did WHERE s.did = ANY($1::varchar[]) "
    "ORDER BY s.did FOR UPDATE OF s"
)
_SET_CLAIMS = (
    'UPDATE account_state s SET "handleKey" = c.key, claim = c.claim '
    "FROM unnest($1::varchar[], $2::varchar[], $3::varchar[]) AS c(did, key, claim) "
    "WHERE s.did = c.did"
)
# Who holds each handle: its newest claimant (order key, then did), if any.
_WINNERS = (
    "SELECT DISTINCT ON (claim) claim, did FROM account_state "
    'WHERE claim = ANY($1::varchar[]) ORDER BY claim, "handleKey" DESC, did DESC'
)
# First every other actor gives the handle up, then its holder takes it (the unique index).
_CLEAR_HANDLES = (
    "UPDATE actor a SET handle = NULL FROM unnest($1::varchar[], $2::varchar[]) AS w(h, did) "
    "WHERE a.handle = w.h AND a.did IS DISTINCT FROM w.did"
)
_GIVE_HANDLES = (
    "UPDATE actor a SET handle = w.h FROM unnest($1::varchar[], $2::varchar[]) AS w(h, did) "
    "WHERE a.did = w.did AND a.handle IS DISTINCT FROM w.h"
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
    states = await _lock_states(conn, ops)
    applied |= await _handles(conn, ops, states)
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


async def _lock_states(conn: Connection, ops: list[AccountOp]) -> dict[str, Record]:
    """Lock the state rows of the identity and account events' dids (made if missing), in did
    order; each with its order key, its claimed handle and the handle its actor has now."""
    dids = sorted({op.did for op in ops if isinstance(op.event, (Identity, Account))})
    if not dids:
        return {}
    await conn.execute(_ENSURE_STATES, dids)
    return {r["did"]: r for r in await conn.fetch(_LOCK_STATES, dids)}


def _handle_of(op: AccountOp) -> str | None:
    if isinstance(op.event, Identity) and op.event.handle:
        return clean_text(op.event.handle.lower(), MAX_SHORT_CHARS)
    return None  # an identity without a handle, or a deletion: the handle is cleared


async def _handles(conn: Connection, ops: list[AccountOp], states: dict[str, Record]) -> set[int]:
    """Each did claims the handle of its newest identity event (a deletion claims none); a
    handle goes to its newest claimant. Only claims move here; then every handle they touch
    (claimed before or now, or held now) is given to its holder afresh, under its lock."""
    claims = [
        op
        for op in ops
        if isinstance(op.event, Identity)
        or (isinstance(op.event, Account) and op.event.status == DELETED)
    ]
    won = {
        did: op
        for did, op in _newest(claims).items()
        if states[did]["handleKey"] is None or op.key > states[did]["handleKey"]
    }
    if not won:
        return set()
    rows = sorted((did, op.key, _handle_of(op)) for did, op in won.items())
    await conn.execute(_SET_CLAIMS, *columns(rows, 3))
    touched = {states[did]["claim"] for did in won} | {states[did]["handle"] for did in won}
    touched |= {claim for _, _, claim in rows}
    handles = sorted(h for h in touched if h)
    if handles:
        await lock_names(conn, [(h, True) for h in handles], HANDLES)
        winners = {r["claim"]: r["did"] for r in await conn.fetch(_WINNERS, handles)}
        holders = [winners.get(h) for h in handles]
        await conn.execute(_CLEAR_HANDLES, handles, holders)
        await conn.execute(_GIVE_HANDLES, handles, holders)
    return {id(op) for op in won.values()}


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
