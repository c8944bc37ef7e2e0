"""A batch of stream entries -> decoded ops -> one transaction of bulk writes.

decode (no database) -> account events (identity, status, deletion fence, repo rev) -> fence
(record events of a deleted account not newer than its deletion become deletes) -> collapse per
record by rev -> rev guard and record table (one statement) -> plugins (deletes, then updates,
then inserts) -> counter deltas. One transaction per batch; a batch that fails on data is split
until the bad entries stand alone and go to the dead-letter stream.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from indexer.accounts import AccountOp, apply_account_ops, fences, order_key
from indexer.aggregates import Deltas
from indexer.constants import MAX_CID_CHARS, MAX_RECORD_JSON_BYTES
from indexer.db import Database, is_data_error
from indexer.events import (
    Account,
    Create,
    Delete,
    Envelope,
    Identity,
    Repo,
    Update,
    envelope_decoder,
)
from indexer.guard import Change, apply_guard
from indexer.locks import lock_changes
from indexer.normalize import clean_json_text, clean_text, normalize_datetime, repair_json
from indexer.plugin import Op, Plugin, outcome_of
from indexer.records import ensure_actors

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Entry:
    """One stream entry as read: where it came from, its raw `event` field, and how many times
    the group has delivered it (1 when read new; more when claimed after a failure)."""

    stream: str
    id: str
    raw: bytes | None
    deliveries: int = 1


@dataclass(slots=True)
class Item:
    """A decoded record operation waiting for the rev guard."""

    entry: Entry
    op: Op
    operation: str
    time: str
    fenced: bool = False  # its account was deleted after it: applied as a delete
    backfilled: bool = False  # seq -1: stamped when fetched, so it says nothing of the lag

    @property
    def delete(self) -> bool:
        return self.operation == "delete" or self.fenced

    @property
    def label(self) -> tuple[str, str]:
        return self.op.collection, self.op.uri


@dataclass(slots=True)
class AccountItem:
    """A decoded identity, account or repo event."""

    entry: Entry
    op: AccountOp
    operation: str

    @property
    def label(self) -> tuple[str, str]:
        return "-", f"{self.operation} of {self.op.did}"


@dataclass(slots=True)
class Outcome:
    """What became of a batch: entries to ACK, entries to dead-letter, counts for metrics."""

    done: list[Entry] = field(default_factory=list)
    dead: list[tuple[Entry, str]] = field(default_factory=list)
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    newest_time: str = ""

    def merge(self, other: Outcome) -> None:
        self.done += other.done
        self.dead += other.dead
        self.counts.update(other.counts)
        self.newest_time = max(self.newest_time, other.newest_time)


class Rejected(ValueError):
    """This entry cannot be indexed; the message is the reason given in the dead-letter stream."""


def _now() -> str:
    return normalize_datetime(datetime.now(UTC).isoformat())


class Pipeline:
    """Turns batches of entries into committed rows and counters."""

    def __init__(
        self, db: Database, plugins: dict[str, Plugin], uncounted: frozenset[str] = frozenset()
    ) -> None:
        self._db = db
        self._plugins = plugins
        # Streams whose changes move no counter (bulk backfill): `reconcile --all` rebuilds them.
        self._uncounted = uncounted

    async def process(self, entries: list[Entry]) -> Outcome:
        """Decode and write one batch; database outages propagate (nothing is dead-lettered)."""
        outcome = Outcome()
        items: list[Item | AccountItem] = []
        for entry in entries:
            try:
                item = self._decode(entry)
            except Rejected as exc:
                outcome.dead.append((entry, str(exc)))
                outcome.counts[("unknown", "unknown", "dead_letter")] += 1
                continue
            if isinstance(item, (Item, AccountItem)):
                items.append(item)
            else:
                outcome.done.append(entry)
                outcome.counts[item] += 1
        outcome.merge(await self._write_isolating(items))
        return outcome

    def _decode(self, entry: Entry) -> Item | AccountItem | tuple[str, str, str]:
        """An item to write, or the (collection, operation, outcome) key of an entry skipped."""
        env = _decode_envelope(entry.raw)
        operation = env.__class__.__name__.lower()
        if isinstance(env, (Identity, Account, Repo)):
            _check_did(env.did)
            time = normalize_datetime(env.time) if env.time else _now()
            return AccountItem(entry, AccountOp(env, time, order_key(time, env.seq)), operation)
        plugin = self._plugins.get(env.collection)
        if plugin is None or not plugin.accepts(env.rkey):
            return (env.collection if plugin else "other", operation, "skipped")
        _check_keys(env)
        uri = f"at://{env.did}/{env.collection}/{env.rkey}"
        indexed_at = normalize_datetime(env.time) if env.time else _now()
        op = Op(uri, env.did, env.collection, env.rkey, env.rev, "", None, "", indexed_at)
        if not isinstance(env, Delete):
            raw = bytes(env.record)
            if len(raw) > MAX_RECORD_JSON_BYTES:
                raise Rejected(f"record of {len(raw)} bytes exceeds {MAX_RECORD_JSON_BYTES}")
            try:
                op.record = plugin.decode(raw)
            except (ValueError, RecursionError) as exc:
                raise Rejected(f"invalid {env.collection} record: {exc}") from None
            op.cid, op.json = clean_text(env.cid, MAX_CID_CHARS), clean_json_text(raw)
        return Item(entry, op, operation, indexed_at, backfilled=env.seq < 0)

    async def _write_isolating(self, items: list[Item | AccountItem]) -> Outcome:
        """Write items in one transaction; on a data error split them to isolate the bad ones."""
        if not items:
            return Outcome()
        try:
            return await self._write(items)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(items) == 1:
                collection, label = items[0].label
                log.warning("dead-lettering %s: %s", label, exc)
                outcome = Outcome(dead=[(items[0].entry, f"database rejected: {exc}")])
                outcome.counts[(collection, items[0].operation, "dead_letter")] += 1
                return outcome
            half = len(items) // 2
            first = await self._write_isolating(items[:half])
            first.merge(await self._write_isolating(items[half:]))
            return first

    async def _write(self, mixed: list[Item | AccountItem]) -> Outcome:
        items = [i for i in mixed if isinstance(i, Item)]
        accounts = [i for i in mixed if isinstance(i, AccountItem)]
        deltas = Deltas()
        async with self._db.transaction() as conn:
            # Actors first, in did order, in every transaction: a batch that inserted an actor
            # after its record_state rows would deadlock with one doing the opposite.
            await ensure_actors(conn, _earliest_per_did(items, accounts))
            applied = await apply_account_ops(conn, [a.op for a in accounts])
            fenced = await fences(conn, sorted({i.op.did for i in items}))
            for item in items:
                item.fenced = item.op.did in fenced and item.time <= fenced[item.op.did]
            changes = await apply_guard(conn, _collapse(items))  # and `record`
            await lock_changes(conn, self._plugins, changes)
            # Per collection, in name order: the counted changes, then the uncounted (bulk).
            by_collection: dict[str, tuple[list[Change], list[Change]]] = {}
            bulk = {id(i.op) for i in items if i.entry.stream in self._uncounted}
            for change in changes:
                counted, uncounted = by_collection.setdefault(change.op.collection, ([], []))
                (uncounted if bulk and id(change.op) in bulk else counted).append(change)
            for collection in sorted(by_collection):
                plugin = self._plugins[collection]
                counted, uncounted = by_collection[collection]
                await _apply_plugin(conn, plugin, counted, deltas)
                if uncounted:
                    await _apply_plugin(conn, plugin, uncounted, Deltas())
            await deltas.apply(conn)
        outcome = _outcome(items, {id(c.op) for c in changes})
        for a in accounts:
            result = "indexed" if id(a.op) in applied else "unchanged"
            outcome.done.append(a.entry)
            outcome.counts[("-", a.operation, result)] += 1
            if a.op.event.time:  # an event without a time says nothing about the lag
                outcome.newest_time = max(outcome.newest_time, a.op.time)
        return outcome


async def _apply_plugin(
    conn: object, plugin: Plugin, changes: list[Change], deltas: Deltas
) -> None:
    deletes = [c.op for c in changes if c.kind == "delete"]
    updates = [c.op for c in changes if c.kind == "update"]
    inserts = [c.op for c in changes if c.kind == "insert"]
    if deletes:
        await plugin.delete(conn, deletes, deltas)
    if updates:
        await plugin.update(conn, updates, deltas)
    if inserts:
        await plugin.insert(conn, inserts, deltas)


def _decode_envelope(raw: bytes | None) -> Envelope:
    if raw is None:
        raise Rejected("entry has no `event` field")
    try:
        return envelope_decoder.decode(raw)
    except RecursionError:
        raise Rejected("undecodable event: nested too deeply") from None
    except ValueError as exc:
        repaired = repair_json(raw)
        if repaired is None:
            raise Rejected(f"undecodable event: {exc}") from None
        try:
            return envelope_decoder.decode(repaired)
        except ValueError as again:
            raise Rejected(f"invalid event: {again}") from None


def _check_did(did: str) -> None:
    if not did.startswith("did:") or len(did) > 2048 or "\x00" in did:
        raise Rejected(f"invalid did {did[:80]!r}")


def _check_keys(env: Create | Update | Delete) -> None:
    _check_did(env.did)
    if not env.rkey or "/" in env.rkey or len(env.rkey) > 512:
        raise Rejected(f"invalid rkey {env.rkey[:80]!r}")
    if not env.rev or len(env.rev) > 64:
        raise Rejected(f"invalid rev {env.rev[:80]!r}")
    if "\x00" in env.did + env.rkey + env.rev + env.collection:
        raise Rejected("NUL in a record key")


def _earliest_per_did(items: list[Item], accounts: list[AccountItem]) -> dict[str, str]:
    """Each did of the batch with the earliest event time seen for it."""
    earliest: dict[str, str] = {}
    times = [(i.op.did, i.op.indexed_at) for i in items] + [(a.op.did, a.op.time) for a in accounts]
    for did, time in times:
        if did not in earliest or time < earliest[did]:
            earliest[did] = time
    return earliest


def _collapse(items: list[Item]) -> list[Item]:
    """The op with the highest rev per record: earlier ops in the batch are already superseded."""
    best: dict[str, Item] = {}
    for item in items:
        seen = best.get(item.op.uri)
        if seen is None or item.op.rev > seen.op.rev:
            best[item.op.uri] = item
    return sorted(best.values(), key=lambda i: i.op.uri)


def _outcome(items: list[Item], applied: set[int]) -> Outcome:
    """Every item is done: indexed where its op changed something, else unchanged."""
    outcome = Outcome(done=[i.entry for i in items])
    for item in items:
        result = "fenced" if item.fenced else outcome_of(item.op, id(item.op) in applied)
        outcome.counts[(item.op.collection, item.operation, result)] += 1
        if not item.backfilled:
            outcome.newest_time = max(outcome.newest_time, item.time)
    return outcome
