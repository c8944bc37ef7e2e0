"""The dead-letter streams (`<stream>:dlq`): list, show, retry and drop what landed there.

Each dead-letter entry holds the original `event` bytes, the reason, the original stream and
id, the delivery count, the consumer and the time. Retrying puts the event back on its stream
and removes it from the dead-letter stream in one MULTI, so an entry is never in neither place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from indexer.constants import EVENT_FIELD, dlq_stream

_CHUNK = 500


class NotFound(LookupError):
    """No dead-letter entry has that id (or it is ambiguous); the message says which."""


@dataclass(frozen=True, slots=True)
class DeadEntry:
    dlq: str
    id: str
    stream: str
    original_id: str
    reason: str
    deliveries: int
    consumer: str
    time: str
    event: bytes | None

    def summary(self) -> dict[str, Any]:
        """Everything but the event, for tables and `--json`."""
        return {
            "dlq": self.dlq,
            "id": self.id,
            "stream": self.stream,
            "original_id": self.original_id,
            "reason": self.reason,
            "deliveries": self.deliveries,
            "consumer": self.consumer,
            "time": self.time,
        }

    def detail(self) -> dict[str, Any]:
        event = self.event.decode("utf-8", "replace") if self.event is not None else None
        return self.summary() | {"event": event}


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""


async def _range(
    client: aioredis.Redis, dlq: str, start: str, end: str, count: int | None
) -> list[DeadEntry]:
    rows: Any = await client.xrange(dlq, start, end, count=count)
    return [_parse(dlq, entry_id, fields or {}) for entry_id, fields in rows or []]


def _parse(dlq: str, entry_id: Any, fields: dict[Any, Any]) -> DeadEntry:
    stamp = _text(fields.get(b"time"))
    try:
        when = datetime.fromtimestamp(float(stamp), UTC).isoformat(timespec="seconds")
    except ValueError:
        when = stamp
    deliveries = _text(fields.get(b"deliveries"))
    return DeadEntry(
        dlq=dlq,
        id=_text(entry_id),
        stream=_text(fields.get(b"stream")) or dlq.removesuffix(":dlq"),
        original_id=_text(fields.get(b"id")),
        reason=_text(fields.get(b"reason")),
        deliveries=int(deliveries) if deliveries.isdigit() else 0,
        consumer=_text(fields.get(b"consumer")),
        time=when,
        event=fields.get(EVENT_FIELD) or None,
    )


async def lengths(client: aioredis.Redis, streams: tuple[str, ...]) -> dict[str, int]:
    """Entries in each stream's dead-letter stream."""
    return {dlq_stream(s): int(await client.xlen(dlq_stream(s))) for s in streams}


async def list_dead(
    client: aioredis.Redis, streams: tuple[str, ...], limit: int
) -> list[DeadEntry]:
    """The oldest `limit` entries of each stream's dead-letter stream."""
    found = []
    for stream in streams:
        found += await _range(client, dlq_stream(stream), "-", "+", limit)
    return found


async def find(client: aioredis.Redis, streams: tuple[str, ...], entry_id: str) -> DeadEntry:
    """The dead-letter entry with this id, in whichever stream's dead-letter stream holds it."""
    found = []
    for stream in streams:
        try:
            found += await _range(client, dlq_stream(stream), entry_id, entry_id, None)
        except ResponseError:
            raise NotFound(f"not a stream entry id: {entry_id!r}") from None
    if not found:
        raise NotFound(f"no dead-letter entry {entry_id} in {', '.join(map(dlq_stream, streams))}")
    if len(found) > 1:
        raise NotFound(f"{entry_id} is in {len(found)} dead-letter streams: pass --stream")
    return found[0]


async def retry(client: aioredis.Redis, entries: list[DeadEntry]) -> list[str]:
    """Put the events back on their streams and remove them from the dead-letter streams."""
    for entry in entries:
        if entry.event is None:
            raise NotFound(f"{entry.id} holds no event to retry; drop it instead")
    async with client.pipeline(transaction=True) as pipe:
        for entry in entries:
            pipe.xadd(entry.stream, {EVENT_FIELD: entry.event or b""})
            pipe.xdel(entry.dlq, entry.id)
        replies = await pipe.execute()
    return [_text(new_id) for new_id in replies[::2]]


async def retry_all(client: aioredis.Redis, streams: tuple[str, ...]) -> tuple[int, int]:
    """Retry every entry of the dead-letter streams, a chunk per MULTI; returns how many were
    retried and how many were left in place because they hold no event."""
    moved = kept = 0
    for stream in streams:
        dlq = dlq_stream(stream)
        newest: Any = await client.xrevrange(dlq, count=1)
        if not newest:
            continue
        # Up to the newest entry at the start only: an entry that fails again is dead-lettered
        # anew, after it, and must not be retried again in the same run.
        end = _text(newest[0][0])
        start = "-"
        while entries := await _range(client, dlq, start, end, _CHUNK):
            usable = [e for e in entries if e.event is not None]
            kept += len(entries) - len(usable)
            if usable:
                moved += len(await retry(client, usable))
            start = f"({entries[-1].id}"
    return moved, kept


async def drop(client: aioredis.Redis, entry: DeadEntry) -> None:
    await client.xdel(entry.dlq, entry.id)
