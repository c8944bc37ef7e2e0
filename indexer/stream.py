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


@dataclass(frozen=True, slots=True)
class GroupState:
    stream: str
    length: int
    lag: int
    pending: int
    consumers: int


def connect(settings: Settings) -> aioredis.Redis:
    """A client for REDIS_URL (`rediss://` works as the URL says); bytes in, bytes out."""
    return aioredis.Redis.from_url(
        settings.redis_url, decode_responses=False, health_check_interval=30
    )


class StreamConsumer:
    """Reads one consumer's share of the group's streams, live stream first."""

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self._settings = settings
        self._redis = client
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
        reply = await self._redis.xreadgroup(self._group, self._consumer, {stream: after}, count)
        return _entries(reply)

    async def read_new(self, count: int, block_ms: int) -> list[Entry]:
        """New entries: the live stream first; the others only when it has nothing waiting."""
        streams = self._settings.streams
        reply = await self._redis.xreadgroup(self._group, self._consumer, {streams[0]: ">"}, count)
        if reply:
            return _entries(reply)
        # Every entry returned is now pending on us, so all of them are processed, even when
        # several streams answer at once.
        reply = await self._redis.xreadgroup(
            self._group,
            self._consumer,
            dict.fromkeys(streams, ">"),
            count,
            block=block_ms if block_ms > 0 else None,
        )
        return _entries(reply)

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
            lag = mine.get("lag")
            if lag is None:
                lag = await self._lag_from_ids(stream, _text(mine["last-delivered-id"]))
            states.append(
                GroupState(stream, length, int(lag), int(mine["pending"]), int(mine["consumers"]))
            )
        return states

    async def last_delivered_ids(self) -> dict[str, str]:
        """Per stream, the last id the group has delivered (to any consumer)."""
        found = {}
        for stream in self._settings.streams:
            mine = await self._group_info(stream)
            found[stream] = _text(mine["last-delivered-id"]) if mine else "0-0"
        return found

    async def _group_info(self, stream: str) -> dict[Any, Any] | None:
        """Our group's entry in XINFO GROUPS of a stream, or None if it has no such group."""
        groups = await self._redis.xinfo_groups(stream)
        return next((g for g in groups if _text(g["name"]) == self._group), None)

    async def _lag_from_ids(self, stream: str, last_delivered: str) -> int:
        """For when Redis cannot say: 1 if any entry follows the last delivered id, else 0.

        A lower bound, read without loading the backlog (enough to tell drained from not).
        """
        return len(await self._redis.xrange(stream, f"({last_delivered}", "+", count=1) or [])

    async def drained(self) -> bool:
        """True once the group has delivered everything and nothing is pending."""
        return all(s.lag == 0 and s.pending == 0 for s in await self.group_states())


def stream_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a comparable (milliseconds, sequence) pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> list[Entry]:
    entries = []
    for stream, messages in reply or []:
        name = _text(stream)
        for entry_id, fields in messages:
            raw = fields.get(EVENT_FIELD) if fields else None
            entries.append(Entry(name, _text(entry_id), raw))
    return entries
