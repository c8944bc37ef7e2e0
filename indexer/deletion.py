"""Deleted accounts' records removed in bounded chunks, each its own short transaction.

The batch that carries an `account` event with status `deleted` only writes the fence
(`account_fence`, pending) and commits promptly, however big the account. Every replica runs
`AccountDeletions`, which finds pending fences and, per account:

1. takes a session advisory lock on the did (`pg_try_advisory_lock`), so one replica works on
   an account at a time; a replica that dies releases it with its connection;
2. waits for every transaction that was running when it started (their ids, from
   `pg_current_snapshot()`, until `pg_xact_status` says they ended). A batch that read "no
   fence" for this account did so in a transaction with an id (`accounts.fences`) that began
   before the fence committed, so once those are over, every record of the account indexed
   before the deletion is visible, and every later batch sees the fence and applies the
   account's old events as deletes. The set of records to remove can then only shrink;
3. walks the account's live records in uri order (`record_state (did, uri)`), not newer than
   the deletion, `chunk_size` at a time. A chunk locks their rev-guard rows (a concurrent op on
   one of them waits, or went first and is re-checked), tombstones them (`live = false`, the
   rev kept, so a replay changes nothing), deletes them from `record` and, through the plugins'
   own `delete`, from the typed tables, with the counter deltas the plugins compute (the other
   side's `followersCount`, the posts' `likeCount`, ...), marking the keys they move dirty for
   `indexer reconcile --dirty`. Each chunk commits on its own;
4. clears `pending` (unless a newer deletion moved the fence meanwhile).

Everything is restartable: a replica that dies mid-way leaves the fence pending; any replica
takes it up again at its next poll (and at start), walking from the first uri (the chunks
already done are tombstones now and are skipped). The live stream is never held up: chunks are
short, lock rows in the same order as batches (rev-guard rows by uri, then typed rows, then
counters sorted), and contention is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Final

from indexer import dirty
from indexer.aggregates import Deltas
from indexer.constants import ACCOUNT_DELETION_CHUNK, ACCOUNT_DELETION_POLL_S
from indexer.db import Connection, Database, is_contention, is_unavailable
from indexer.guard import Change
from indexer.locks import lock_changes
from indexer.plugin import Op, Plugin
from indexer.records import remove_records

log = logging.getLogger(__name__)

_LOCK: Final = 0x1DE8_0003  # session advisory lock (namespace, hashtext(did))
_MAX_ATTEMPTS: Final = 20

_PENDING = "SELECT did FROM account_fence WHERE pending ORDER BY did LIMIT 1000"
_FENCE = 'SELECT "deletedAt", pending FROM account_fence WHERE did = $1'
_LIVE = (
    "SELECT uri, rev FROM record_state "
    'WHERE did = $1 AND live AND "updatedAt" <= $2 AND uri > $3 '
    "ORDER BY uri LIMIT $4 FOR UPDATE"
)
_TOMBSTONE = "UPDATE record_state SET live = false WHERE uri = ANY($1::varchar[])"
_DONE = 'UPDATE account_fence SET pending = false WHERE did = $1 AND "deletedAt" = $2'
_RUNNING = (
    "SELECT count(*) FROM pg_snapshot_xip($1::text::pg_snapshot) AS x(id) "
    "WHERE pg_xact_status(x.id) = 'in progress'"
)


class AccountDeletions:
    """Finishes pending account deletions, chunk by chunk."""

    def __init__(
        self, db: Database, plugins: dict[str, Plugin], chunk_size: int = ACCOUNT_DELETION_CHUNK
    ) -> None:
        self._db = db
        self._plugins = plugins
        self._chunk_size = chunk_size
        self.records_deleted = 0

    async def run(self, done: asyncio.Event, poll_s: float = ACCOUNT_DELETION_POLL_S) -> None:
        """Every `poll_s` until `done`: take up pending deletions. Outages are waited out."""
        while not done.is_set():
            try:
                await self.run_pending(done)
            except Exception as exc:
                if not (is_unavailable(exc) or is_contention(exc)):
                    log.exception("account deletions stopped by an unexpected error")
                    raise
                log.warning("account deletions paused (%s); retrying", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), poll_s)

    async def run_pending(self, stop: asyncio.Event | None = None, *, wait: bool = False) -> int:
        """Run every pending deletion; with `wait`, also those another replica is running
        (waiting for it). Returns how many this call finished."""
        async with self._db.connection() as conn:
            dids = [r["did"] for r in await conn.fetch(_PENDING)]
        finished = 0
        for did in dids:
            if stop is not None and stop.is_set():
                break
            finished += await self.delete_account(did, stop, wait=wait)
        return finished

    async def delete_account(
        self, did: str, stop: asyncio.Event | None = None, *, wait: bool = False
    ) -> bool:
        """Remove what the account indexed before its deletion; True when this call finished
        it. The session lock goes with the connection's reset on release to the pool (asyncpg
        runs `pg_advisory_unlock_all()`), or with the connection if the process dies."""
        async with self._db.connection() as conn:
            if wait:
                await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", _LOCK, did)
                got = True
            else:
                got = await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))", _LOCK, did
                )
            if not got:
                return False  # another replica is on it
            fence = await conn.fetchrow(_FENCE, did)
            if fence is None or not fence["pending"]:
                return False
            deleted_at = fence["deletedAt"]
            await _wait_for_running(conn)
            after, removed = "", 0
            while stop is None or not stop.is_set():
                after, count = await self._chunk(conn, did, deleted_at, after)
                removed += count
                if count < self._chunk_size:
                    await conn.execute(_DONE, did, deleted_at)
                    log.info("account %s deleted: %d records removed", did, removed)
                    return True
            return False

    async def _chunk(
        self, conn: Connection, did: str, deleted_at: str, after: str
    ) -> tuple[str, int]:
        """One chunk in its own transaction, retried on contention; (last uri, records)."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                async with conn.transaction():
                    last, count = await self._delete_chunk(conn, did, deleted_at, after)
                self.records_deleted += count
                return last, count
            except Exception as exc:
                if not is_contention(exc) or attempt == _MAX_ATTEMPTS:
                    raise
                await asyncio.sleep(min(2.0, 0.02 * 2**attempt) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    async def _delete_chunk(
        self, conn: Connection, did: str, deleted_at: str, after: str
    ) -> tuple[str, int]:
        rows = await conn.fetch(_LIVE, did, deleted_at, after, self._chunk_size)
        if not rows:
            return after, 0
        uris = [r["uri"] for r in rows]
        await conn.execute(_TOMBSTONE, uris)
        changes = [Change(_delete_op(r["uri"], did, r["rev"], deleted_at), "delete") for r in rows]
        await remove_records(conn, uris)
        await lock_changes(conn, self._plugins, changes)
        deltas = Deltas()
        for collection in sorted({c.op.collection for c in changes}):
            plugin = self._plugins.get(collection)
            ops = [c.op for c in changes if c.op.collection == collection]
            if plugin is not None:  # else only `record` held it (no plugin indexes it now)
                await plugin.delete(conn, ops, deltas)
        await dirty.mark(conn, deltas)
        await deltas.apply(conn)
        return uris[-1], len(rows)


def _delete_op(uri: str, did: str, rev: str, time: str) -> Op:
    collection, rkey = uri.rsplit("/", 2)[1:]
    return Op(uri, did, collection, rkey, rev, "", None, "", time)


async def _wait_for_running(conn: Connection) -> None:
    """Wait until every transaction running now has ended."""
    snapshot = await conn.fetchval("SELECT pg_current_snapshot()::text")
    delay = 0.01
    while await conn.fetchval(_RUNNING, snapshot):
        await asyncio.sleep(delay)
        delay = min(0.5, delay * 2)
