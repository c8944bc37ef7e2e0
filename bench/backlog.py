"""A replica's peak memory against a deep backlog, beside the same work against a shallow one.

    python -m bench.backlog [--deep N] [--shallow N] [--index N] [--accounts N] [--seed S]
                            [--no-write]

For each backlog (shallow, then deep): a throwaway Redis gets one stream of that many workload
events (indexer.workload, their envelopes added by pipelined XADD, as `indexer ingest` writes
them), a throwaway PostgreSQL is migrated, and one real `indexer run` indexes the stream until
`--index` entries are ACKed; it is then stopped with SIGTERM and must exit 0. Its peak RSS
(VmHWM) is sampled all along. Both streams begin with the same `--index` events (same seed and
accounts: the generator's output does not depend on its length), so the replica does the same
work in both; only what waits behind it differs. Reported side by side: peak RSS, events/s from
the first ACK to the stop request, Redis's memory for the stream. Loopback only; results are
printed and appended to bench/RESULTS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis

from bench.ingest import XADD_BATCH, xadd_envelopes
from bench.options import positive_count
from bench.procs import (
    code_version,
    cpu_model,
    indexer_env,
    indexer_executable,
    log_tail,
    log_warnings,
    mem_total_gib,
    vm_hwm_kb,
)
from bench.report import publish
from indexer.devservers import PG_TEST_SETTINGS, throwaway_postgres, throwaway_redis
from indexer.events import normalize_line
from indexer.migrate import migrate
from indexer.stream import group_backlog
from indexer.workload import generate

STREAM, GROUP = "bench_backlog", "bench"
SAMPLE_S = 0.05  # RSS samples and ACK counts
STOP_S = 60.0
TIMEOUT_S = 3600.0


@dataclass(frozen=True, slots=True)
class Result:
    backlog: int
    fill_s: float
    redis_mib: float
    indexed: int  # ACKed by the stop request
    timed: int  # ACKed from the first ACK seen to the stop request
    seconds: float  # from the first ACK seen to the stop request
    peak_rss_mb: float
    warnings: int

    @property
    def rate(self) -> float:
        """Events/s while indexing; NaN when the target was met by the first ACKs seen."""
        return self.timed / self.seconds if self.seconds > 0 else math.nan


async def _fill(client: aioredis.Redis, events: int, seed: int, accounts: int) -> float:
    """Add `events` workload envelopes to the stream; the seconds it took."""
    started = time.perf_counter()
    batch: list[bytes] = []
    for event in generate(events, seed, accounts=accounts):
        batch.append(normalize_line(event))
        if len(batch) == XADD_BATCH:
            await xadd_envelopes(client, STREAM, batch)
            batch.clear()
    await xadd_envelopes(client, STREAM, batch)
    return time.perf_counter() - started


async def _run_replica(
    env: dict[str, str], client: aioredis.Redis, target: int, log_path: Path
) -> tuple[int, int, float, float]:
    """One replica until `target` entries are ACKed, then SIGTERM and its exit (0, or raise).

    Returns (entries ACKed by the stop request, those ACKed since the first ACK seen, seconds
    from that first ACK to the stop request, peak RSS in MB until the replica exited).
    """
    before = await group_backlog(client, STREAM, GROUP)
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            indexer_executable(), "run", "--consumer", "r1",
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    started, peak_kb = time.monotonic(), 0
    first: tuple[float, int] | None = None  # (when, ACKed) at the first poll that saw an ACK
    done = 0
    try:
        while True:
            peak_kb = max(peak_kb, vm_hwm_kb(proc.pid))
            if proc.returncode is not None:
                raise RuntimeError(f"the replica exited with {proc.returncode}:\n"
                                   f"{log_tail(log_path)}")  # fmt: skip
            if time.monotonic() - started > TIMEOUT_S:
                raise TimeoutError(f"fewer than {target} entries ACKed in {TIMEOUT_S:.0f} s")
            polled = time.monotonic()
            done = before - await group_backlog(client, STREAM, GROUP)
            if first is None and done > 0:
                first = (polled, done)
            if done >= target:
                break
            await asyncio.sleep(SAMPLE_S)
        assert first is not None  # done >= target >= 1
        seconds = polled - first[0]
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_S
        while proc.returncode is None:  # it may still grow while it stops
            peak_kb = max(peak_kb, vm_hwm_kb(proc.pid))
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica did not stop within {STOP_S:.0f} s of SIGTERM")
            try:
                await asyncio.wait_for(proc.wait(), SAMPLE_S)
            except TimeoutError:
                continue
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the replica exited with {proc.returncode} after SIGTERM:\n"
                           f"{log_tail(log_path)}")  # fmt: skip
    return done, done - first[1], seconds, peak_kb / 1024


async def measure(backlog: int, opts: argparse.Namespace, work: Path) -> Result:
    """One backlog: fill a fresh stream, index `opts.index` entries of it, stop the replica."""
    with throwaway_redis(work) as redis_server, throwaway_postgres(work) as pg:
        await migrate(pg.dsn())
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            fill_s = await _fill(client, backlog, opts.seed, opts.accounts)
            redis_mib = int((await client.info("memory"))["used_memory"]) / 2**20
            env = indexer_env({
                "REDIS_URL": redis_server.url, "DATABASE_URL": pg.dsn(),
                "INDEXER_STREAMS": STREAM, "INDEXER_GROUP": GROUP, "METRICS_PORT": "0",
            })  # fmt: skip
            log_path = work / f"replica-{backlog}.log"
            indexed, timed, seconds, peak = await _run_replica(env, client, opts.index, log_path)
        finally:
            await client.aclose()
    return Result(backlog, fill_s, redis_mib, indexed, timed, seconds, peak, log_warnings(log_path))


def markdown(opts: argparse.Namespace, results: list[Result]) -> str:
    shallow, deep = results
    settings = ", ".join(f"{k}={v}" for k, v in PG_TEST_SETTINGS.items())
    lines = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: a replica's memory against a deep backlog",
        "",
        f"- machine: {os.cpu_count()} x {cpu_model()}, {mem_total_gib():.1f} GiB RAM",
        f"- code: {code_version()}; `python -m bench.backlog --deep {opts.deep} --shallow "
        f"{opts.shallow} --index {opts.index} --accounts {opts.accounts}` (seed {opts.seed}); "
        "one `indexer run` with its default settings, loopback only",
        f"- PostgreSQL with the throwaway test settings ({settings})",
        "",
        "| Backlog (entries waiting) | Fill s | Redis MiB | ACKed | Seconds from the first ACK "
        "| Events/s | Peak RSS MB | Log warnings |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.backlog:,} | {r.fill_s:.0f} | {r.redis_mib:,.0f} | {r.indexed:,} | "
            f"{r.seconds:.1f} | {r.rate:,.0f} | {r.peak_rss_mb:.0f} | {r.warnings} |"
        )
    lines += [
        "",
        f"- peak RSS, deep ÷ shallow: {deep.peak_rss_mb / shallow.peak_rss_mb:.2f}; "
        f"events/s, deep ÷ shallow: {deep.rate / shallow.rate:.2f}; both replicas exited 0 "
        "on SIGTERM",
    ]
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backlog",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--deep", type=positive_count, default=10_000_000, help="entries waiting")
    parser.add_argument("--shallow", type=positive_count, default=500_000, help="entries waiting")
    parser.add_argument("--index", type=positive_count, default=200_000, help="entries to ACK")
    parser.add_argument("--accounts", type=positive_count, default=50_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    opts = parser.parse_args(argv)
    if opts.accounts < 2:
        parser.error("--accounts must be at least 2")
    if not opts.index <= opts.shallow < opts.deep:
        parser.error("--index must not exceed --shallow, which must be below --deep")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    # mkdtemp, not TemporaryDirectory: the replicas' logs stay for a look when a run fails.
    work = Path(tempfile.mkdtemp(prefix="firehose-backlog-"))
    work.chmod(0o755)  # as root, the throwaway PostgreSQL runs as `postgres` and must get in
    results = []
    try:
        for backlog in (opts.shallow, opts.deep):
            results.append(asyncio.run(measure(backlog, opts, work)))
            print(f"backlog {backlog:,}: peak RSS {results[-1].peak_rss_mb:.0f} MB",
                  file=sys.stderr)  # fmt: skip
    except BaseException:
        print(f"the replicas' logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work)
    section = markdown(opts, results)
    publish(section, write=not opts.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
