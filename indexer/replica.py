"""An indexer replica: read -> decode -> route -> write (one transaction) -> ack, in a loop.

A fixed set of worker tasks bounds the batches in flight. Commit comes before ACK, and the ACK
is shielded from cancellation. A stop request (a signal, or `stop()`) ends reading; batches in
hand finish within the grace period, after which they are cancelled and stay pending for
redelivery: nothing is ever ACKed without its commit.

Nothing is left pending forever: at start a replica takes up its own unfinished entries, and
every `claim_idle_s / 2` one of its workers claims entries that any consumer has held for
`claim_idle_s` (a crashed replica's batch). Work in progress is kept from looking idle by
touching it, so live batches are not claimed away. An entry delivered `max_deliveries` times
without a commit is dead-lettered; entries already redelivered are retried one per transaction,
so an entry that crashes replicas climbs to that limit alone, not with its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from datetime import datetime

from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from indexer.config import Settings
from indexer.db import Database, is_contention, is_timed_out, is_unavailable
from indexer.deletion import AccountDeletions
from indexer.health import Health
from indexer.lanes import Lanes
from indexer.metrics import Metrics
from indexer.observer import Observer
from indexer.pipeline import Entry, Outcome, Pipeline
from indexer.plugin import Plugin
from indexer.startup import wait_for_postgres, wait_for_redis
from indexer.stream import PendingEntry, StreamConsumer, connect, stream_id

log = logging.getLogger(__name__)

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
_MAX_BACKOFF_S = 10.0
_TIMEOUT_HINT = (
    "; if this repeats, the statements wait on a lock held elsewhere or need a longer "
    "statement_timeout (docs/operations.md, 'Timed-out batches')"
)
_SETTLE_DEADLINE_S = 5.0
_MAX_SWEEP_INTERVAL_S = 30.0
_HARD_DEADLINE_S = 10.0
# Error replies that pass: failover (READONLY, MASTERDOWN; UNBLOCKED to a blocked read when the
# server turns replica or the stream goes away), memory or disk full (OOM, MISCONF), a busy
# script (BUSY), a cluster moving (TRYAGAIN, CLUSTERDOWN), a stream or group that vanished
# (NOGROUP: recreated by ensure_groups). redis-py raises some of them as their own classes, with
# the prefix cut off the message.
_TRANSIENT_CLASSES = (ReadOnlyError, OutOfMemoryError, TryAgainError, MasterDownError,
                      ClusterDownError)  # fmt: skip
_TRANSIENT_REPLIES = ("READONLY", "OOM", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "LOADING",
                      "NOGROUP", "UNBLOCKED", "MISCONF", "BUSY")  # fmt: skip
_VANISHED = ("NOGROUP", "no longer exists")


class Replica:
    """One consumer of the group; `run()` until stopped or, with `drain`, until nothing is left."""

    def __init__(
        self,
        settings: Settings,
        plugins: dict[str, Plugin],
        metrics: Metrics,
        health: Health | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self.health = health or Health(settings.stall_after_s)
        self._redis = connect(settings)
        self._db = Database(settings, metrics.pool_acquire.observe)
        metrics.track_pool(self._db)
        self._observer = Observer(settings, self._redis, self._db, metrics, self.health)
        self._consumer = StreamConsumer(settings, self._redis)
        uncounted = frozenset(settings.streams[1:]) if settings.bulk_backfill else frozenset()
        self._pipeline = Pipeline(self._db, plugins, uncounted)
        self.deletions = AccountDeletions(self._db, plugins)
        self._drained = False
        self._stopping = asyncio.Event()  # stop reading: a stop request, or a worker ended
        self._stop_requested = asyncio.Event()  # a stop request only
        self._settling: set[asyncio.Task[None]] = set()
        # Entries pending on this replica: in its batches in flight or waiting in their lanes.
        self._in_flight: dict[str, set[str]] = {stream: set() for stream in settings.streams}
        self._lanes = Lanes(settings.concurrency, settings.batch_size, settings.streams[0])
        self._claim_idle_ms = int(settings.claim_idle_s * 1000)
        self._next_sweep = 0.0
        self.indexed = 0
        self.claimed = 0

    def stop(self) -> None:
        """Stop reading; batches in hand finish (signal handlers call this, and only this)."""
        self._stop_requested.set()
        self._stopping.set()

    async def run(self, *, drain: bool = False) -> None:
        observer = asyncio.create_task(self._observer.run(), name="observer")
        # A crashed observer would leave readiness and the stream gauges frozen: the replica
        # stops (and raises it at the end), so that its supervisor restarts it.
        observer.add_done_callback(lambda _: self._stopping.set())
        try:
            if not await wait_for_redis(self._redis, self._settings, self._stopping):
                return
            if not await wait_for_postgres(self._db, self._settings, self._stopping):
                return
            self.health.set_check("schema", True)
            await self._consumer.ensure_groups()
            # What this consumer read before a restart and never ACKed is redone first, by
            # worker 0, up to the ids delivered before now (later ones are the other workers').
            before_start = await self._consumer.last_delivered_ids()
            workers = [
                asyncio.create_task(
                    self._work(n, drain, recover_until=before_start if n == 0 else None),
                    name=f"worker-{n}",
                )
                for n in range(self._settings.concurrency)
            ]
            # Chores end on an event, not by cancel(): a cancel that lands as a redis-py command
            # completes can be lost (Python 3.11), which would hang the shutdown.
            workers_done = asyncio.Event()
            chores = [
                asyncio.create_task(self._keep_in_flight_busy(workers_done), name="touch"),
                asyncio.create_task(self._housekeeping(workers_done), name="housekeeping"),
                asyncio.create_task(self.deletions.run(workers_done), name="account-deletions"),
            ]
            try:
                await self._wait(workers)
            finally:
                workers_done.set()
                await asyncio.gather(*chores, return_exceptions=True)
            if self._drained:  # drained also means: no account deletion left pending
                await self._finish_deletions()
            await self._leave()
        finally:
            self._observer.stop()
            await asyncio.gather(observer, return_exceptions=True)
            if self._settling:  # ACKs of committed batches whose workers were cancelled
                await asyncio.wait(self._settling, timeout=_SETTLE_DEADLINE_S)
            await self._db.close()
            await self._redis.aclose()
            if not observer.cancelled() and (crash := observer.exception()) is not None:
                raise crash

    async def _finish_deletions(self) -> None:
        """Run the account deletions still pending, waiting out outages as a batch does. A stop
        request leaves the rest pending (their fences stay): the next start finishes them."""
        attempt = 0
        while not self._stop_requested.is_set():
            try:
                await self.deletions.run_pending(self._stop_requested, wait=True)
            except Exception as exc:
                attempt += 1
                delay = self._retry_after(exc, attempt, "pending account deletions not run")
                if delay is None:
                    raise
                await _wait_for(self._stop_requested, delay)
                continue
            if not self._stop_requested.is_set():
                return
        log.warning("stopped before every pending account deletion was run; the next start "
                    "runs the rest")  # fmt: skip

    async def _wait(self, workers: list[asyncio.Task[None]]) -> None:
        """Wait for the workers; after a stop request give them the grace period, then cancel."""
        stop = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait([stop, *workers], return_when=asyncio.FIRST_COMPLETED)
            self._stopping.set()  # a stop request, or a worker ended (drained, or crashed)
            _, late = await asyncio.wait(workers, timeout=self._settings.shutdown_grace_s)
            for task in late:
                log.warning(
                    "grace period over: cancelling %s; its batch stays pending", task.get_name()
                )
                task.cancel()
            # A cancel can be lost (redis-py and asyncpg wait_for on Python 3.11): past a hard
            # deadline the replica exits anyway; whatever was not ACKed stays pending.
            _, stuck = await asyncio.wait(workers, timeout=_HARD_DEADLINE_S)
            if stuck:
                log.error("%d workers did not stop within %gs after cancel; exiting anyway",
                          len(stuck), _HARD_DEADLINE_S)  # fmt: skip
                return
            for result in await asyncio.gather(*workers, return_exceptions=True):
                if isinstance(result, Exception):
                    raise result  # a bug we must see; cancelled workers are not errors
        finally:
            stop.cancel()

    async def _work(self, lane: int, drain: bool, *, recover_until: dict[str, str] | None) -> None:
        """Take batches from this worker's lane (`indexer.lanes`), reading from the stream when
        it runs short; after a stop request, finish what the lane holds and read no more."""
        if recover_until is not None:
            await self._sweep(self._settings.consumer, min_idle_ms=0, until=recover_until)
        size = self._settings.batch_size
        while True:
            if self._stopping.is_set():
                if not (entries := self._lanes.take(lane, size)):
                    return
                await self._handle(entries)
                continue
            self.health.beat()
            if self._sweep_due() and await self._sweep(None, min_idle_ms=self._claim_idle_ms):
                continue
            source = lane
            if self._lanes.waiting(lane) < size:
                if self._lanes.room() and not self._lanes.reading:
                    await self._read(lane, drain)
                elif not self._lanes.waiting(lane):
                    if self._lanes.room():
                        # Another worker is reading: wait for what it routes here rather than
                        # block on the stream while entries come in for this lane.
                        await self._lanes.changed(max(0.1, self._settings.block_ms / 1000))
                        continue
                    # The other lanes are full and this one empty (one account's run of
                    # entries, as a backfill adds them): help with the fullest, though its
                    # batches and this one may then wait for each other, as without lanes.
                    source = self._lanes.fullest()
            if entries := self._lanes.take(source, size):
                await self._handle(entries)

    async def _read(self, lane: int, drain: bool) -> None:
        """Read new entries into the lanes, one worker at a time; without blocking if this
        worker's lane holds some."""
        block_ms = 0 if self._lanes.waiting(lane) else self._settings.block_ms
        async with self._lanes.reader():
            try:
                entries = await self._consumer.read_new(self._settings.batch_size, block_ms)
            except (RedisError, OSError) as exc:
                # Still the reader while it waits: the other workers do not read into the
                # same outage one after the other.
                await self._redis_trouble(exc, "reading")
                return
            for entry in entries:  # pending on us from now on: kept from looking idle
                self._in_flight[entry.stream].add(entry.id)
            self._lanes.put(entries)
        if entries:
            return
        if not any(self._in_flight.values()):
            self.health.idle()  # nothing new, nothing in hand: silence is fine
        try:
            if drain and await self._consumer.drained():
                log.info("drained: the group has no lag and nothing pending")
                self._drained = True
                self._stopping.set()
        except (RedisError, OSError) as exc:
            await self._redis_trouble(exc, "reading")

    def _sweep_due(self) -> bool:
        """True for one worker every `claim_idle_s / 2`: that worker looks for idle entries."""
        now = time.monotonic()
        if now < self._next_sweep:
            return False
        self._next_sweep = now + min(_MAX_SWEEP_INTERVAL_S, self._settings.claim_idle_s / 2)
        return True

    async def _sweep(
        self, consumer: str | None, *, min_idle_ms: int, until: dict[str, str] | None = None
    ) -> int:
        """Claim and handle entries pending for `min_idle_ms` on `consumer` (None: on any
        consumer), stream by stream, until none is left (or, with `until`, none up to that id);
        returns how many were found. Entries this replica has in hand are never taken."""
        found = 0
        for stream in self._settings.streams:
            bound = stream_id(until[stream]) if until else None
            while not self._stopping.is_set():
                try:
                    pending = await self._consumer.idle_pending(
                        stream, min_idle_ms, self._settings.batch_size, consumer
                    )
                    pending = [
                        p for p in pending
                        if p.id not in self._in_flight[stream]
                        and (bound is None or stream_id(p.id) <= bound)
                    ]  # fmt: skip
                    if not pending:
                        break
                    await self._take_over(stream, pending, min_idle_ms)
                except (RedisError, OSError) as exc:
                    await self._redis_trouble(exc, "claiming")
                    continue
                found += len(pending)
        return found

    async def _redis_trouble(self, exc: BaseException, doing: str) -> None:
        """A Redis failure while `doing`: wait a second if it passes, raise if it is a bug."""
        if not _redis_transient(exc):
            raise exc
        log.warning("redis unavailable while %s (%s); retrying in about 1s", doing, exc)
        await asyncio.sleep(random.uniform(0.5, 1.5))  # jitter: replicas do not retry in step
        if any(words in str(exc) for words in _VANISHED):
            with contextlib.suppress(RedisError, OSError):
                await self._consumer.ensure_groups()

    async def _take_over(self, stream: str, pending: list[PendingEntry], min_idle_ms: int) -> None:
        """Claim pending entries and handle them like new ones; dead-letter the spent ones."""
        limit = self._settings.max_deliveries
        spent = [p for p in pending if p.deliveries >= limit]
        first = [p for p in pending if p.deliveries <= 1]
        again = [p for p in pending if 1 < p.deliveries < limit]
        before = self.claimed
        if spent:
            await self._dead_letter_spent(stream, spent, min_idle_ms)
        if first:
            await self._handle(await self._claim(stream, first, min_idle_ms))
        for one in again:  # one per transaction: a crashing entry then fails alone
            await self._handle(await self._claim(stream, [one], min_idle_ms))
        log.info(
            "claimed %d of %d pending entries of %s held by %s (%d redelivered before, "
            "%d dead-lettered at max_deliveries %d)",
            self.claimed - before, len(pending), stream,
            ",".join(sorted({p.consumer for p in pending})), len(again), len(spent), limit,
        )  # fmt: skip

    async def _claim(
        self, stream: str, pending: list[PendingEntry], min_idle_ms: int
    ) -> list[Entry]:
        entries = await self._consumer.claim(stream, pending, min_idle_ms)
        self.claimed += len(entries)
        self._metrics.claimed.inc(len(entries))
        return entries

    async def _dead_letter_spent(
        self, stream: str, spent: list[PendingEntry], min_idle_ms: int
    ) -> None:
        counts = {p.id: p.deliveries for p in spent}
        entries = await self._claim(stream, spent, min_idle_ms)
        outcome = Outcome()
        for entry in entries:
            entry.deliveries = counts[entry.id]
            reason = (
                f"delivered {entry.deliveries} times without being committed "
                f"(max_deliveries {self._settings.max_deliveries})"
            )
            outcome.dead.append((entry, reason))
            outcome.counts[("unknown", "unknown", "dead_letter")] += 1
        await self._settle(outcome)
        self._record(outcome)

    async def _keep_in_flight_busy(self, done: asyncio.Event) -> None:
        """Reset the idle time of the entries in hand now and then, so nobody claims them."""
        interval = max(0.1, self._settings.claim_idle_s / 4)
        while not await _wait_for(done, interval):
            for stream, ids in self._in_flight.items():
                if not ids:
                    continue
                try:
                    await self._consumer.touch(stream, list(ids))
                except (RedisError, OSError) as exc:  # never end this task: log, try again
                    log.warning("could not touch entries in hand (%s)", exc)

    async def _housekeeping(self, done: asyncio.Event) -> None:
        """Trim each stream below what every group still needs; remove long-idle consumers."""
        interval = self._settings.trim_interval_s
        if interval <= 0:
            return
        while not await _wait_for(done, interval):
            for stream in self._settings.streams:
                try:
                    await self._consumer.trim(stream)
                    await self._remove_idle_consumers(stream)
                except (RedisError, OSError) as exc:
                    log.warning("housekeeping of %s skipped (%s)", stream, exc)

    async def _remove_idle_consumers(self, stream: str) -> None:
        idle_ms = self._settings.consumer_idle_s * 1000
        for name, pending, idle in await self._consumer.consumers(stream):
            stale = name != self._settings.consumer and pending == 0 and idle >= idle_ms
            if stale and await self._consumer.remove_consumer(stream, name):
                log.info("removed consumer %s of %s: idle %ds, nothing pending",
                         name, stream, idle // 1000)  # fmt: skip

    async def _leave(self) -> None:
        """On a clean exit, trim what is done and remove this consumer from the group if
        nothing is pending on it."""
        for stream in self._settings.streams:
            try:
                if self._settings.trim_interval_s > 0:
                    await self._consumer.trim(stream)
                removed = await self._consumer.remove_consumer(stream, self._settings.consumer)
            except (RedisError, OSError) as exc:
                log.warning("could not trim %s or remove consumer %s from it (%s)",
                            stream, self._settings.consumer, exc)  # fmt: skip
                continue
            if not removed:
                log.warning(
                    "consumer %s keeps entries pending on %s; they are redone at its next start "
                    "or claimed by another replica after %gs",
                    self._settings.consumer, stream, self._settings.claim_idle_s,
                )  # fmt: skip

    async def _handle(self, entries: list[Entry]) -> None:
        """Commit the batch, then ACK it. A cancellation before the commit rolls the batch back
        (it stays pending); the ACK after the commit is shielded, so a commit is never left
        un-ACKed by a stop.

        A batch the server cancels for a timeout (a lock held elsewhere, a statement_timeout
        too short for it) is retried in rounds: a part that timed out is tried again as its
        halves (an entry alone as itself) in the next round, so the parts that can commit do
        and the entries that keep timing out end up alone. After a round in which nothing
        committed, the next waits, longer each time (up to 10 s)."""
        if not entries:
            return
        for entry in entries:
            self._in_flight[entry.stream].add(entry.id)
        parts, stalled = [entries], 0  # rounds in a row in which nothing committed
        reason: Exception | None = None
        try:
            while True:
                timed_out: list[list[Entry]] = []
                for part in parts:
                    started = time.monotonic()
                    try:
                        outcome = await self._commit(part)
                    except Exception as exc:
                        if not is_timed_out(exc):
                            raise
                        timed_out.append(part)
                        reason = exc
                        continue
                    await self._acknowledge(part, outcome, started)
                if not timed_out:
                    return
                stalled = stalled + 1 if len(timed_out) == len(parts) else 0
                parts = [half for part in timed_out for half in _halves(part)]
                delay = _backoff(stalled, 0.05) if stalled else 0.0
                self._metrics.retries.labels("timeout").inc(len(timed_out))
                log.warning(
                    "%d of a batch of %d entries not committed (timeout: %s); "
                    "retrying them as %d batch(es) in %.2fs%s",
                    sum(map(len, timed_out)), len(entries), reason, len(parts), delay,
                    _TIMEOUT_HINT if stalled else "",
                )  # fmt: skip
                await asyncio.sleep(delay)
        finally:
            for entry in entries:
                self._in_flight[entry.stream].discard(entry.id)

    async def _acknowledge(self, part: list[Entry], outcome: Outcome, started: float) -> None:
        """ACK (and dead-letter) a committed part, and count it."""
        self._observer.committed()
        settle = asyncio.create_task(self._settle(outcome))
        self._settling.add(settle)
        settle.add_done_callback(self._settling.discard)
        await asyncio.shield(settle)
        for entry in part:
            self._in_flight[entry.stream].discard(entry.id)
        self.health.progressed()
        self._metrics.batch_duration.observe(time.monotonic() - started)
        self._metrics.batch_size.observe(len(part))
        self._record(outcome)

    async def _commit(self, entries: list[Entry]) -> Outcome:
        """Process until committed: outages and contention are waited out, never dead-lettered.
        A timeout is raised: the caller splits the batch (`_handle`)."""
        attempt = 0
        while True:
            try:
                return await self._pipeline.process(entries)
            except Exception as exc:
                if is_timed_out(exc):
                    raise
                attempt += 1
                delay = self._retry_after(exc, attempt, f"batch of {len(entries)} not committed")
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    def _retry_after(self, exc: Exception, attempt: int, what: str) -> float | None:
        """For contention or an outage: count and log it, and return the seconds to wait before
        retry `attempt`. None for any other failure, which the caller raises."""
        reason = _retry_reason(exc)
        if reason is None:
            return None
        self._metrics.retries.labels(reason).inc()
        delay = _backoff(attempt, 0.05)
        hint = _TIMEOUT_HINT if reason == "timeout" else ""
        log.warning("%s (%s: %s); retry %d in %.2fs%s", what, reason, exc, attempt, delay, hint)
        return delay

    async def _settle(self, outcome: Outcome) -> None:
        attempt = 0
        while True:
            try:
                await self._consumer.settle(outcome.done, outcome.dead)
                return
            except (RedisError, OSError) as exc:
                if not _redis_transient(exc):
                    raise
                attempt += 1
                log.warning("ACK failed (%s); retry %d", exc, attempt)
                await asyncio.sleep(_backoff(attempt, 0.1))

    def _record(self, outcome: Outcome) -> None:
        for (collection, operation, result), n in outcome.counts.items():
            self._metrics.events.labels(collection, operation, result).inc(n)
            if result == "indexed":
                self.indexed += n
        if outcome.dead:
            log.warning(
                "dead-lettered %d entries, first: %s", len(outcome.dead), outcome.dead[0][1]
            )
        if outcome.newest_time:
            newest = datetime.fromisoformat(outcome.newest_time.replace("Z", "+00:00"))
            self._metrics.indexed_event_time(newest.timestamp())


def _halves(entries: list[Entry]) -> list[list[Entry]]:
    """Two halves of a list of entries; one entry alone as itself."""
    half = len(entries) // 2
    return [entries[:half], entries[half:]] if half else [entries]


def _backoff(attempt: int, first_s: float) -> float:
    """Seconds before retry `attempt` (1, 2, ...): doubling from `first_s`, capped, jittered."""
    return min(_MAX_BACKOFF_S, first_s * 2.0**attempt) * random.uniform(0.5, 1.0)


async def _wait_for(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for the event; True if it is set."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        return False
    return True


def _redis_transient(exc: BaseException) -> bool:
    """Redis is down, restarting, failing over or out of memory: wait, never give up."""
    if isinstance(exc, (*_REDIS_DOWN, *_TRANSIENT_CLASSES)):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)


def _retry_reason(exc: BaseException) -> str | None:
    if is_timed_out(exc):
        return "timeout"
    if is_contention(exc):
        return "contention"
    if is_unavailable(exc) or isinstance(exc, _REDIS_DOWN):
        return "unavailable"
    return None
