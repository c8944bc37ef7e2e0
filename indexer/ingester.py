"""What the network ingesters share: socket -> bounded queue -> Redis, with cursor and backpressure.

One reader task holds the websocket: it decodes each message into a `Frame` (envelopes and the
source position after them) and puts it on a bounded queue; when the queue is full it stops
reading the socket, so TCP pushes back on the server. One writer task takes frames off the queue,
waits while the stream's backlog is above the high-water mark, and adds a batch of envelopes and
the cursor of its last frame in one MULTI, so the saved cursor never runs ahead of the stream.

Positions: a source's cursor is an int that grows along its stream (Jetstream `time_us`, the
relay `seq`), saved per source host under `<stream>:cursor:<host>`. The reader remembers the
last position it queued; after a reconnect it skips frames at or before it from the same host,
because those are already queued or written (a host sends its stream in cursor order). Another
host numbers its stream differently, so its overlap is written, and absorbed by the indexer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError, ResponseError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from indexer.config import Settings, mask_url
from indexer.constants import (
    DEFAULT_INGEST_BATCH,
    EVENT_FIELD,
    INGESTER_BACKOFF_MAX_S,
    INGESTER_BACKPRESSURE_POLL_S,
    cursor_key,
)
from indexer.health import Health
from indexer.source import BadFrame, Frame, Source, SourceError
from indexer.startup import wait_for_redis

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOGGED_PER_REASON = 20  # bad frames logged one by one; after that every 1000th


INGESTER_CHECKS = ("redis", "source")


class SourceUnreachable(ConnectionError):
    """No URL of the source could be reached at start-up."""


class IngesterMetrics:
    """The metrics of one ingester, on a registry of its own."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "ingester_events_total",
            "Envelopes added to the stream, by source and envelope type",
            ["source", "kind"],
            registry=r,
        )
        self.skipped = Counter(
            "ingester_skipped_total",
            "Events and frames not added, by source and reason",
            ["source", "reason"],
            registry=r,
        )
        self.cursor_lag = Gauge(
            "ingester_cursor_lag_seconds",
            "Now minus the event time of the last saved cursor",
            registry=r,
        )
        self.backpressure = Gauge(
            "ingester_backpressure", "1 while the backlog keeps the socket unread", registry=r
        )
        self.backlog = Gauge(
            "ingester_stream_backlog", "Undelivered plus pending entries seen last", registry=r
        )
        self.queue = Gauge("ingester_queue_size", "Frames between reader and writer", registry=r)
        self.queue_bytes = Gauge(
            "ingester_queue_bytes", "Envelope bytes between reader and writer", registry=r
        )
        self.connected = Gauge(
            "ingester_connected", "1 while connected to a source", ["source"], registry=r
        )
        self.disconnects = Counter(
            "ingester_disconnects_total",
            "Connections ended or refused, by reason",
            ["source", "reason"],
            registry=r,
        )

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped.labels(self.source, reason).inc(count)


class Position(NamedTuple):
    """Where a source's stream was read to: its host and cursor."""

    host: str
    cursor: int


