"""Backfill throughput beside a live stream: records/s backfilled, and the live lag meanwhile.

    python -m bench.backfill [--repos N] [--records N] [--pdses N] [--live-rate EV_S]
                             [--replicas N] [--seed S] [--no-write]

A fake PLC, PDSes and relay (tests/fake_pds.py, real repo CARs) serve generated repos from a
process of their own; the real `indexer backfill all` fetches every repo into the backfill
stream while this process adds live events (the network's mix, indexer.workload) to the live
stream at `--live-rate` events/s, and `--replicas` real `indexer run` processes index both,
against throwaway Redis and PostgreSQL. Reported, side by side in one run:
- backfill records/s: records of the repos / seconds from the backfill's start until the last
  backfill entry is indexed (fetching, walking, adding and indexing, all on these cores);
- live: events offered and indexed per second, and the live lag sampled every 0.25 s while the
  backfill runs: entries (lag + pending) and seconds (now minus the add time of the oldest live
  entry not yet ACKed).
Loopback only. Results are printed and appended to bench/RESULTS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

import redis.asyncio as aioredis

from bench.procs import code_version, cpu_model, indexer_env, indexer_executable, mem_total_gib
from bench.report import publish
from indexer.devservers import throwaway_postgres, throwaway_redis
from indexer.events import normalize_line
from indexer.migrate import migrate
from indexer.stream import group_backlog, text
from indexer.workload import generate

LIVE, BACKFILL, GROUP, DB = "bench_live", "bench_backfill", "bench", "bench_backfill"
SAMPLE_S = 0.25
TIMEOUT_S = 1800.0


@dataclass(slots=True)
class Samples:
    lag_entries: list[int] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Result:
    records: int
    backfill_s: float
    live_offered: int
    live_offered_s: float
    live_drain_s: float  # from the feed's stop to the last live event ACKed
    samples: Samples

    @property
    def backfill_rate(self) -> float:
        return self.records / self.backfill_s


def _serve(opts: argparse.Namespace, pipe: Connection) -> None:
    """The fake network in this (child) process: build the repos, send the URLs, serve."""
    from tests.fake_pds import make_network

    network = make_network(opts.repos, opts.records, n_pdses=opts.pdses, seed=opts.seed)
    for repo in network.repos.values():
        repo.snapshot()  # every CAR built before the clock starts
    network.start()
    records = sum(len(repo.records) for repo in network.repos.values())
    pipe.send((network.plc.url, network.relay.url, records))
    threading.Event().wait()  # until the parent terminates this process


async def _oldest_unacked_s(client: aioredis.Redis) -> float:
    """Now minus the add time of the oldest live entry the group has not ACKed (0 if none)."""
    pending = await client.xpending(LIVE, GROUP)
    oldest: str | None = text(pending["min"]) if pending["pending"] else None
    if oldest is None:
        group = next(g for g in await client.xinfo_groups(LIVE) if text(g["name"]) == GROUP)
        after = await client.xrange(LIVE, f"({text(group['last-delivered-id'])}", "+", count=1)
        oldest = text(after[0][0]) if after else None
    if oldest is None:
        return 0.0
    return max(0.0, time.time() - int(oldest.split("-")[0]) / 1000)


async def _feed_live(client: aioredis.Redis, rate: float, stop: asyncio.Event) -> tuple[int, float]:
    """Add live events at `rate` per second until stopped: (events added, seconds)."""
    events = (normalize_line(e) for e in generate(10_000_000, seed=77))
    started, added = time.monotonic(), 0
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate)
        if due > added:
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(due - added):
                    pipe.xadd(LIVE, {b"event": next(events)})
                await pipe.execute()
            added = due
        await asyncio.sleep(0.02)
    return added, time.monotonic() - started


async def _measure(opts: argparse.Namespace, env: dict[str, str], records: int,
                   client: aioredis.Redis) -> Result:  # fmt: skip
    indexer = indexer_executable()
    for stream in (LIVE, BACKFILL):
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    replicas = [
        await asyncio.create_subprocess_exec(
            indexer, "run", "--consumer", f"r{n}", env=env,
            stdout=(logs / f"r{n}.log").open("wb"), stderr=subprocess.STDOUT,
        )
        for n in range(opts.replicas)
    ]  # fmt: skip
    stop_live = asyncio.Event()
    feeder = asyncio.create_task(_feed_live(client, opts.live_rate, stop_live))
    await asyncio.sleep(3.0)  # the live stream flowing steadily before the backfill starts
    started = time.monotonic()
    backfill = await asyncio.create_subprocess_exec(
        indexer, "backfill", "all", env=env,
        stdout=(logs / "backfill.out").open("wb"), stderr=(logs / "backfill.log").open("wb"),
    )  # fmt: skip
    samples = Samples()
    try:
        while backfill.returncode is None or await group_backlog(client, BACKFILL, GROUP) > 0:
            if time.monotonic() - started > TIMEOUT_S:
                raise TimeoutError("backfill not indexed in time")
            samples.lag_entries.append(await group_backlog(client, LIVE, GROUP))
            samples.lag_s.append(await _oldest_unacked_s(client))
            await asyncio.sleep(SAMPLE_S)
        backfill_s = time.monotonic() - started
        if backfill.returncode != 0:
            raise RuntimeError(f"backfill exited {backfill.returncode}; logs in {logs}")
        stop_live.set()
        offered, offered_s = await feeder
        stopped = time.monotonic()
        while await group_backlog(client, LIVE, GROUP) > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        live_drain_s = time.monotonic() - stopped
    finally:
        stop_live.set()
        for proc in replicas:
            proc.send_signal(signal.SIGTERM)
        for proc in replicas:
            await asyncio.wait_for(proc.wait(), 60)
    return Result(records, backfill_s, offered, offered_s, live_drain_s, samples)


async def _run(opts: argparse.Namespace, work: Path) -> Result:
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(opts, child),
                                                          daemon=True)  # fmt: skip
    server.start()
    try:
        plc, relay, records = await asyncio.to_thread(parent.recv)
        with throwaway_redis(work) as redis_server, throwaway_postgres(work) as pg:
            pg.create_database(DB)
            await migrate(pg.dsn(DB))
            env = indexer_env({
                "REDIS_URL": redis_server.url, "DATABASE_URL": pg.dsn(DB),
                "INDEXER_STREAMS": f"{LIVE},{BACKFILL}", "INDEXER_GROUP": GROUP,
                "METRICS_PORT": "0", "PLC_URL": plc, "RELAY_URL": relay,
                "INDEXER_BLOCK_MS": "100",
            })  # fmt: skip
            client = aioredis.Redis.from_url(redis_server.url)
            try:
                return await _measure(opts, env, records, client)
            finally:
                await client.aclose()
    finally:
        server.terminate()
        server.join(10)


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _markdown(opts: argparse.Namespace, r: Result) -> str:
    s = r.samples
    lines = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: backfill beside a live stream",
        "",
        f"- machine: {os.cpu_count()} x {cpu_model()}, {mem_total_gib():.1f} GiB RAM (cores "
        "shared by the fake network, the backfill, the replicas, Redis and PostgreSQL)",
        f"- code: {code_version()}; `python -m bench.backfill --repos {opts.repos} --records "
        f"{opts.records} --pdses {opts.pdses} --live-rate {opts.live_rate:g} --replicas "
        f"{opts.replicas}` (seed {opts.seed}); loopback only",
        "",
        "| | figure |",
        "|:---|---:|",
        f"| repos, records each | {opts.repos:,}, {opts.records:,}: {r.records:,} records |",
        f"| backfill: start to last record indexed | {r.backfill_s:.1f} s |",
        f"| **backfill records/s** (fetched, walked, added, indexed) | "
        f"**{r.backfill_rate:,.0f}** |",
        f"| live events/s offered | {r.live_offered / r.live_offered_s:,.0f} |",
        f"| live events indexed | {r.live_offered:,}, all (the last "
        f"{r.live_drain_s:.2f} s after the feed stopped) |",
        f"| live lag during the backfill, entries: median / p99 / max | "
        f"{statistics.median(s.lag_entries or [0]):.0f} / {_quantile(s.lag_entries, 0.99):.0f} / "
        f"{max(s.lag_entries or [0])} |",
        f"| live lag during the backfill, seconds: median / p99 / max | "
        f"{statistics.median(s.lag_s or [0]):.2f} / {_quantile(s.lag_s, 0.99):.2f} / "
        f"{max(s.lag_s or [0]):.2f} |",
        f"| samples | {len(s.lag_s)} every {SAMPLE_S} s |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backfill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repos", type=int, default=300)
    parser.add_argument("--records", type=int, default=200, help="records per repo")
    parser.add_argument("--pdses", type=int, default=4)
    parser.add_argument("--live-rate", type=float, default=1000.0, help="live events/s")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    opts = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="firehose-bench-"))
    work.chmod(0o755)  # as root, the postgres user must reach the server directory inside
    result = asyncio.run(_run(opts, work))
    section = _markdown(opts, result)
    publish(section, write=not opts.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
