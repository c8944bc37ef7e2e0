"""`indexer ingest file`: JSONL (Jetstream events or envelopes, per line) onto the live stream."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import redis.asyncio as aioredis
import zstandard
from rich.console import Console
from rich.progress import Progress

from indexer.config import Settings
from indexer.constants import DEFAULT_INGEST_BATCH, EVENT_FIELD
from indexer.events import normalize_line
from indexer.stream import connect

log = logging.getLogger(__name__)

_MAX_BAD_LOGGED = 20


@dataclass(slots=True)
class IngestReport:
    added: int = 0
    bad: int = 0
    lines: int = 0


@contextmanager
def open_events(path: str) -> Iterator[BinaryIO]:
    """The byte stream of a path: `-` is stdin, `.zst` is decompressed on the fly."""
    if path == "-":
        yield sys.stdin.buffer
        return
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as raw:
        if path.endswith(".zst"):
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            yield io.BufferedReader(reader)
        else:
            yield raw


def envelopes(lines: BinaryIO, report: IngestReport) -> Iterator[bytes]:
    """Each good line as envelope JSON; a bad line is logged with its number and counted."""
    for number, line in enumerate(lines, start=1):
        report.lines = number
        line = line.strip()
        if not line:
            continue
        try:
            yield normalize_line(line)
        except (ValueError, RecursionError) as exc:
            report.bad += 1
            if report.bad <= _MAX_BAD_LOGGED:
                log.warning("line %d skipped: %s", number, str(exc)[:300])
            elif report.bad == _MAX_BAD_LOGGED + 1:
                log.warning("more bad lines; only their count is reported from here on")


async def ingest_file(
    settings: Settings, path: str, *, show_progress: bool = False
) -> IngestReport:
    """Append every event in a JSONL file to the live stream, in pipelined batches."""
    report = IngestReport()
    client = connect(settings)
    stream = settings.live_stream
    try:
        with open_events(path) as lines, _progress(path, show_progress) as advance:
            batch: list[bytes] = []
            for event in envelopes(lines, report):
                batch.append(event)
                if len(batch) >= DEFAULT_INGEST_BATCH:
                    report.added += await _append(client, stream, batch)
                    advance(len(batch))
                    batch = []
            report.added += await _append(client, stream, batch)
            advance(len(batch))
    finally:
        await client.aclose()
    return report


async def _append(client: aioredis.Redis, stream: str, batch: list[bytes]) -> int:
    if not batch:
        return 0
    async with client.pipeline(transaction=False) as pipe:
        for event in batch:
            pipe.xadd(stream, {EVENT_FIELD: event})
        await pipe.execute()
    return len(batch)


@contextmanager
def _progress(path: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A progress line on a terminal; a no-op otherwise."""
    if not enabled:
        yield lambda n: None
        return
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"ingesting {Path(path).name}", total=None)
        yield lambda n: progress.advance(task, n)
