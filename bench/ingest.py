"""Ingest throughput: events/s from the fake Jetstream and relay on loopback into Redis.

    python -m bench.ingest [--events N] [--seed S] [--no-write]

For each source (Jetstream JSON, Jetstream zstd, relay DAG-CBOR/CAR frames) a fake server runs
in a process of its own with every message encoded beforehand, and the real `indexer ingest ...`
command (uvloop) reads it into a fresh stream of a throwaway Redis. events/s = entries added /
seconds from the first entry to the last (start-up and connecting are not counted). The baseline,
measured in the same run, is a raw pipelined XADD of the same envelopes in batches of 1000 from
this process: each source's ratio to it is the share of Redis's own rate the ingester reaches.
Everything shares the machine's cores (the server, the ingester and Redis), so the ingester's
CPU time per event is reported too: the figure least moved by what else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection

import redis.asyncio as aioredis

from bench.procs import (
    code_version,
    cpu_model,
    indexer_env,
    indexer_executable,
    mem_total_gib,
    tree_cpu_s,
)
from bench.report import publish
from indexer.devservers import throwaway_redis
from indexer.events import normalize_line
from indexer.workload import generate

SOURCES = ("jetstream-json", "jetstream-zstd", "relay-cbor")
XADD_BATCH = 1000
TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    events: int
    seconds: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def _serve(source: str, events: int, seed: int, pipe: Connection) -> None:
    """A fake server in this (child) process: prepare every message, send the URL, serve."""
    from tests.fake_jetstream import FakeJetstream, FakeServer
    from tests.fake_relay import FakeRelay

    async def serve() -> None:
        generated = list(generate(events, seed))
        server: FakeServer
        if source == "relay-cbor":
            server = FakeRelay(generated)
        else:
            fake = FakeJetstream(generated)
            fake.prepare(compress=source == "jetstream-zstd")
            server = fake
        await server.start()
        url = server.url.removesuffix(FakeRelay.path) if source == "relay-cbor" else server.url
        pipe.send(url)
        await asyncio.Event().wait()

    asyncio.run(serve())


async def _measure(source: str, opts: argparse.Namespace, redis_url: str) -> Result:
    """One source: its fake server, then `indexer ingest` until every event is in the stream."""
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(source, opts.events, opts.seed, child), daemon=True
    )
    server.start()
    stream = f"bench_ingest_{source}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        url = await asyncio.to_thread(parent.recv)
        env = indexer_env({"REDIS_URL": redis_url, "INDEXER_STREAMS": stream, "METRICS_PORT": "0"})
        kind = "relay" if source == "relay-cbor" else "jetstream"
        args = [indexer_executable(), "ingest", kind, "--url", url]
        if kind == "jetstream":
            args.append("--compress" if source == "jetstream-zstd" else "--no-compress")
        ingester = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            return await _timed(source, client, stream, opts.events, ingester)
        finally:
            ingester.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(ingester.communicate(), 30)
            if ingester.returncode != 0:
                raise RuntimeError(
                    f"{source}: ingester exited {ingester.returncode}: {err[-500:]!r}"
                )
    finally:
        await client.delete(stream)
        await client.aclose()
        server.terminate()
        server.join()


async def _timed(
    source: str, client: aioredis.Redis, stream: str, events: int, proc: asyncio.subprocess.Process
) -> Result:
    """Seconds and CPU from the first entry to the last."""
    deadline = time.monotonic() + TIMEOUT_S
    while (first := int(await client.xlen(stream))) == 0:
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{source}: nothing arrived")
        await asyncio.sleep(0.002)
    started, cpu_before = time.perf_counter(), tree_cpu_s(proc.pid)
    while (length := int(await client.xlen(stream))) < events:
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{source}: {length} of {events} entries arrived")
        await asyncio.sleep(0.005)
    seconds = time.perf_counter() - started
    return Result(source, events - first, seconds, tree_cpu_s(proc.pid) - cpu_before)


async def xadd_envelopes(client: aioredis.Redis, stream: str, envelopes: list[bytes]) -> None:
    """Add stream envelopes as `indexer ingest` writes them: pipelined XADD, XADD_BATCH a time."""
    for start in range(0, len(envelopes), XADD_BATCH):
        async with client.pipeline(transaction=False) as pipe:
            for envelope in envelopes[start : start + XADD_BATCH]:
                pipe.xadd(stream, {b"event": envelope})
            await pipe.execute()


async def _raw_xadd(opts: argparse.Namespace, redis_url: str) -> Result:
    """Redis's own rate for the same envelopes: pipelined XADD from this process."""
    envelopes = [normalize_line(e) for e in generate(opts.events, opts.seed)]
    client = aioredis.Redis.from_url(redis_url)
    stream = "bench_ingest_raw"
    started, cpu_before = time.perf_counter(), time.process_time()
    try:
        await xadd_envelopes(client, stream, envelopes)
        seconds = time.perf_counter() - started
    finally:
        await client.delete(stream)
        await client.aclose()
    return Result("raw pipelined XADD", len(envelopes), seconds, time.process_time() - cpu_before)


async def _run(opts: argparse.Namespace) -> list[Result]:
    with throwaway_redis() as redis_server:
        results = [await _raw_xadd(opts, redis_server.url)]
        for source in SOURCES:
            results.append(await _measure(source, opts, redis_server.url))
            print(f"{source}: {results[-1].rate:,.0f} events/s", file=sys.stderr)
        return results


def _markdown(opts: argparse.Namespace, results: list[Result]) -> str:
    raw = results[0]
    lines = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: ingest, {opts.events:,} events",
        "",
        f"- machine: {os.cpu_count()} x {cpu_model()}, {mem_total_gib():.1f} GiB RAM "
        "(cores shared by the fake server, the ingester and Redis)",
        f"- code: {code_version()}; `python -m bench.ingest --events {opts.events}` "
        f"(seed {opts.seed}); loopback only",
        "",
        "| Source | Events | Seconds | Events/s | ÷ raw XADD | Ingester CPU s | CPU µs/event |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.events:,} | {r.seconds:.2f} | {r.rate:,.0f} | "
            f"{r.rate / raw.rate:.2f} | {r.cpu_s:.1f} | {r.cpu_s / r.events * 1e6:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    opts = parser.parse_args(argv)
    results = asyncio.run(_run(opts))
    section = _markdown(opts, results)
    publish(section, write=not opts.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
