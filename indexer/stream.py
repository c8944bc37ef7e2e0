"""The Redis side of a replica: the consumer group, reading batches, ACK and dead-lettering."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from indexer.config import Settings
from indexer.constants import EVENT_FIELD, dlq_stream
from indexer.pipeline import Entry

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 10.0
_REPLY_MARGIN_S = 30.0  # beyond block_ms: a big XRANGE or a slow Lua script still answers


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """An entry delivered to a consumer and not yet ACKed (one row of XPENDING)."""

    id: str
    consumer: str
    idle_ms: int
    deliveries: int


# Removes a consumer only if it holds nothing: deleting a consumer drops its pending entries,
# so the check and the delete must be one atomic step.
_DELETE_IF_EMPTY = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""
# The claim and touch scripts call no command Redis refuses when out of memory (a replica that
# could not touch its batches then would see them claimed away; a test holds them to it).
# Claim (XCLAIM, with its min-idle) those ids still pending on the consumer that held them when
# the pending list was read (ARGV: group, claimant, min idle ms, then id and holder pairs); an
# entry another replica claimed meanwhile stays with it. Returns XCLAIM's entries.
_CLAIM_IF_HELD = """
local ids = {}
for i = 4, #ARGV, 2 do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #entry > 0 and entry[1][2] == ARGV[i + 1] then ids[#ids + 1] = ARGV[i] end
end
local out = {}
for i = 1, #ids, 1000 do
  local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3]}
  for j = i, math.min(i + 999, #ids) do args[#args + 1] = ids[j] end
  for _, claimed in ipairs(redis.call(unpack(args))) do out[#out + 1] = claimed end
end
return out
"""
# Reset the idle time of those ids still pending on this consumer (ARGV: group, consumer, ids),
# and only those: an entry another replica has claimed meanwhile stays with it.
_TOUCH_IF_MINE = """
local mine = {}
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #entry > 0 and entry[1][2] == ARGV[2] then mine[#mine + 1] = ARGV[i] end
end
for i = 1, #mine, 1000 do
  local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
  for j = i, math.min(i + 999, #mine) do args[#args + 1] = mine[j] end
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
end
return #mine
"""


@dataclass(frozen=True, slots=True)
class GroupState:
    stream: str
    length: int
    lag: int
    pending: int
    consumers: int


def connect(settings: Settings) -> aioredis.Redis:
    """A client for REDIS_URL (`rediss://` works as the URL says); bytes in, bytes out."""
    # Timeouts so that a half-open connection (a host gone, a partition) fails in seconds, not
    # in the kernel's quarter of an hour; reads block at most block_ms, so allow for that.
    return aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=False,
        health_check_interval=30,
        socket_connect_timeout=_CONNECT_TIMEOUT_S,
        socket_timeout=settings.block_ms / 1000 + _REPLY_MARGIN_S,
        socket_keepalive=True,
    )


class StreamConsumer:
    """Reads one consumer's share of the group's streams, live stream first."""

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self._settings = settings
        self._redis = client
        # XREADGROUP's replies as the server sends them, for `_entries` (redis-py would build a
        # dict per entry, after turning RESP3's map into RESP2's list): through a client of our
        # own over the same connections, so the caller's client keeps redis-py's replies.
        self._reader = aioredis.Redis(connection_pool=client.connection_pool)
        self._reader.set_response_callback("XREADGROUP", _reply_as_sent)
        self._group = settings.group
        self._consumer = settings.consumer

    async def ensure_groups(self) -> None:
        """Create the group on every stream (and the stream itself) when missing."""
        for stream in self._settings.streams:
            try:
                await self._redis.xgroup_create(stream, self._group, id="0", mkstream=True)
                log.info("created group %s on %s", self._group, stream)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read_pending(self, stream: str, after: str, count: int) -> list[Entry]:
        """This consumer's own pending entries on a stream after an id (unfinished work)."""
        reply = await self._reader.xreadgroup(self._group, self._consumer, {stream: after}, count)
        return _entries(reply)

    async def read_new(self, count: int, block_ms: int) -> list[Entry]:
        """New entries: the live stream first; the others only when it has nothing waiting."""
        streams = self._settings.streams
        reply = await self._reader.xreadgroup(self._group, self._consumer, {streams[0]: ">"}, count)
        if reply:
            return _entries(reply)
        # Every entry returned is now pending on us, so all of them are processed, even when
        # several streams answer at once.
        reply = await self._reader.xreadgroup(
            self._group,
            self._consumer,
            dict.fromkeys(streams, ">"),
            count,
            block=block_ms if block_ms > 0 else None,
        )
        return _entries(reply)

    async def idle_pending(
        self, stream: str, min_idle_ms: int, count: int, consumer: str | None = None
    ) -> list[PendingEntry]:
        """Pending entries idle for `min_idle_ms` or more (of one consumer or all), oldest first."""
        rows = await self._redis.xpending_range(
            stream, self._group, "-", "+", count, consumername=consumer, idle=min_idle_ms or None
        )
        return [
            PendingEntry(
                text(r["message_id"]),
                text(r["consumer"]),
                int(r["time_since_delivered"]),
                int(r["times_delivered"]),
            )
            for r in rows
        ]

    async def claim(
        self, stream: str, pending: list[PendingEntry], min_idle_ms: int
    ) -> list[Entry]:
        """Take entries over (XCLAIM); each counts one more delivery. Only those still pending
        on the consumer that held them in `pending` and idle for `min_idle_ms`: an entry another
        replica claimed meanwhile, or one that is gone, is not returned."""
        if not pending:
            return []
        holders = [part for p in pending for part in (p.id, p.consumer)]
        reply = await self._redis.eval(
            _CLAIM_IF_HELD, 1, stream, self._group, self._consumer, min_idle_ms, *holders
        )
        deliveries = {p.id: p.deliveries + 1 for p in pending}
        entries = _entries([(stream, reply)])
        for entry in entries:
            entry.deliveries = deliveries.get(entry.id, 1)
        return entries

    async def touch(self, stream: str, ids: list[str]) -> int:
        """Reset the idle time of entries this consumer is working on, so that no other replica
        claims work in progress (JUSTID counts no delivery). An entry another replica claimed
        meanwhile is left with it; returns how many were touched."""
        if not ids:
            return 0
        touched = await self._redis.eval(
            _TOUCH_IF_MINE, 1, stream, self._group, self._consumer, *ids
        )
        return int(touched)

    async def remove_consumer(self, stream: str, consumer: str) -> bool:
        """Delete a consumer from the group if, and only if, nothing is pending on it."""
        result = await self._redis.eval(_DELETE_IF_EMPTY, 1, stream, self._group, consumer)
        return int(result) >= 0

    async def consumers(self, stream: str) -> list[tuple[str, int, int]]:
        """(name, pending, idle ms) of each consumer of the group on a stream."""
        try:
            rows = await self._redis.xinfo_consumers(stream, self._group)
        except ResponseError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc):
                return []
            raise
        return [(text(r["name"]), int(r["pending"]), int(r["idle"])) for r in rows]

    async def trim(self, stream: str) -> str | None:
        """Trim the stream below the oldest entry that some group still has pending or has not
        been delivered yet; returns the boundary id, or None when nothing may be trimmed."""
        groups = await self._redis.xinfo_groups(stream)
        if not groups:
            return None  # nobody reads it yet: everything is still to come
        keep: list[tuple[int, int]] = []
        for group in groups:
            oldest = None
            if int(group["pending"]):
                summary = await self._redis.xpending(stream, group["name"])
                oldest = summary.get("min")
            if oldest is not None:
                keep.append(stream_id(text(oldest)))
            else:
                ms, seq = stream_id(text(group["last-delivered-id"]))
                keep.append((ms, seq + 1))
        ms, seq = min(keep)
        boundary = f"{ms}-{seq}"
        # `~` trims whole macro nodes only: never more than asked, cheaply.
        await self._redis.xtrim(stream, minid=boundary, approximate=True)
        return boundary

    async def settle(self, done: list[Entry], dead: list[tuple[Entry, str]]) -> None:
        """ACK what committed and dead-letter what cannot be indexed, in one MULTI."""
        if not done and not dead:
            return
        now = str(time.time())
        async with self._redis.pipeline(transaction=True) as pipe:
            for entry, reason in dead:
                pipe.xadd(
                    dlq_stream(entry.stream),
                    {
                        "event": entry.raw or b"",
                        "reason": reason[:2000],
                        "stream": entry.stream,
                        "id": entry.id,
                        "consumer": self._consumer,
                        "deliveries": entry.deliveries,
                        "time": now,
                    },
                )
            by_stream: dict[str, list[str]] = {}
            for entry in [*done, *(e for e, _ in dead)]:
                by_stream.setdefault(entry.stream, []).append(entry.id)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self._group, *ids)
            await pipe.execute()

    async def group_states(self) -> list[GroupState]:
        states = []
        for stream in self._settings.streams:
            length = await self._redis.xlen(stream)
            mine = await self._group_info(stream)
            if mine is None:
                states.append(GroupState(stream, length, length, 0, 0))
                continue
            last_delivered = text(mine["last-delivered-id"])
            lag = await checked_lag(self._redis, stream, last_delivered, mine.get("lag"), length)
            if lag is None:
                lag = await self._lag_from_ids(stream, last_delivered)
            states.append(
                GroupState(stream, length, int(lag), int(mine["pending"]), int(mine["consumers"]))
            )
        return states

    async def last_delivered_ids(self) -> dict[str, str]:
        """Per stream, the last id the group has delivered (to any consumer)."""
        found = {}
        for stream in self._settings.streams:
            mine = await self._group_info(stream)
            found[stream] = text(mine["last-delivered-id"]) if mine else "0-0"
        return found

    async def _group_info(self, stream: str) -> dict[Any, Any] | None:
        """Our group's entry in XINFO GROUPS of a stream, or None if it has no such group."""
        groups = await self._redis.xinfo_groups(stream)
        return next((g for g in groups if text(g["name"]) == self._group), None)

    async def _lag_from_ids(self, stream: str, last_delivered: str) -> int:
        """For when Redis cannot say: 1 if any entry follows the last delivered id, else 0.

        A lower bound, read without loading the backlog (enough to tell drained from not).
        """
        return len(await self._redis.xrange(stream, f"({last_delivered}", "+", count=1) or [])

    async def drained(self) -> bool:
        """True once the group has delivered everything and nothing is pending."""
        return all(s.lag == 0 and s.pending == 0 for s in await self.group_states())


async def checked_lag(
    client: aioredis.Redis, stream: str, last_delivered: str, reported: Any, length: int
) -> int | None:
    """A group's lag as XINFO GROUPS reports it, checked against the stream; None when it must
    be counted from ids instead (Redis cannot say, or says more than could follow).

    Redis 7.0 counts entries trimmed before the group read them (a foreign XTRIM MAXLEN) as lag
    forever, so a positive figure is trusted only while some entry follows the last delivered
    id and the figure fits in the stream: one XRANGE of one entry per call.
    """
    if reported is None:
        return None
    if int(reported) <= 0:
        return 0
    if not await client.xrange(stream, f"({last_delivered}", "+", count=1):
        return 0
    return int(reported) if int(reported) <= length else None


async def group_backlog(client: aioredis.Redis, stream: str, group: str) -> int:
    """Entries the group has yet to finish on a stream (lag + pending); the stream's length
    when it has no such group or Redis's lag cannot be trusted."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        length, groups = await pipe.execute(raise_on_error=False)
    if isinstance(length, Exception):
        raise length
    backlog = int(length)
    if not isinstance(groups, ResponseError):  # no such stream yet: no group either
        mine = next((g for g in groups if text(g["name"]) == group), None)
        if mine is not None:
            last_delivered = text(mine["last-delivered-id"])
            lag = await checked_lag(client, stream, last_delivered, mine.get("lag"), backlog)
            if lag is not None:
                backlog = lag + int(mine["pending"])
    return backlog


def stream_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a comparable (milliseconds, sequence) pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def text(value: Any) -> str:
    """A Redis reply value (bytes, or already text) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _reply_as_sent(response: Any, **options: Any) -> Any:
    return response


def _entries(reply: Any) -> list[Entry]:
    """Entries of an XREADGROUP reply as sent: RESP3's map or RESP2's list of (stream,
    messages), each message an id and its flat field list [k1, v1, ...] (None for an entry
    deleted while pending), as XCLAIM returns them too."""
    entries = []
    for stream, messages in reply.items() if isinstance(reply, dict) else reply or ():
        name = text(stream)
        for entry_id, flat in messages:
            raw = None
            if flat:  # the event field, wherever it stands among the fields
                for i in range(0, len(flat) - 1, 2):
                    if flat[i] == EVENT_FIELD:
                        raw = flat[i + 1]
                        break
            entries.append(Entry(name, text(entry_id), raw))
    return entries