class Ingester:
    """Reads one source into the live stream until stopped."""

    def __init__(
        self,
        settings: Settings,
        source: Source,
        metrics: IngesterMetrics,
        *,
        start_cursor: int | None = None,
        health: Health | None = None,
    ) -> None:
        self._settings = settings
        self._source = source
        self._metrics = metrics
        # Ready while connected to the source with Redis answering; alive while messages arrive
        # (or while paused by backpressure, which is the indexers' backlog, not our silence).
        self.health = health or Health(settings.stall_after_s, checks=INGESTER_CHECKS)
        self._stream = settings.live_stream
        self._redis = aioredis.Redis.from_url(settings.redis_url, health_check_interval=30)
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue(settings.ingester_queue_size)
        metrics.queue.set_function(self._queue.qsize)
        # The queue is bounded in bytes too: a relay frame can be megabytes.
        self._queued_bytes = 0
        self._room = asyncio.Event()
        metrics.queue_bytes.set_function(lambda: self._queued_bytes)
        self._saved_event_time: float | None = None
        metrics.cursor_lag.set_function(self._cursor_lag)
        self._stopping = asyncio.Event()
        self._start_cursor = start_cursor
        # A batch overshoots the high-water mark by a tenth of it at most.
        self._batch_max = max(1, min(DEFAULT_INGEST_BATCH, settings.high_water_mark // 10))
        self._position: Position | None = None  # the last position queued (reader side)
        self._bad_logged: Tally[str] = Tally()
        # The current connection: messages read, when the last came, whether the reader waits
        # on the queue, whether the watchdog closed it.
        self._delivered = 0
        self._heard_at = 0.0
        self._paused = False
        self._stalled = False
        self.saved: Position | None = None  # the last position saved with its entries
        self.added = 0
        self.received = 0  # messages read off the socket, over all connections
        self.connected_once = False

    @property
    def queued(self) -> int:
        """Frames read and not yet taken by the writer (bounded by INGESTER_QUEUE_SIZE)."""
        return self._queue.qsize()

    @property
    def queued_bytes(self) -> int:
        """Their envelopes' bytes: under INGESTER_QUEUE_BYTES plus one frame."""
        return self._queued_bytes

    def stop(self) -> None:
        """Stop reading; the frames already read are written (signal handlers call this)."""
        self._stopping.set()

    async def run(self) -> None:
        """Read the source into the stream until `stop()`; raise SourceUnreachable at start-up."""
        try:
            # Redis may still be loading its data (LOADING): wait, as the replicas do.
            if not await wait_for_redis(self._redis, self._settings, self._stopping):
                return
            await self._load_cursor()
            reader = asyncio.create_task(self._read_forever(), name="ingester-reader")
            writer = asyncio.create_task(self._write_forever(), name="ingester-writer")
            stopping = asyncio.create_task(self._stopping.wait())
            await asyncio.wait({reader, writer, stopping}, return_when=asyncio.FIRST_COMPLETED)
            self._stopping.set()
            stopping.cancel()
            await self._shutdown(reader, writer)
        finally:
            await self._redis.aclose()

    # -- start and stop ---------------------------------------------------------------------------

    async def _load_cursor(self) -> None:
        """Resume from `--cursor`, else from the newest cursor saved for one of the hosts."""
        if self._start_cursor is not None:
            self._position = Position("", self._start_cursor)
            return
        hosts = [_host(url) for url in self._source.urls]
        values = await self._redis.mget([cursor_key(self._stream, h) for h in hosts])
        saved = [Position(h, int(v)) for h, v in zip(hosts, values, strict=True) if v]
        if saved:
            self._position = self.saved = max(saved, key=lambda p: p.cursor)
            log.info("resuming from cursor %d saved for %s", self.saved.cursor, self.saved.host)

    async def _shutdown(self, reader: asyncio.Task[None], writer: asyncio.Task[None]) -> None:
        """Stop the reader, let the writer add what was read (within the grace), then stop it."""
        reader.cancel()
        reader_result = (await asyncio.gather(reader, return_exceptions=True))[0]
        if not writer.done():
            end = asyncio.ensure_future(self._queue.put(None))
            await asyncio.wait({writer}, timeout=self._settings.shutdown_grace_s)
            end.cancel()
            if not writer.done():
                log.warning("writer still busy after the grace period; its frames are re-read")
                writer.cancel()
        writer_result = (await asyncio.gather(writer, return_exceptions=True))[0]
        for result in (reader_result, writer_result):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result

    # -- reader -----------------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        """Connect to each URL in turn; after a failure back off exponentially, with jitter."""
        failures = 0
        for attempt, url in enumerate(itertools.cycle(self._source.urls), start=1):
            delivered, reason, detail = await self._read_connection(url)
            self._metrics.disconnects.labels(self._source.name, reason).inc()
            if not self.connected_once and attempt >= len(self._source.urls):
                raise SourceUnreachable(
                    f"cannot reach {self._source.name} at {mask_url(url)}: {detail}"
                )
            failures = 0 if delivered else failures + 1
            ceiling = min(INGESTER_BACKOFF_MAX_S, self._settings.ingester_backoff_s * 2**failures)
            await asyncio.sleep(ceiling * random.uniform(0.5, 1.0))

    async def _read_connection(self, url: str) -> tuple[int, str, str]:
        """Read one connection until it fails: the messages read, why it ended, and the detail."""
        cursor = self._position.cursor if self._position else None
        target = self._source.subscribe_url(url, cursor)
        self._delivered, self._stalled, opened = 0, False, False
        try:
            async with connect(
                target,
                proxy=None,
                compression=None,
                max_size=self._source.max_message_bytes,
                open_timeout=self._settings.ingester_stall_timeout_s,
                close_timeout=1,
            ) as ws:
                opened = self.connected_once = True
                self._metrics.connected.labels(self._source.name).set(1)
                self.health.set_check("source", True)
                self.health.progressed()
                log.info("connected to %s", mask_url(target))
                await self._read_messages(ws, _host(url))
        except ConnectionClosed as exc:
            if self._stalled:
                reason = "stalled"
                detail = f"nothing for {self._settings.ingester_stall_timeout_s} s"
            else:
                reason, detail = "closed", str(exc)
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            reason = "error" if opened else "unreachable"
            detail = str(exc) or type(exc).__name__
        finally:
            self._metrics.connected.labels(self._source.name).set(0)
            self.health.set_check("source", False, f"{mask_url(url)}: disconnected")
        delivered = self._delivered
        log.warning("%s %s after %d messages: %s", mask_url(url), reason, delivered, detail)
        return delivered, reason, detail

    async def _read_messages(self, ws: ClientConnection, host: str) -> None:
        """Take every message of a connection until it fails; a watchdog ends a silent one."""
        loop = asyncio.get_running_loop()
        self._heard_at = loop.time()
        watchdog = asyncio.create_task(self._watch(ws))
        try:
            while True:
                message = await ws.recv(decode=False)
                self._heard_at = loop.time()
                self.health.progressed()
                self._delivered += 1
                self.received += 1
                await self._take(message if isinstance(message, bytes) else message.encode(), host)
        finally:
            watchdog.cancel()

    async def _watch(self, ws: ClientConnection) -> None:
        """Close the connection once it is silent for the stall timeout.

        A socket can stay open while nothing arrives; a pause for backpressure is not silence.
        (One watchdog per connection costs less than a timeout around every receive.)
        """
        stall_s = self._settings.ingester_stall_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(stall_s / 4)
            if not self._paused and loop.time() - self._heard_at >= stall_s:
                self._stalled = True
                await ws.close(1001, "stalled")
                return

    async def _take(self, message: bytes, host: str) -> None:
        """Decode a message and queue its frame, unless it repeats what is already queued."""
        try:
            frame = self._source.decode(message)
        except BadFrame as exc:
            self._log_bad("bad_frame", "undecodable message skipped: %s", exc)
            self._metrics.skip("bad_frame")
            return
        except SourceError as exc:
            self._log_bad("error", "the server reported an error: %s", exc)
            self._metrics.skip("error")
            return
        if frame.skipped:
            for reason, count in Tally(frame.skipped).items():
                self._metrics.skip(reason, count)
        if frame.cursor is None:
            return
        last = self._position
        if last is not None and last.host == host and frame.cursor <= last.cursor:
            self._metrics.skip("duplicate", len(frame.envelopes))
            return
        frame.host = host
        if self._queue.full() or self._queued_bytes >= self._settings.ingester_queue_bytes:
            # the writer is behind (or paused): stop reading the socket
            self._paused = True
            try:
                while self._queued_bytes >= self._settings.ingester_queue_bytes:
                    self._room.clear()
                    await self._room.wait()
                await self._queue.put(frame)
            finally:
                self._paused = False
            self._heard_at = asyncio.get_running_loop().time()
        else:
            self._queue.put_nowait(frame)
        self._queued_bytes += frame.size
        self._position = Position(host, frame.cursor)

    def _log_bad(self, reason: str, template: str, exc: Exception) -> None:
        self._bad_logged[reason] += 1
        seen = self._bad_logged[reason]
        if seen <= _LOGGED_PER_REASON or seen % 1000 == 0:
            log.warning(template + " (%d so far)", str(exc)[:300], seen)

    # -- writer -----------------------------------------------------------------------------------

    async def _write_forever(self) -> None:
        """Batches off the queue into the stream, until the end mark or a stop that leaves some."""
        while True:
            frames, ended = await self._next_batch()
            if frames and not (await self._wait_for_room() and await self._write(frames)):
                # Stopped while paused, or while Redis was down: the frames not saved are read
                # again from the saved cursor next time, so nothing after them may be written.
                return
            if ended:
                return

    async def _next_batch(self) -> tuple[list[Frame], bool]:
        """At least one frame (waiting for it), then whatever is queued, up to a batch."""
        first = await self._queue.get()
        if first is None:
            return [], True
        frames, size = [first], len(first.envelopes)
        while size < self._batch_max and not self._queue.empty():
            frame = self._queue.get_nowait()
            if frame is None:
                self._taken(frames)
                return frames, True
            frames.append(frame)
            size += len(frame.envelopes)
        self._taken(frames)
        return frames, False

    def _taken(self, frames: list[Frame]) -> None:
        self._queued_bytes -= sum(f.size for f in frames)
        self._room.set()

    async def _wait_for_room(self) -> bool:
        """Wait while the backlog is at the high-water mark, until it is under the low one.

        False if the ingester was stopped while waiting.
        """
        backlog = await self._retrying(self._backlog)
        if backlog is None:
            return False
        if backlog < self._settings.high_water_mark:
            return True
        self._metrics.backpressure.set(1)
        log.warning("backlog %d at the high-water mark: pausing the source", backlog)
        while backlog >= self._settings.low_water_mark_resolved:
            if self._stopping.is_set():
                return False
            self.health.idle()
            await asyncio.sleep(INGESTER_BACKPRESSURE_POLL_S)
            backlog = await self._retrying(self._backlog)
            if backlog is None:
                return False
        self._metrics.backpressure.set(0)
        log.info("backlog %d under the low-water mark: reading again", backlog)
        return True

    async def _backlog(self) -> int:
        """Entries the group has yet to finish (lag + pending); the length if it has no group."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self._stream)
            pipe.xinfo_groups(self._stream)
            length, groups = await pipe.execute(raise_on_error=False)
        if isinstance(length, Exception):
            raise length
        backlog = int(length)
        if not isinstance(groups, ResponseError):  # no such stream yet: no group either
            mine = next((g for g in groups if _text(g["name"]) == self._settings.group), None)
            if mine is not None and mine.get("lag") is not None:
                backlog = int(mine["lag"]) + int(mine["pending"])
        self._metrics.backlog.set(backlog)
        return backlog

    async def _write(self, frames: list[Frame]) -> bool:
        """The frames' envelopes and the last cursor in one MULTI, retried while Redis is down.

        False if stopped before it could be written.
        """
        last = frames[-1]
        cursor = last.cursor
        assert cursor is not None  # only frames with a position are queued
        key = cursor_key(self._stream, last.host)

        # Atomic: entries and cursor together or neither. A reply lost after EXEC means a retry
        # adds the batch twice; the indexer absorbs duplicates, and the cursor stays right.
        async def multi() -> bool:
            async with self._redis.pipeline(transaction=True) as pipe:
                for frame in frames:
                    for _, envelope in frame.envelopes:
                        pipe.xadd(self._stream, {EVENT_FIELD: envelope})
                pipe.set(key, cursor)
                await pipe.execute()
            return True

        if await self._retrying(multi) is None:
            return False
        self.saved = Position(last.host, cursor)
        kinds = Tally(kind for frame in frames for kind, _ in frame.envelopes)
        for kind, count in kinds.items():
            self._metrics.events.labels(self._source.name, kind).inc(count)
        self.added += sum(kinds.values())
        event_time = next((f.event_time_s for f in reversed(frames) if f.event_time_s), None)
        self._saved_event_time = event_time or self._saved_event_time
        return True

    def _cursor_lag(self) -> float:
        """Now minus the event time of the saved cursor: it grows while the source is silent."""
        if self._saved_event_time is None:
            return 0.0
        return max(0.0, time.time() - self._saved_event_time)

    async def _retrying(self, step: Callable[[], Awaitable[T]]) -> T | None:
        """Run a Redis step until it succeeds; None if stopped while Redis is down."""
        delay = self._settings.ingester_backoff_s
        while True:
            try:
                result = await step()
                self.health.set_check("redis", True)
                return result
            except (RedisError, ConnectionError, OSError) as exc:
                self.health.set_check("redis", False, str(exc))
                if self._stopping.is_set():
                    log.warning("redis unavailable at shutdown (%s); unsaved frames re-read", exc)
                    return None
                log.warning("redis unavailable (%s); retrying in %.1f s", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(INGESTER_BACKOFF_MAX_S, delay * 2)


def _host(url: str) -> str:
    """The host (and port) of a URL: the name its cursor is saved under."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or url


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
