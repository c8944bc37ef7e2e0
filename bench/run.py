"""Throughput benchmark: end-to-end events/s beside the raw COPY rate of the same rows.

    python -m bench.run [--events N] [--batch-size B] [--concurrency C] [--pool-size P]
                        [--grow-rows R] [--seed S] [--celebrity SHARE | --no-celebrity]
                        [--copy-loads N] [--pg-setting NAME=VALUE ...] [--no-write]

Everything runs in one go on this machine, against throwaway Redis and PostgreSQL servers
(indexer.devservers, loopback only, logs in files):

1. a deterministic workload (indexer.workload) is ingested into a fresh stream with
   `indexer ingest file`, then `indexer run --drain` (real processes, uvloop) indexes it into an
   empty migrated database, first as 1 replica, then, on a fresh database and stream, as 2;
   events/s = stream entries / wall seconds from the replicas' start to the last exit;
2. after each phase the rows it wrote are dumped with COPY and loaded with COPY (one connection,
   one transaction, same indexes) into a fresh copy of the database it started from, --copy-loads
   times (default 3, each into a copy of its own; one load's rate can move by a sixth or more
   between loads of the same rows): the COPY-equivalent events/s is events / the median load's
   seconds, and the ratio indexer / COPY is reported;
   PostgreSQL's deadlock count for the phase's database (pg_stat_database) is read before and
   after, and its active backends are sampled every 20 ms (pg_stat_activity): the share of
   samples waiting for a lock (a row, a transaction) is reported, and in brackets the share
   waiting so in the counter statement (post_agg and profile_agg rows); the CPU seconds of the
   replicas, of every PostgreSQL process (the sampler's backend included) and of Redis are
   summed per event, and the notes give the share of the machine's cores they kept busy and
   the events/s those cores would allow at that cost if they were always busy (÷ COPY-eq),
   the most the phase could reach here without doing less work per event;
3. a celebrity (indexer.workload's `celebrity`) takes --celebrity SHARE (default 0.5) of the
   likes, reposts and follows of an otherwise identical workload (same events, same seed), and
   phases 1 and 2 are repeated with it on empty tables, then with its control (`scatter`: the
   same fan accounts doing as much, their subjects drawn as everyone's); the celebrity's
   events/s are compared with the control's (skipped with --no-celebrity);
4. the tables are grown past --grow-rows rows (copies of the first phase's rows, every DID
   suffixed per copy so keys interleave with later ones, loaded with COPY, then VACUUM ANALYZE),
   and phases 1 and 2 are repeated there with a fresh workload (another seed, later timestamps,
   no celebrity).

Results are printed and appended to bench/RESULTS.md (unless --no-write).
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from rich.console import Console

from bench.options import Options, parse_args
from bench.procs import (
    ReplicaStats,
    code_version,
    cpu_model,
    find_server_pid,
    indexer_env,
    indexer_executable,
    ingest_file,
    log_warnings,
    mem_total_gib,
    run_replicas,
    tree_cpu_s,
)
from bench.report import GrownBase, PhaseResult, Report, append_results, markdown, render
from bench.tables import (
    CopyResult,
    copy_load,
    dump_tables,
    inspect,
    load_suffixed_copies,
    median_load,
    quote_ident,
)
from bench.waits import lock_wait_share, sample_waits, top_lock_waits, until_no_clients
from indexer import constants
from indexer.devservers import PostgresServer, RedisServer, throwaway_postgres, throwaway_redis
from indexer.migrate import migrate
from indexer.workload import DEFAULT_START_TIME_US, write_jsonl

SAMPLE_INTERVAL_S = 0.02  # pg_stat_activity while replicas run
COUNTER_STATEMENT = "INSERT INTO post_agg"  # indexer.aggregates: both tables in one statement
EMPTY_DB = "bench_empty"
GROWN_DB = "bench_grown"
GROUP = "bench"
BLOCK_MS = 100  # a drained replica notices the end 100 ms after it, not 1 s (the default)
GROWN_TIME_OFFSET_US = 86_400 * 1_000_000  # the grown-phase workload starts a day later


class Bench:
    """The servers, the workloads and the phases of one benchmark run."""

    def __init__(
        self,
        opts: Options,
        redis_server: RedisServer,
        pg: PostgresServer,
        work: Path,
        console: Console,
    ) -> None:
        self.opts = opts
        self.redis_server = redis_server
        self.pg = pg
        self.work = work
        self.console = console
        self.redis = aioredis.Redis.from_url(redis_server.url)
        self.indexer = indexer_executable()
        self.pg_pid = find_server_pid("postgres", pg.port)
        self.redis_pid = find_server_pid("redis-server", redis_server.port)
        self.workload = work / "workload.jsonl"
        self.grown_workload = work / "workload-grown.jsonl"
        self.celebrity_workload = work / "workload-celebrity.jsonl"
        self.control_workload = work / "workload-control.jsonl"
        self._strategy = ""
        self._t0 = time.perf_counter()

    def say(self, message: str) -> None:
        self.console.print(f"[dim]{time.perf_counter() - self._t0:7.1f}s[/dim] {message}")

    async def close(self) -> None:
        await self.redis.aclose()

    async def admin(self, sql: str, db: str = "postgres") -> Any:
        conn = await asyncpg.connect(self.pg.dsn(db))
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    async def clone(self, name: str, template: str) -> None:
        await self.drop(name)
        await self.admin(
            f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(template)}{self._strategy}"
        )

    async def drop(self, name: str) -> None:
        await self.admin(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")

    def env(self, db: str, stream: str) -> dict[str, str]:
        """The environment of an `indexer` subprocess: only our settings, none inherited."""
        return indexer_env({
            "REDIS_URL": self.redis_server.url,
            "DATABASE_URL": self.pg.dsn(db),
            "INDEXER_STREAMS": stream,
            "INDEXER_GROUP": GROUP,
            "INDEXER_BATCH_SIZE": str(self.opts.batch_size),
            "INDEXER_CONCURRENCY": str(self.opts.concurrency),
            "DB_POOL_SIZE": str(self.opts.pool_size),
            "METRICS_PORT": "0",
            "INDEXER_BLOCK_MS": str(BLOCK_MS),
        })  # fmt: skip

    async def prepare(self) -> None:
        """The migrated empty database (the template of every phase) and the workloads."""
        if int(await self.admin("SHOW server_version_num")) >= 150000:
            self._strategy = " STRATEGY FILE_COPY"  # a file copy: no WAL for every block
        await self.admin(f"CREATE DATABASE {quote_ident(EMPTY_DB)}")
        await migrate(self.pg.dsn(EMPTY_DB))
        n, seed = self.opts.events, self.opts.seed
        later = DEFAULT_START_TIME_US + GROWN_TIME_OFFSET_US
        await asyncio.to_thread(write_jsonl, self.workload, n, seed)
        await asyncio.to_thread(write_jsonl, self.grown_workload, n, seed + 1, start_time_us=later)
        if self.opts.celebrity:
            share = self.opts.celebrity
            await asyncio.to_thread(write_jsonl, self.celebrity_workload, n, seed, celebrity=share)
            await asyncio.to_thread(
                write_jsonl, self.control_workload, n, seed, celebrity=share, scatter=True
            )
        star = f"; seed {seed} with a celebrity and its control too" if self.opts.celebrity else ""
        self.say(f"workloads of {n:,} events written (seeds {seed} and {seed + 1}{star})")

    async def overhead(self) -> float:
        """Wall seconds of one `indexer run --drain` over an empty stream (start-up, exit)."""
        db = "bench_overhead"
        await self.clone(db, EMPTY_DB)
        env = self.env(db, "bench_overhead_live")
        seconds, _ = await asyncio.to_thread(
            run_replicas, self.indexer, env, 1, self.work / "overhead"
        )
        await self.drop(db)
        await self.redis.delete("bench_overhead_live")
        return seconds

    def phases(self) -> list[tuple[str, str, int]]:
        """(key, title, replicas) of every phase, in the order they run."""
        empty = [("p1", "empty tables, 1 replica", 1), ("p2", "empty tables, 2 replicas", 2)]
        if self.opts.celebrity:
            star = f"empty tables, celebrity {self.opts.celebrity:.0%}"
            control = "empty tables, its control (the fans' subjects scattered)"
            empty += [("c1", f"{star}, 1 replica", 1), ("c2", f"{star}, 2 replicas", 2)]
            empty += [("s1", f"{control}, 1 replica", 1), ("s2", f"{control}, 2 replicas", 2)]
        grown = [("g1", "grown tables, 1 replica", 1), ("g2", "grown tables, 2 replicas", 2)]
        return empty + grown

    async def phase(self, key: str, title: str, replicas: int) -> PhaseResult:
        """Ingest a workload into a fresh stream, index it with replicas, inspect, COPY it."""
        grown = key.startswith("g")
        template, workload = (GROWN_DB, self.grown_workload) if grown else (EMPTY_DB, self.workload)
        if key.startswith("c"):
            workload = self.celebrity_workload
        elif key.startswith("s"):
            workload = self.control_workload
        db, stream = f"bench_{key}", f"bench_{key}_live"
        await self.clone(db, template)
        env = self.env(db, stream)
        ingest_s = await asyncio.to_thread(
            ingest_file, self.indexer, env, workload, self.work / f"{key}-ingest.log"
        )
        events = int(await self.redis.xlen(stream))
        self.say(f"{key}: {events:,} events ingested in {ingest_s:.1f} s; indexing")
        deadlocks = await self.deadlocks(db)
        cpu_before = self.server_cpu()
        seconds, stats, waits = await self.index(db, env, replicas, self.work / key)
        pg_cpu, redis_cpu = (a - b for a, b in zip(self.server_cpu(), cpu_before, strict=True))
        deadlocks = await self.deadlocks(db) - deadlocks
        dead = int(await self.redis.xlen(constants.dlq_stream(stream)))
        warnings = sum(log_warnings(Path(f"{self.work / key}-{r.name}.log")) for r in stats)
        await self.redis.delete(stream, constants.dlq_stream(stream))
        self.say(f"{key}: {title}: {seconds:.1f} s, {events / seconds:,.0f} events/s")
        for wait, query, share in top_lock_waits(waits, 3):  # where batches wait for others
            self.say(f"{key}:   {share:.1%} of samples {wait} in {query}")
        found = await inspect(self.pg.dsn(db), grown)
        copy = await self.copy_baseline(db, template, grown)
        loads = ", ".join(f"{s:.2f}" for s in copy.loads)
        self.say(f"{key}: COPY of its {copy.rows:,} rows: {copy.seconds:.2f} s (loads: {loads})")
        if key != "p1":  # p1's rows seed the grown tables
            await self.drop(db)
        return PhaseResult(
            key, title, events, seconds, ingest_s, stats, dead, warnings, pg_cpu, redis_cpu,
            found, copy, deadlocks, lock_wait_share(waits),
            lock_wait_share(waits, COUNTER_STATEMENT),
        )  # fmt: skip

    async def index(
        self, db: str, env: dict[str, str], replicas: int, log_prefix: Path
    ) -> tuple[float, list[ReplicaStats], Counter[tuple[str, str]]]:
        """Run the replicas to the end of the stream, sampling the database's backends; their
        wall seconds, their stats and the samples."""
        waits: Counter[tuple[str, str]] = Counter()
        done = asyncio.Event()
        sampler = asyncio.create_task(sample_waits(self.pg.dsn(db), waits, done, SAMPLE_INTERVAL_S))
        try:
            seconds, stats = await asyncio.to_thread(
                run_replicas, self.indexer, env, replicas, log_prefix
            )
        finally:
            done.set()
            await sampler
        return seconds, stats, waits

    async def deadlocks(self, db: str) -> int:
        """Deadlocks PostgreSQL has detected in a database, once its clients have all gone (a
        backend reports its statistics at the latest when it exits)."""
        conn = await asyncpg.connect(self.pg.dsn("postgres"))
        try:
            await until_no_clients(conn, db)
            found = await conn.fetchval(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = $1", db
            )
        finally:
            await conn.close()
        return int(found or 0)

    def server_cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by PostgreSQL (all its processes) and by Redis."""
        return tree_cpu_s(self.pg_pid), tree_cpu_s(self.redis_pid)

    async def copy_baseline(self, db: str, template: str, measured_only: bool) -> CopyResult:
        """COPY the rows a phase wrote into a fresh copy of the database it started from, as
        many times as asked (each into a copy of its own): the median load."""
        dumps = await dump_tables(self.pg.dsn(db), measured_only, "binary")
        target = f"{db}_copy"
        loads = []
        for _ in range(self.opts.copy_loads):
            await self.clone(target, template)
            try:
                loads.append(await copy_load(self.pg.dsn(target), dumps))
            finally:
                await self.drop(target)
        return median_load(loads)

    async def grow(self, source_db: str) -> GrownBase:
        """The grown template: copies of a phase's rows, DIDs suffixed per copy, then ANALYZE."""
        started = time.perf_counter()
        dumps = await dump_tables(self.pg.dsn(source_db), False, "text")
        per_copy = max(1, sum(d.rows for d in dumps))
        copies = self.opts.grow_rows // per_copy + 1
        await self.clone(GROWN_DB, EMPTY_DB)
        rows = await load_suffixed_copies(self.pg.dsn(GROWN_DB), dumps, copies)
        await self.admin("CHECKPOINT")
        grown = GrownBase(rows, copies, time.perf_counter() - started)
        self.say(f"grown tables: {sum(rows.values()):,} rows in {grown.seconds:.1f} s")
        return grown

    async def machine(self) -> dict[str, str]:
        info = await self.redis.info("server")
        shown: tuple[str, ...] = (
            "server_version", "lc_collate", "shared_buffers", "fsync", "synchronous_commit",
        )  # fmt: skip
        shown += tuple(n for n in self.opts.pg_settings if n not in shown)
        pg = {name: str(await self.admin(f"SHOW {name}")) for name in shown}
        return {
            "nproc": str(os.cpu_count()),
            "cpu": cpu_model(),
            "ram": f"{mem_total_gib():.1f} GiB",
            "postgres": pg.pop("server_version").split()[0],
            "postgres settings": ", ".join(f"{k}={v}" for k, v in pg.items()),
            "redis": str(info.get("redis_version", "?")),
            "python": f"{platform.python_version()} ({platform.python_implementation()})",
            "kernel": platform.release(),
            "code": code_version(),
        }

    async def run(self) -> Report:
        await self.prepare()
        report = Report(self.opts, await self.machine(), datetime.now(UTC))
        report.overhead_s = await self.overhead()
        self.say(f"fixed cost of one drain run: {report.overhead_s:.2f} s")
        for key, title, replicas in self.phases():
            if key == "g1":
                report.grown = await self.grow("bench_p1")
                await self.drop("bench_p1")
            report.phases[key] = await self.phase(key, title, replicas)
        report.total_s = time.perf_counter() - self._t0
        return report


async def _run(opts: Options, console: Console, work: Path) -> Report:
    with (
        throwaway_redis(work) as redis_server,
        throwaway_postgres(work, opts.pg_settings, opts.pg_locale) as pg,
    ):
        bench = Bench(opts, redis_server, pg, work, console)
        try:
            return await bench.run()
        finally:
            await bench.close()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file: no wrapping of the wide table
    work = Path(tempfile.mkdtemp(prefix="firehose-bench-"))
    work.chmod(0o755)  # as root, the postgres user must reach the server directory inside
    try:
        report = asyncio.run(_run(opts, console, work))
    except BaseException:
        console.print(f"[red]benchmark failed; logs kept in {work}[/red]")
        raise
    shutil.rmtree(work, ignore_errors=True)
    render(report, console)
    if opts.write:
        append_results(opts.results, markdown(report))
        console.print(f"appended to {opts.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
