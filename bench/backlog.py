"""A replica's peak memory against a deep backlog, beside the same work against a shallow one.

    python -m bench.backlog [--deep N] [--shallow N] [--index N] [--accounts N] [--seed S]
                            [--no-write]

For each backlog (shallow, then deep): a throwaway Redis gets one stream of that many workload
events (indexer.workload, their envelopes added by pipelined XADD, as `indexer ingest` writes
them), a throwaway PostgreSQL is migrated, and one real `indexer run` indexes the stream until
`--index` entries are ACKed; it is then stopped with SIGTERM and must exit 0. Its peak RSS
(VmHWM) is sampled all along. Both streams begin with the same `--index` events (same seed and
accounts: the generator's output does not depend on its length), so the replica does the same
work in both; only what waits behind it differs. Reported side by side: peak RSS, events/s while
indexing, Redis's memory for the stream. Loopback only; results are printed and appended to
bench/RESULTS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis

from bench.options import RESULTS_PATH
from bench.procs import (
    code_version,
    cpu_model,
    indexer_executable,
    log_warnings,
    mem_total_gib,
    vm_hwm_kb,
)
from bench.report import append_results
from indexer.config import ENVIRONMENT_VARIABLES
from indexer.devservers import throwaway_postgres, throwaway_redis
from indexer.events import normalize_line
from indexer.migrate import migrate
from indexer.stream import group_backlog
from indexer.workload import generate

STREAM, GROUP = "bench_backlog", "bench"
XADD_BATCH = 1000
SAMPLE_S = 0.05
TIMEOUT_S = 3600.0


@dataclass(frozen=True, slots=True)
class Result:
    backlog: int
    fill_s: float
    redis_mb: float
    indexed: int
    index_s: float
    peak_rss_mb: float
    exit_code: int
    warnings: int

    @property
    def rate(self) -> float:
        return self.indexed / self.index_s


async def fill(client: aioredis.Redis, events: int, seed: int, accounts: int) -> float:
    """Add `events` workload envelopes to the stream; the seconds it took."""
    started = time.perf_counter()
    batch: list[bytes] = []
    for event in generate(events, seed, accounts=accounts):
        batch.append(normalize_line(event))
        if len(batch) == XADD_BATCH:
            await _xadd(client, batch)
            batch.clear()
    if batch:
        await _xadd(client, batch)
    return time.perf_counter() - started


async def _xadd(client: aioredis.Redis, envelopes: list[bytes]) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for envelope in envelopes:
            pipe.xadd(STREAM, {b"event": envelope})
        await pipe.execute()


async def index(
    env: dict[str, str], client: aioredis.Redis, target: int, log_path: Path
) -> tuple[int, float, float, int]:
    """Run one replica until `target` entries are ACKed, then SIGTERM it.

    Returns (entries ACKed by then, seconds until then, peak RSS in MB to its exit, exit code).
    """
    before = await group_backlog(client, STREAM, GROUP)
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            indexer_executable(), "run", "--consumer", "r1",
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    started, peak_kb, polled, done = time.perf_counter(), 0, 0.0, 0
    try:
        while True:
            peak_kb = max(peak_kb, vm_hwm_kb(proc.pid))
            if proc.returncode is not None:
                raise RuntimeError(f"the replica exited with {proc.returncode}; see {log_path}")
            if time.perf_counter() - started > TIMEOUT_S:
                raise TimeoutError(f"fewer than {target} entries indexed in {TIMEOUT_S:.0f} s")
            if time.perf_counter() - polled > 0.5:
                polled = time.perf_counter()
                done = before - await group_backlog(client, STREAM, GROUP)
                if done >= target:
                    break
            await asyncio.sleep(SAMPLE_S)
        seconds = time.perf_counter() - started
        proc.send_signal(signal.SIGTERM)
        while proc.returncode is None:  # it may still grow while it stops
            peak_kb = max(peak_kb, vm_hwm_kb(proc.pid))
            try:
                await asyncio.wait_for(proc.wait(), SAMPLE_S)
            except TimeoutError:
                continue
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return done, seconds, peak_kb / 1024, proc.returncode


async def measure(backlog: int, opts: argparse.Namespace, work: Path) -> Result:
    with throwaway_redis(work) as redis_server, throwaway_postgres(work) as pg:
        await migrate(pg.dsn())
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            fill_s = await fill(client, backlog, opts.seed, opts.accounts)
            redis_mb = int((await client.info("memory"))["used_memory"]) / 2**20
            env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT_VARIABLES}
            env |= {
                "REDIS_URL": redis_server.url, "DATABASE_URL": pg.dsn(),
                "INDEXER_STREAMS": STREAM, "INDEXER_GROUP": GROUP, "METRICS_PORT": "0",
            }  # fmt: skip
            log_path = work / f"replica-{backlog}.log"
            done, seconds, peak, code = await index(env, client, opts.index, log_path)
        finally:
            await client.aclose()
    return Result(backlog, fill_s, redis_mb, done, seconds, peak, code, log_warnings(log_path))


def markdown(opts: argparse.Namespace, results: list[Result]) -> str:
    shallow, deep = results
    lines = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: a replica's memory against a deep backlog",
        "",
        f"- machine: {os.cpu_count()} x {cpu_model()}, {mem_total_gib():.1f} GiB RAM",
        f"- code: {code_version()}; `python -m bench.backlog --deep {opts.deep} --shallow "
        f"{opts.shallow} --index {opts.index} --accounts {opts.accounts}` (seed {opts.seed}); "
        "one `indexer run`, default settings, loopback only",
        "",
        "| Backlog (entries waiting) | Fill s | Redis MB | Indexed | Seconds | Events/s "
        "| Peak RSS MB | Exit after SIGTERM | Log warnings |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.backlog:,} | {r.fill_s:.0f} | {r.redis_mb:,.0f} | {r.indexed:,} | "
            f"{r.index_s:.1f} | {r.rate:,.0f} | {r.peak_rss_mb:.0f} | {r.exit_code} | "
            f"{r.warnings} |"
        )
    lines += [
        "",
        f"- peak RSS, deep ÷ shallow: {deep.peak_rss_mb / shallow.peak_rss_mb:.2f}; "
        f"events/s, deep ÷ shallow: {deep.rate / shallow.rate:.2f}",
    ]
    return "\n".join(lines) + "\n"


def _count(text: str) -> int:
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backlog",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--deep", type=_count, default=10_000_000, help="entries waiting")
    parser.add_argument("--shallow", type=_count, default=500_000, help="entries waiting")
    parser.add_argument("--index", type=_count, default=200_000, help="entries to index")
    parser.add_argument("--accounts", type=_count, default=50_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    opts = parser.parse_args(argv)
    if opts.index > min(opts.shallow, opts.deep):
        parser.error("--index must not exceed either backlog")
    with tempfile.TemporaryDirectory(prefix="firehose-backlog-") as work:
        Path(work).chmod(0o755)
        results = []
        for backlog in (opts.shallow, opts.deep):
            results.append(asyncio.run(measure(backlog, opts, Path(work))))
            print(f"backlog {backlog:,}: peak RSS {results[-1].peak_rss_mb:.0f} MB",
                  file=sys.stderr)  # fmt: skip
    section = markdown(opts, results)
    print(section)
    if not opts.no_write:
        append_results(RESULTS_PATH, section)
    return 0 if all(r.exit_code == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
