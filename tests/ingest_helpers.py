"""For the ingester tests: settings on the throwaway Redis, running an ingester, reading back."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis

from indexer.config import Settings
from indexer.events import normalize_line
from indexer.ingester import Ingester, IngesterMetrics
from indexer.source import Source
from indexer.workload import generate

_counter = itertools.count()


def ingest_settings(redis_url: str, **changes: Any) -> Settings:
    """Settings with fresh stream keys, quick reconnects and a short rewind."""
    prefix = f"i{next(_counter)}_{uuid.uuid4().hex[:6]}"
    base = Settings(
        redis_url=redis_url,
        streams=(f"{prefix}_live", f"{prefix}_backfill"),
        group=f"{prefix}_group",
        consumer="test-ingester",
        metrics_port=0,
        ingester_backoff_s=0.02,
        ingester_stall_timeout_s=5.0,
        jetstream_rewind_s=0.5,
        shutdown_grace_s=5.0,
    )
    return base.replace(**changes)


def workload(n: int, seed: int = 11) -> list[dict[str, Any]]:
    return [msgspec.json.decode(e) for e in generate(n, seed=seed)]


def envelopes_of(events: list[dict[str, Any]], first_seq: int | None = None) -> list[bytes]:
    """What `indexer ingest file` makes of the events: the stream content expected.

    With `first_seq`, as a Jetstream v2 server numbering them from there sends them."""
    if first_seq is not None:
        events = [e | {"cursor": seq} for seq, e in enumerate(events, start=first_seq)]
    return [normalize_line(msgspec.json.encode(e)) for e in events]


def without_seq(entries: list[bytes]) -> set[bytes]:
    """Envelopes as a set, their `seq` left out: two Jetstream v2 hosts number events apart."""
    out = set()
    for entry in entries:
        envelope = msgspec.json.decode(entry)
        envelope.pop("seq")
        out.add(msgspec.json.encode(envelope))
    return out


async def stream_entries(client: aioredis.Redis, stream: str) -> list[bytes]:
    """Every entry's `event` field, in stream order."""
    out: list[bytes] = []
    start = "-"
    while True:
        batch = await client.xrange(stream, start, "+", count=5000)
        out += [fields[b"event"] for _, fields in batch]
        if len(batch) < 5000:
            return out
        start = "(" + batch[-1][0].decode()


async def until(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0, what: str = "condition"
) -> None:
    """Poll `check` until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def sample(metrics: IngesterMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def running(
    settings: Settings, source: Source, **options: Any
) -> AsyncIterator[tuple[Ingester, IngesterMetrics]]:
    """An ingester running in this event loop; stopped (and its errors raised) on exit."""
    metrics = IngesterMetrics(source.name)
    ingester = Ingester(settings, source, metrics, **options)
    task = asyncio.create_task(ingester.run())
    try:
        yield ingester, metrics
    finally:
        ingester.stop()
        await asyncio.wait_for(task, 15)


def cli_env(settings: Settings, **variables: str) -> dict[str, str]:
    """The environment of an `indexer ingest` process: these settings and nothing inherited."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "REDIS_URL": settings.redis_url,
        "INDEXER_STREAMS": ",".join(settings.streams),
        "INDEXER_GROUP": settings.group,
        "METRICS_PORT": "0",
        "JETSTREAM_REWIND_S": "0.5",
        "INGESTER_BACKOFF_S": "0.05",
        **variables,
    }


async def start_cli(env: dict[str, str], source: str, *args: str) -> asyncio.subprocess.Process:
    """`indexer ingest SOURCE ARGS...` as a process, its output piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "indexer.cli", "ingest", source, *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


def length_at_least(client: aioredis.Redis, stream: str, n: int) -> Callable[[], Awaitable[bool]]:
    """A check for `until`: the stream holds at least `n` entries."""

    async def check() -> bool:
        return int(await client.xlen(stream)) >= n

    return check


async def kill_9_repeatedly(
    client: aioredis.Redis,
    env: dict[str, str],
    source: str,
    key: str,
    *,
    kills: int,
    step: int,
    total: int,
    stream: str,
) -> tuple[str, str, int | None]:
    """`indexer ingest SOURCE` killed with SIGKILL `kills` times, each after `step` more
    entries, the saved cursor checked against the last entry each time; then run until the
    stream holds `total` entries and stopped with SIGTERM. Returns (stdout, stderr, exit code)."""
    for _ in range(kills):
        before = await client.xlen(stream)
        proc = await start_cli(env, source)
        await until(length_at_least(client, stream, before + step), what="progress")
        proc.kill()
        await proc.wait()
        last = msgspec.json.decode((await client.xrevrange(stream, count=1))[0][1][b"event"])
        assert int(await client.get(key)) == last["seq"]  # never ahead, never behind
        assert await client.xlen(stream) < total  # killed mid-stream
    proc = await start_cli(env, source)
    await until(length_at_least(client, stream, total), what="all events")
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    return out.decode(), err.decode(), proc.returncode
