"""An indexer replica: read -> decode -> route -> write (one transaction) -> ack, in a loop.

A fixed set of worker tasks bounds the batches in flight. Commit comes before ACK, and the ACK
is shielded from cancellation. A stop request (a signal, or `stop()`) ends reading; batches in
hand finish within the grace period, after which they are cancelled and stay pending for
redelivery: nothing is ever ACKed without its commit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import UTC, datetime

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from indexer.config import Settings
from indexer.db import Database, is_contention, is_unavailable
from indexer.metrics import Metrics
from indexer.migrate import SchemaNotReady
from indexer.migrate import pending as pending_migrations
from indexer.pipeline import Entry, Outcome, Pipeline
from indexer.plugin import Plugin
from indexer.stream import StreamConsumer, connect, stream_id

log = logging.getLogger(__name__)

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
_MAX_BACKOFF_S = 10.0
_SETTLE_DEADLINE_S = 5.0


class Replica:
    """One consumer of the group; `run()` until stopped or, with `drain`, until nothing is left."""

    def __init__(self, settings: Settings, plugins: dict[str, Plugin], metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._redis = connect(settings)
        self._db = Database(settings)
        self._consumer = StreamConsumer(settings, self._redis)
        self._pipeline = Pipeline(self._db, plugins)
        self._stopping = asyncio.Event()
        self._settling: set[asyncio.Task[None]] = set()
        self.indexed = 0

    def stop(self) -> None:
        """Stop reading; batches in hand finish (signal handlers call this, and only this)."""
        self._stopping.set()

    async def run(self, *, drain: bool = False) -> None:
        await self._db.open()
        self._metrics.pool_size.set(self._db.size)
        try:
            await self._check_schema()
            await self._consumer.ensure_groups()
            # Entries pending on this consumer were all delivered before now: recovery stops at
            # these ids, so it never takes up what the other workers read from here on.
            bounds = await self._consumer.last_delivered_ids()
            workers = [
                asyncio.create_task(
                    self._work(drain, recover_until=bounds if n == 0 else None), name=f"worker-{n}"
                )
                for n in range(self._settings.concurrency)
            ]
            await self._wait(workers)
        finally:
            if self._settling:  # ACKs of committed batches whose workers were cancelled
                await asyncio.wait(self._settling, timeout=_SETTLE_DEADLINE_S)
            await self._db.close()
            await self._redis.aclose()

    async def _check_schema(self) -> None:
        async with self._db.connection() as conn:
            missing = await pending_migrations(conn)
        if missing:
            names = ", ".join(m.name for m in missing)
            raise SchemaNotReady(
                f"database is not migrated ({names} pending): run `indexer migrate`"
            )

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
            for result in await asyncio.gather(*workers, return_exceptions=True):
                if isinstance(result, Exception):
                    raise result  # a bug we must see; cancelled workers are not errors
        finally:
            stop.cancel()

    async def _finish_own_pending(self, bounds: dict[str, str]) -> None:
        """Entries this consumer read before a restart but never ACKed are handled first."""
        for stream, last in bounds.items():
            bound = stream_id(last)
            after = "0"
            while not self._stopping.is_set():
                try:
                    entries = await self._consumer.read_pending(
                        stream, after, self._settings.batch_size
                    )
                except _REDIS_DOWN as exc:
                    log.warning("redis unavailable while recovering (%s); retrying in 1s", exc)
                    await asyncio.sleep(1.0)
                    continue
                entries = [e for e in entries if stream_id(e.id) <= bound]
                if not entries:
                    break
                after = entries[-1].id
                await self._handle(entries)

    async def _work(self, drain: bool, *, recover_until: dict[str, str] | None) -> None:
        if recover_until is not None:
            await self._finish_own_pending(recover_until)
        while not self._stopping.is_set():
            try:
                entries = await self._consumer.read_new(
                    self._settings.batch_size, self._settings.block_ms
                )
                if not entries and drain and await self._consumer.drained():
                    log.info("drained: the group has no lag and nothing pending")
                    self._stopping.set()
            except _REDIS_DOWN as exc:
                log.warning("redis unavailable while reading (%s); retrying in 1s", exc)
                await asyncio.sleep(1.0)
                continue
            if entries:
                await self._handle(entries)

    async def _handle(self, entries: list[Entry]) -> None:
        """Commit the batch, then ACK it. A cancellation before the commit rolls the batch back
        (it stays pending); the ACK after the commit is shielded, so a commit is never left
        un-ACKed by a stop."""
        started = time.monotonic()
        outcome = await self._commit(entries)
        settle = asyncio.create_task(self._settle(outcome))
        self._settling.add(settle)
        settle.add_done_callback(self._settling.discard)
        await asyncio.shield(settle)
        self._metrics.batch_duration.observe(time.monotonic() - started)
        self._metrics.batch_size.observe(len(entries))
        self._record(outcome)

    async def _commit(self, entries: list[Entry]) -> Outcome:
        """Process until committed: outages and contention are waited out, never dead-lettered."""
        attempt = 0
        while True:
            try:
                return await self._pipeline.process(entries)
            except Exception as exc:
                reason = _retry_reason(exc)
                if reason is None:
                    raise
                attempt += 1
                self._metrics.retries.labels(reason).inc()
                delay = min(_MAX_BACKOFF_S, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
                log.warning(
                    "batch of %d not committed (%s: %s); retry %d in %.2fs",
                    len(entries),
                    reason,
                    exc,
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _settle(self, outcome: Outcome) -> None:
        attempt = 0
        while True:
            try:
                await self._consumer.settle(outcome.done, outcome.dead)
                return
            except _REDIS_DOWN as exc:
                attempt += 1
                log.warning("ACK failed (%s); retry %d", exc, attempt)
                await asyncio.sleep(min(_MAX_BACKOFF_S, 0.1 * 2**attempt))

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
            self._metrics.event_lag.set(max(0.0, (datetime.now(UTC) - newest).total_seconds()))
        self._metrics.pool_in_use.set(self._db.in_use)
        self._metrics.pool_waiting.set(self._db.waiting)


def _retry_reason(exc: BaseException) -> str | None:
    if is_contention(exc):
        return "contention"
    if is_unavailable(exc) or isinstance(exc, _REDIS_DOWN):
        return "unavailable"
    return None
