"""Where the consumer groups stand: per stream, group and consumer, read from Redis.

`indexer lag` prints these figures, and a replica exports them as the `indexer_stream_*`
gauges, so nobody has to type `XINFO GROUPS` by hand to find a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from indexer.config import Settings
from indexer.constants import EVENT_FIELD, dlq_stream
from indexer.metrics import Metrics
from indexer.stream import checked_lag, text

log = logging.getLogger(__name__)

# When Redis cannot say a group's lag (entries were deleted after its last delivered id), or says
# more than the stream holds (entries trimmed before delivery), the entries after that id are
# counted inside Redis, a page at a time, up to this many.
LAG_COUNT_CAP = 100_000
_COUNT_AFTER = """
local n, start, cap = 0, ARGV[1], tonumber(ARGV[2])
while n < cap do
  local page = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1000)
  if #page == 0 then break end
  n = n + #page
  start = '(' .. page[#page][1]
end
return n
"""


@dataclass(frozen=True, slots=True)
class ConsumerFigures:
    name: str
    pending: int
    idle_s: float


@dataclass(slots=True)
class GroupFigures:
    """One consumer group on one stream. `behind_s` is now minus the event time of the oldest
    entry the group has not finished (or of the newest entry, when it has finished them all)."""

    stream: str
    group: str
    length: int
    dlq_length: int
    exists: bool = True
    lag: int = 0
    lag_exact: bool = True
    pending: int = 0
    oldest_pending_s: float = 0.0
    behind_s: float | None = None
    last_delivered_id: str = "0-0"
    consumers: list[ConsumerFigures] = field(default_factory=list)

    @property
    def backlog(self) -> int:
        return self.lag + self.pending

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Timed(msgspec.Struct):
    time: str = ""


_timed = msgspec.json.Decoder(_Timed)


async def collect(
    client: aioredis.Redis, streams: tuple[str, ...], group: str, *, others: bool = True
) -> list[GroupFigures]:
    """Figures of `group` on each stream (created or not), and of the streams' other groups."""
    found: list[GroupFigures] = []
    for stream in streams:
        length = int(await client.xlen(stream))
        dlq = int(await client.xlen(dlq_stream(stream)))
        infos = await client.xinfo_groups(stream) if length or await client.exists(stream) else []
        names = [text(g["name"]) for g in infos]
        for info in infos:
            if others or text(info["name"]) == group:
                found.append(await _group(client, stream, length, dlq, info))
        if group not in names:
            # Nothing delivered yet: everything in the stream is still to come.
            found.append(GroupFigures(stream, group, length, dlq, exists=False, lag=length))
    return found


async def _group(
    client: aioredis.Redis, stream: str, length: int, dlq: int, info: dict[Any, Any]
) -> GroupFigures:
    name = text(info["name"])
    figures = GroupFigures(stream, name, length, dlq)
    figures.last_delivered_id = text(info["last-delivered-id"])
    figures.pending = int(info["pending"])
    lag = await checked_lag(client, stream, figures.last_delivered_id, info.get("lag"), length)
    if lag is None:
        lag = await client.eval(
            _COUNT_AFTER, 1, stream, f"({figures.last_delivered_id}", LAG_COUNT_CAP
        )
        figures.lag_exact = int(lag) < LAG_COUNT_CAP
    figures.lag = int(lag)
    oldest_id = None
    if figures.pending:
        summary = await client.xpending(stream, name)
        oldest_id = text(summary["min"]) if summary.get("min") else None
    now = time.time()
    if oldest_id is not None:
        figures.oldest_pending_s = max(0.0, now - _id_ms(oldest_id) / 1000)
    figures.behind_s = await _behind(client, figures, oldest_id, now)
    figures.consumers = await _consumers(client, stream, name)
    return figures


async def _consumers(client: aioredis.Redis, stream: str, group: str) -> list[ConsumerFigures]:
    try:
        rows = await client.xinfo_consumers(stream, group)
    except ResponseError as exc:  # the group went away between the two calls
        if "NOGROUP" in str(exc):
            return []
        raise
    return [
        ConsumerFigures(text(r["name"]), int(r["pending"]), int(r["idle"]) / 1000) for r in rows
    ]


async def _behind(
    client: aioredis.Redis, figures: GroupFigures, oldest_pending: str | None, now: float
) -> float | None:
    """Seconds from the event time of the oldest unfinished entry (or the newest) to now."""
    stream = figures.stream
    if oldest_pending is not None:
        entries = await client.xrange(stream, oldest_pending, "+", count=1)
    elif figures.lag:
        entries = await client.xrange(stream, f"({figures.last_delivered_id}", "+", count=1)
    else:
        entries = await client.xrevrange(stream, "+", "-", count=1)
    if not entries:
        return None
    moment = _event_time(entries[0][1])
    return None if moment is None else max(0.0, now - moment)


def _event_time(fields: dict[Any, Any] | None) -> float | None:
    raw = fields.get(EVENT_FIELD) if fields else None
    if not raw:
        return None
    try:
        stamp = _timed.decode(raw).time
        return datetime.fromisoformat(stamp).timestamp() if stamp else None
    except (msgspec.DecodeError, ValueError):
        return None


def publish(metrics: Metrics, figures: list[GroupFigures]) -> None:
    """Set the `indexer_stream_*` and `indexer_dlq_length` gauges (one group's figures)."""
    for f in figures:
        metrics.stream_length.labels(f.stream).set(f.length)
        metrics.stream_lag.labels(f.stream).set(f.lag)
        metrics.stream_pending.labels(f.stream).set(f.pending)
        metrics.stream_oldest_pending.labels(f.stream).set(f.oldest_pending_s)
        metrics.stream_consumers.labels(f.stream).set(len(f.consumers))
        metrics.dlq_length.labels(f.stream).set(f.dlq_length)


def over_limits(
    figures: list[GroupFigures], max_lag: int | None, max_age_s: float | None
) -> list[str]:
    """What exceeds the limits, one line per group and limit (empty: all within); the age limit
    applies only to a group with lag or pending entries."""
    over = []
    for f in figures:
        where = f"{f.stream}/{f.group}"
        if max_lag is not None and f.lag > max_lag:
            over.append(f"{where}: lag {f.lag} > {max_lag}")
        # A group with nothing left to do is not behind, however old the newest entry is.
        if max_age_s is not None and f.backlog:
            if f.oldest_pending_s > max_age_s:
                over.append(f"{where}: oldest pending {f.oldest_pending_s:.0f} s > {max_age_s} s")
            if f.behind_s is not None and f.behind_s > max_age_s:
                over.append(f"{where}: {f.behind_s:.0f} s behind the network > {max_age_s} s")
    return over


def render(figures: list[GroupFigures], over: list[str]) -> Group:
    """A table per group and one of consumers, for the terminal."""
    groups = Table(title="stream groups", title_justify="left")
    for heading in ("stream", "group", "length", "lag", "pending", "oldest pending", "behind",
                    "consumers", "dlq"):  # fmt: skip
        groups.add_column(heading, justify="left" if heading in ("stream", "group") else "right")
    consumers = Table(title="consumers", title_justify="left")
    for heading in ("stream", "group", "consumer", "pending", "idle"):
        consumers.add_column(heading, justify="right" if heading in ("pending", "idle") else "left")
    for f in figures:
        lag = f"{f.lag}" if f.lag_exact else f">={f.lag}"
        group = f.group if f.exists else f"{f.group} (not created)"
        groups.add_row(
            f.stream, group, f"{f.length}", lag, f"{f.pending}", _age(f.oldest_pending_s),
            _age(f.behind_s), f"{len(f.consumers)}", f"{f.dlq_length}",
        )  # fmt: skip
        for c in f.consumers:
            consumers.add_row(f.stream, f.group, c.name, f"{c.pending}", _age(c.idle_s))
    parts: list[Any] = [groups]
    if consumers.row_count:
        parts.append(consumers)
    parts.extend(f"[bold red]over limit:[/] {line}" for line in over)
    return Group(*parts)


def _age(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _id_ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


async def report(
    client: aioredis.Redis,
    settings: Settings,
    *,
    json_out: bool,
    watch_s: float | None,
    max_lag: int | None,
    max_age_s: float | None,
) -> int:
    """`indexer lag`: print the figures once, or every `watch_s` until interrupted; returns the
    exit code (1 when the last round was over a limit)."""
    console = Console(stderr=False)
    stop = asyncio.Event()
    if watch_s is not None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    live: Live | None = None
    over: list[str] = []
    try:
        while True:
            figures = await collect(client, settings.streams, settings.group)
            over = over_limits(figures, max_lag, max_age_s)
            if json_out:
                doc = {"groups": [f.to_json() for f in figures], "over_limits": over}
                sys.stdout.write(json.dumps(doc) + "\n")
                sys.stdout.flush()
            elif watch_s is None:
                console.print(render(figures, over))
            elif live is None:
                live = Live(render(figures, over), console=console, auto_refresh=False)
                live.start()
            else:
                live.update(render(figures, over), refresh=True)
            if watch_s is None:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), watch_s)
            if stop.is_set():
                break
    finally:
        if live is not None:
            live.stop()
    for line in over:
        log.warning("over limit: %s", line)
    return 1 if over else 0
