"""Talking to indexer processes as operators and probes do: /metrics, /health, /ready, the CLI."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")


async def get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path; returns (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, body = await get(port, "/metrics")
    assert status == 200, body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    """One sample's value; NaN when it is absent."""
    return samples.get((name, tuple(sorted(labels.items()))), math.nan)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(
    predicate: Callable[[], Awaitable[T]], within_s: float = 20.0, step_s: float = 0.05
) -> T:
    """Poll an async predicate until it returns something truthy; return that."""
    deadline = time.monotonic() + within_s
    while True:
        result = await predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"not met within {within_s} s; last: {result!r}"
        await asyncio.sleep(step_s)


def indexer_env(settings: Any, **extra: str) -> dict[str, str]:
    """The environment of an `indexer` process pointed at a test's servers and streams."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "INDEXER_STREAMS": ",".join(settings.streams),
        "INDEXER_GROUP": settings.group,
        "METRICS_PORT": "0",
        "INDEXER_BLOCK_MS": "100",
        **extra,
    }


async def start_indexer(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "indexer.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def indexer(env: dict[str, str], *args: str, within_s: float = 60) -> tuple[int, str, str]:
    """Run `indexer ARGS` to the end: (exit code, stdout, stderr)."""
    proc = await start_indexer(env, *args)
    out, err = await asyncio.wait_for(proc.communicate(), within_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
