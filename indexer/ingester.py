"""What the network ingesters share: socket -> bounded queue -> Redis, with cursor and backpressure.

One reader task holds the websocket: it decodes each message into a `Frame` (envelopes and the
source position after them) and puts it on a bounded queue; when the queue is full it stops
reading the socket, so TCP pushes back on the server. One writer task takes frames off the queue,
waits while the stream's backlog is above the high-water mark, and adds a batch of envelopes and
the cursor of its last frame in one MULTI, so the saved cursor never runs ahead of the stream.

Positions (`indexer.source.Position`): a host's own sequence (the relay `seq`, a Jetstream v2
`cursor`), an event time (Jetstream `time_us`), or both, saved per source host under
`<stream>:cursor:<host>`. The source says which cursor to resume from on which URL: a sequence
only on the host that numbered it. The reader remembers the last position it queued; after a
reconnect it skips frames at or before it from the same host, because those are already queued
or written (a host sends its stream in order). Another host numbers and stamps its stream
differently, so its overlap is written, and absorbed by the indexer.
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
from typing import TypeVar

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from indexer.config import Settings, mask_url
from indexer.constants import (
    DEFAULT_INGEST_BATCH,
    EVENT_FIELD,
    INGESTER_BACKOFF_MAX_S,
    INGESTER_BACKPRESSURE_POLL_S,
    INGESTER_SOCKET_MAX_BYTES,
    cursor_key,
)
from indexer.health import Health
from indexer.source import (
    BadFrame,
    CursorAhead,
    Frame,
    Position,
    Source,
    SourceError,
    TooBig,
    host_of,
)
from indexer.startup import wait_for_redis
from indexer.stream import group_backlog, text

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
        # Where the current connection resumed: frames at or before it repeat what was queued
        # before (the rewind's overlap); past the first newer frame the check is off, so one
        # odd position cannot make the rest of a connection look like repeats.
        self._overlap: Position | None = None
        self._bad_logged: Tally[str] = Tally()
        # The current connection: frames queued (only they reset the reconnect backoff), when
        # the last message came, whether the reader waits on the queue, whether the watchdog
        # closed it.
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
        """Start exactly at `--cursor`, else resume from the newest position saved for a host."""
        if self._start_cursor is not None:
            log.info("starting at cursor %d", self._start_cursor)
            return
        hosts = [host_of(url) for url in self._source.urls]
        keys = [cursor_key(self._stream, h) for h in hosts]
        values = await self._redis.mget(keys)
        saved = []
        for host, key, value in zip(hosts, keys, values, strict=True):
            if not value:
                continue
            try:
                saved.append(self._source.saved_position(host, text(value)))
            except ValueError:
                raise ValueError(
                    f"the cursor saved in {key} is not a cursor: {text(value)!r}; "
                    "delete the key to start live, or give --cursor"
                ) from None
        if saved:
            # Newest by event time: sequences of different hosts do not compare.
            self._position = self.saved = max(saved, key=_recency)
            log.info("resuming from %s saved for %s", self.saved.saved_value(), self.saved.host)

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
        """Read one connection until it fails: the frames queued, why it ended, and the detail."""
        if self._position is not None:
            cursor = self._source.resume_cursor(url, self._position)
        else:
            cursor = self._start_cursor  # exactly there: `--cursor`, or None (live)
        target = self._source.subscribe_url(url, cursor)
        self._delivered, self._stalled, opened = 0, False, False
        self._overlap = self._position
        try:
            async with connect(
                target,
                proxy=None,
                compression=None,
                # Read an oversized message whole, to skip it: a close would re-read it forever.
                max_size=max(INGESTER_SOCKET_MAX_BYTES, self._source.max_message_bytes),
                open_timeout=self._settings.ingester_stall_timeout_s,
                close_timeout=1,
            ) as ws:
                opened = self.connected_once = True
                self._metrics.connected.labels(self._source.name).set(1)
                self.health.set_check("source", True)
                self.health.progressed()
                log.info("connected to %s", mask_url(target))
                await self._read_messages(ws, host_of(url))
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
        log.warning("%s %s after %d frames queued: %s", mask_url(url), reason, delivered, detail)
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
        frame = self._decode(message, host)
        if frame is None or (frame.seq is None and frame.time_us is None):
            return
        position = Position(host, frame.seq, frame.time_us)
        if self._overlap is not None:
            if position.repeats(self._overlap):
                self._metrics.skip("duplicate", len(frame.envelopes))
                return
            self._overlap = None
        frame.position = position
        await self._put(frame)
        self._position = position
        self._delivered += 1

    def _decode(self, message: bytes, host: str) -> Frame | None:
        """The message's frame, its skipped events counted; None for a message skipped whole."""
        try:
            if len(message) > self._source.max_message_bytes:
                raise TooBig(f"message of {len(message)} bytes is over the limit")
            frame = self._source.decode(message)
        except TooBig as exc:
            self._skip_bad("too_big", "oversized message skipped: %s", exc)
            return None
        except BadFrame as exc:
            self._skip_bad("bad_frame", "undecodable message skipped: %s", exc)
            return None
        except CursorAhead as exc:
            self._cursor_ahead(host, exc)
            return None
        except SourceError as exc:
            self._skip_bad("error", "the server reported an error: %s", exc)
            return None
        for reason, count in Tally(frame.skipped).items():
            self._metrics.skip(reason, count)
        return frame

    def _cursor_ahead(self, host: str, exc: CursorAhead) -> None:
        """The server's sequence was reset below ours: read its live stream from now on.

        Waiting cannot help (its new, lower sequence may take weeks to pass ours), and neither
        would the duplicate check, which would drop that lower sequence: both are forgotten.
        """
        log.error(
            "%s has nothing after our cursor %s (%s): its sequence was reset; reading its live "
            "stream from now on. Events it sent between our cursor and the reset are missing "
            "from the stream: only a backfill of the repos can bring them",
            host, self._position.saved_value() if self._position else self._start_cursor, exc,
        )  # fmt: skip
        self._metrics.skip("future_cursor")
        self._position = self._start_cursor = self._overlap = None

    async def _put(self, frame: Frame) -> None:
        """Queue a frame; while the queue is full (in frames or bytes), stop reading the socket."""
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

    def _skip_bad(self, reason: str, template: str, exc: Exception) -> None:
        """Count a message skipped whole; log the first few of each reason, then every 1000th."""
        self._metrics.skip(reason)
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
        backlog = await group_backlog(self._redis, self._stream, self._settings.group)
        self._metrics.backlog.set(backlog)
        return backlog

    async def _write(self, frames: list[Frame]) -> bool:
        """The frames' envelopes and the last cursor in one MULTI, retried while Redis is down.

        False if stopped before it could be written.
        """
        position = frames[-1].position
        assert position is not None  # only frames with a position are queued
        key = cursor_key(self._stream, position.host)

        # Atomic: entries and cursor together or neither. A reply lost after EXEC means a retry
        # adds the batch twice; the indexer absorbs duplicates, and the cursor stays right.
        async def multi() -> bool:
            async with self._redis.pipeline(transaction=True) as pipe:
                for frame in frames:
                    for _, envelope in frame.envelopes:
                        pipe.xadd(self._stream, {EVENT_FIELD: envelope})
                pipe.set(key, position.saved_value())
                await pipe.execute()
            return True

        if await self._retrying(multi) is None:
            return False
        self.saved = position
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


def _recency(position: Position) -> tuple[bool, int]:
    """Orders saved positions by event time; one without (a relay's) by its sequence."""
    if position.time_us is not None:
        return True, position.time_us
    return False, position.cursor
