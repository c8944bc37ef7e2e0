"""Throughput benchmark: end-to-end events/s beside the raw COPY rate of the same rows.

    python -m bench.run [--events N] [--batch-size B] [--concurrency C] [--pool-size P]
                        [--grow-rows R] [--seed S] [--no-write]

Everything runs in one go on this machine, against throwaway Redis and PostgreSQL servers
(indexer.devservers, loopback only, logs in files):

1. a deterministic workload (indexer.workload) is ingested into a fresh stream with
   `indexer ingest file`, then `indexer run --drain` (real processes, uvloop) indexes it into an
   empty migrated database, first as 1 replica, then, on a fresh database and stream, as 2;
   events/s = stream entries / wall seconds from the replicas' start to the last exit;
2. after each phase the rows it wrote are dumped with COPY and loaded with COPY (one connection,
   one transaction, same indexes) into a fresh copy of the database it started from: the
   COPY-equivalent events/s is events / COPY seconds, and the ratio indexer / COPY is reported;
3. the tables are grown past --grow-rows rows (copies of the first phase's rows, every DID
   suffixed per copy so keys interleave with later ones, loaded with COPY, then VACUUM ANALYZE),
   and phases 1 and 2 are repeated there with a fresh workload (another seed, later timestamps).

Results are printed and appended to bench/RESULTS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from indexer import constants
from indexer.config import ENVIRONMENT_VARIABLES
from indexer.devservers import PostgresServer, RedisServer, throwaway_postgres, throwaway_redis
from indexer.migrate import migrate
from indexer.workload import DEFAULT_START_TIME_US, write_jsonl

# Every table the indexer writes; each one's first column is its key (a uri or a did).
WRITTEN_TABLES = (
    "record",
    "record_state",
    "post",
    "like",
    "repost",
    "follow",
    "actor_block",
    "profile",
    "quote",
    "feed_item",
    "duplicate_record",
    "post_agg",
    "profile_agg",
    "actor",
)
# (counter, table counted, column counted, aggregate table, its key)
COUNTERS = (
    ("likeCount", "like", "subject", "post_agg", "uri"),
    ("repostCount", "repost", "subject", "post_agg", "uri"),
    ("replyCount", "post", "replyParent", "post_agg", "uri"),
    ("quoteCount", "quote", "subject", "post_agg", "uri"),
    ("followersCount", "follow", "subjectDid", "profile_agg", "did"),
    ("followsCount", "follow", "creator", "profile_agg", "did"),
    ("postsCount", "post", "creator", "profile_agg", "did"),
)
PHASES = (
    ("p1", "empty tables, 1 replica", 1),
    ("p2", "empty tables, 2 replicas", 2),
    ("g1", "grown tables, 1 replica", 1),
    ("g2", "grown tables, 2 replicas", 2),
)
EMPTY_DB = "bench_empty"
GROWN_DB = "bench_grown"
GROUP = "bench"
GROWN_MARK = "_g"  # DIDs of the grown base rows end in _g<copy>; workload DIDs never contain it
BLOCK_MS = 100  # a drained replica notices the end 100 ms after it, not 1 s (the default)
PHASE_TIMEOUT_S = 3600.0
POLL_S = 0.02
GROWN_TIME_OFFSET_US = 86_400 * 1_000_000  # the grown-phase workload starts a day later
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_HEADER = (
    "# Benchmark results\n\n"
    "Appended by `make bench` (`python -m bench.run`), one section per run; see the docstring "
    "of `bench/run.py` for what each figure means.\n"
)
_DID = re.compile(rb"did:plc:([a-z2-7]{24})")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Options:
    events: int
    batch_size: int
    concurrency: int
    pool_size: int
    grow_rows: int
    seed: int
    write: bool
    results: Path


@dataclass(slots=True)
class ReplicaStats:
    name: str
    seconds: float
    peak_rss_mb: float
    cpu_s: float


@dataclass(slots=True)
class CopyResult:
    rows: int
    seconds: float
    megabytes: float


@dataclass(slots=True)
class Inspection:
    rows: dict[str, int]
    counter_errors: dict[str, int]
    digests: dict[str, str]


@dataclass(slots=True)
class PhaseResult:
    key: str
    title: str
    events: int
    seconds: float
    ingest_seconds: float
    replicas: list[ReplicaStats]
    dead_lettered: int
    warnings: int
    pg_cpu_s: float
    redis_cpu_s: float
    found: Inspection
    copy: CopyResult

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def copy_rate(self) -> float:
        """Events/s if the phase's rows had been written at the raw COPY speed."""
        return self.events / self.copy.seconds

    @property
    def ratio(self) -> float:
        return self.rate / self.copy_rate


@dataclass(slots=True)
class TableDump:
    table: str
    columns: list[str]
    data: bytes
    rows: int


@dataclass(slots=True)
class GrownBase:
    rows: dict[str, int]
    copies: int
    seconds: float


@dataclass(slots=True)
class Report:
    opts: Options
    machine: dict[str, str]
    started: datetime
    overhead_s: float = 0.0
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    grown: GrownBase | None = None
    total_s: float = 0.0


# -- processes -------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_bytes()[-8192:].decode(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _warnings(log: Path) -> int:
    """WARNING and ERROR lines in a replica's log (retries, dead-lettering, failures)."""
    with log.open("rb") as lines:
        return sum(1 for line in lines if b" WARNING " in line or b" ERROR " in line)


def ingest_file(indexer: str, env: dict[str, str], path: Path, log_path: Path) -> float:
    """`indexer ingest file PATH` as a subprocess; its wall seconds."""
    started = time.perf_counter()
    with log_path.open("wb") as log:
        result = subprocess.run(
            [indexer, "ingest", "file", str(path)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=PHASE_TIMEOUT_S,
        )
    if result.returncode != 0:
        raise RuntimeError(f"ingest exited with {result.returncode}:\n{_tail(log_path)}")
    return time.perf_counter() - started


def run_replicas(
    indexer: str, env: dict[str, str], count: int, log_prefix: Path
) -> tuple[float, list[ReplicaStats]]:
    """Start `count` `indexer run --drain` processes at once; wall seconds to the last exit."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(_kill_remaining, procs)
        started = time.perf_counter()
        for n in range(1, count + 1):
            name = f"r{n}"
            log = stack.enter_context(Path(f"{log_prefix}-{name}.log").open("wb"))
            procs[name] = subprocess.Popen(
                [indexer, "run", "--drain", "--consumer", name],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stats = _reap_all(procs, started, log_prefix)
    return max(s.seconds for s in stats), stats


def _reap_all(
    procs: dict[str, subprocess.Popen[bytes]], started: float, log_prefix: Path
) -> list[ReplicaStats]:
    """Wait for every process, sampling its peak RSS; wait4 gives its own CPU time."""
    done: dict[str, ReplicaStats] = {}
    peak_kb = dict.fromkeys(procs, 0)
    while len(done) < len(procs):
        for name, proc in procs.items():
            if name in done:
                continue
            peak_kb[name] = max(peak_kb[name], vm_hwm_kb(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                log = Path(f"{log_prefix}-{name}.log")
                raise RuntimeError(f"replica {name} exited with {proc.returncode}:\n{_tail(log)}")
            seconds = time.perf_counter() - started
            cpu = usage.ru_utime + usage.ru_stime
            done[name] = ReplicaStats(name, seconds, peak_kb[name] / 1024, cpu)
        if time.perf_counter() - started > PHASE_TIMEOUT_S:
            raise TimeoutError(f"replicas still running after {PHASE_TIMEOUT_S:.0f} s")
        if len(done) < len(procs):
            time.sleep(POLL_S)
    return [done[name] for name in procs]


def vm_hwm_kb(pid: int) -> int:
    """Peak RSS (VmHWM) of a live process, 0 once it has exited.

    Not ru_maxrss from wait4: at exec, Linux carries the forking parent's peak RSS into the
    child's maxrss, so a child of this (large) process would report our memory, not its own.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _kill_remaining(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (index 1 is the parent pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cpu_ticks(fields: list[str]) -> int:
    # utime, stime, cutime, cstime: the process and the children it has reaped
    return sum(int(fields[i]) for i in (11, 12, 13, 14))


def tree_cpu_s(root: int | None) -> float:
    """CPU seconds of a server process, its live children and the children it has reaped."""
    if root is None:
        return 0.0
    fields = _stat(root)
    if fields is None:
        return 0.0
    ticks = _cpu_ticks(fields)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            child = _stat(int(entry))
            if child is not None and int(child[1]) == root:
                ticks += _cpu_ticks(child)
    return ticks / _CLOCK_TICKS


def find_server_pid(program: str, port: int) -> int | None:
    """The pid of the `program` server started with `port` on its command line."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        words = argv.replace("\0", " ").split()
        if words and Path(words[0]).name == program and any(str(port) in w for w in words):
            return int(entry)
    return None


# -- database helpers ------------------------------------------------------------------------


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _measured(key: str, measured_only: bool) -> str:
    """Rows of the measured workload only: in grown databases, not the grown base rows."""
    return f" WHERE strpos({_q(key)}, '{GROWN_MARK}') = 0" if measured_only else ""


async def table_columns(conn: Any, table: str) -> list[str]:
    """The columns COPY can write (generated ones like "sortAt" excluded), in table order."""
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = $1 AND is_generated = 'NEVER' "
        "ORDER BY ordinal_position",
        table,
    )
    return [r["column_name"] for r in rows]


async def dump_tables(dsn: str, measured_only: bool, fmt: str) -> list[TableDump]:
    """Every written table's rows as COPY data in memory, in heap (about insertion) order."""
    conn = await asyncpg.connect(dsn)
    dumps = []
    try:
        for table in WRITTEN_TABLES:
            cols = await table_columns(conn, table)
            query = (
                f"SELECT {', '.join(map(_q, cols))} FROM {_q(table)}"
                f"{_measured(cols[0], measured_only)}"
            )
            buf = io.BytesIO()
            status = await conn.copy_from_query(query, output=buf, format=fmt)
            dumps.append(TableDump(table, cols, buf.getvalue(), int(status.split()[-1])))
    finally:
        await conn.close()
    return dumps


async def copy_load(dsn: str, dumps: list[TableDump]) -> CopyResult:
    """Time COPY (binary) of the dumps into the tables, one connection, one transaction."""
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        async with conn.transaction():
            for d in dumps:
                if d.rows:
                    await conn.copy_to_table(
                        d.table, source=io.BytesIO(d.data), columns=d.columns, format="binary"
                    )
        seconds = time.perf_counter() - started
    finally:
        await conn.close()
    size = sum(len(d.data) for d in dumps) / 1e6
    return CopyResult(sum(d.rows for d in dumps), seconds, size)


_COUNTER_SQL = """
SELECT count(*) FROM (
    SELECT {col} AS k, count(*) AS n FROM {table} WHERE {col} IS NOT NULL GROUP BY 1
) AS actual FULL JOIN (
    SELECT {key} AS k, {counter} AS n FROM {agg} WHERE {counter} <> 0
) AS counted USING (k)
WHERE actual.n IS DISTINCT FROM counted.n
"""


async def inspect(dsn: str, measured_only: bool) -> Inspection:
    """Rows per table, counters that disagree with count(*), and a digest of each table."""
    conn = await asyncpg.connect(dsn)
    try:
        rows: dict[str, int] = {}
        digests: dict[str, str] = {}
        for table in WRITTEN_TABLES:
            key = (await table_columns(conn, table))[0]
            where = _measured(key, measured_only)
            rows[table] = await conn.fetchval(f"SELECT count(*) FROM {_q(table)}{where}")
            digests[table] = await conn.fetchval(
                f"SELECT md5(string_agg(md5(t::text), '' ORDER BY t.{_q(key)})) "
                f"FROM {_q(table)} AS t{where}"
            )
        errors: dict[str, int] = {}
        for counter, table, col, agg, key in COUNTERS:
            sql = _COUNTER_SQL.format(
                col=_q(col), table=_q(table), key=_q(key), counter=_q(counter), agg=_q(agg)
            )
            wrong = await conn.fetchval(sql)
            if wrong:
                errors[counter] = wrong
    finally:
        await conn.close()
    return Inspection(rows, errors, digests)


# -- the benchmark ---------------------------------------------------------------------------


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
        self.indexer = _indexer_executable()
        self.pg_pid = find_server_pid("postgres", pg.port)
        self.redis_pid = find_server_pid("redis-server", redis_server.port)
        self.workload = work / "workload.jsonl"
        self.grown_workload = work / "workload-grown.jsonl"
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
        await self.admin(f"CREATE DATABASE {_q(name)} TEMPLATE {_q(template)}{self._strategy}")

    async def drop(self, name: str) -> None:
        await self.admin(f"DROP DATABASE IF EXISTS {_q(name)} WITH (FORCE)")

    def env(self, db: str, stream: str) -> dict[str, str]:
        """The environment of an `indexer` subprocess: only our settings, none inherited."""
        env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT_VARIABLES}
        env.update(
            REDIS_URL=self.redis_server.url,
            DATABASE_URL=self.pg.dsn(db),
            INDEXER_STREAMS=stream,
            INDEXER_GROUP=GROUP,
            INDEXER_BATCH_SIZE=str(self.opts.batch_size),
            INDEXER_CONCURRENCY=str(self.opts.concurrency),
            DB_POOL_SIZE=str(self.opts.pool_size),
            METRICS_PORT="0",
            INDEXER_BLOCK_MS=str(BLOCK_MS),
        )
        return env

    async def prepare(self) -> None:
        """The migrated empty database (the template of every phase) and both workloads."""
        if int(await self.admin("SHOW server_version_num")) >= 150000:
            self._strategy = " STRATEGY FILE_COPY"  # a file copy: no WAL for every block
        await self.admin(f"CREATE DATABASE {_q(EMPTY_DB)}")
        await migrate(self.pg.dsn(EMPTY_DB))
        n, seed = self.opts.events, self.opts.seed
        later = DEFAULT_START_TIME_US + GROWN_TIME_OFFSET_US
        await asyncio.to_thread(write_jsonl, self.workload, n, seed)
        await asyncio.to_thread(write_jsonl, self.grown_workload, n, seed + 1, start_time_us=later)
        self.say(f"workloads of {n:,} events written (seeds {seed} and {seed + 1})")

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

    async def phase(self, key: str, title: str, replicas: int) -> PhaseResult:
        """Ingest a workload into a fresh stream, index it with replicas, inspect, COPY it."""
        grown = key.startswith("g")
        template, workload = (GROWN_DB, self.grown_workload) if grown else (EMPTY_DB, self.workload)
        db, stream = f"bench_{key}", f"bench_{key}_live"
        await self.clone(db, template)
        env = self.env(db, stream)
        ingest_s = await asyncio.to_thread(
            ingest_file, self.indexer, env, workload, self.work / f"{key}-ingest.log"
        )
        events = int(await self.redis.xlen(stream))
        self.say(f"{key}: {events:,} events ingested in {ingest_s:.1f} s; indexing")
        cpu_before = self.server_cpu()
        seconds, stats = await asyncio.to_thread(
            run_replicas, self.indexer, env, replicas, self.work / key
        )
        pg_cpu, redis_cpu = (a - b for a, b in zip(self.server_cpu(), cpu_before, strict=True))
        dead = int(await self.redis.xlen(constants.dlq_stream(stream)))
        warnings = sum(_warnings(Path(f"{self.work / key}-{r.name}.log")) for r in stats)
        await self.redis.delete(stream, constants.dlq_stream(stream))
        self.say(f"{key}: {title}: {seconds:.1f} s, {events / seconds:,.0f} events/s")
        found = await inspect(self.pg.dsn(db), grown)
        copy = await self.copy_baseline(db, template, grown)
        self.say(f"{key}: COPY of its {copy.rows:,} rows: {copy.seconds:.1f} s")
        if key != "p1":  # p1's rows seed the grown tables
            await self.drop(db)
        return PhaseResult(
            key, title, events, seconds, ingest_s, stats, dead, warnings, pg_cpu, redis_cpu,
            found, copy,
        )  # fmt: skip

    def server_cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by PostgreSQL (all its processes) and by Redis."""
        return tree_cpu_s(self.pg_pid), tree_cpu_s(self.redis_pid)

    async def copy_baseline(self, db: str, template: str, measured_only: bool) -> CopyResult:
        """COPY the rows a phase wrote into a fresh copy of the database it started from."""
        dumps = await dump_tables(self.pg.dsn(db), measured_only, "binary")
        target = f"{db}_copy"
        await self.clone(target, template)
        try:
            return await copy_load(self.pg.dsn(target), dumps)
        finally:
            await self.drop(target)

    async def grow(self, source_db: str) -> GrownBase:
        """The grown template: copies of a phase's rows, DIDs suffixed per copy, then ANALYZE."""
        started = time.perf_counter()
        dumps = await dump_tables(self.pg.dsn(source_db), False, "text")
        per_copy = max(1, sum(d.rows for d in dumps))
        copies = self.opts.grow_rows // per_copy + 1
        await self.clone(GROWN_DB, EMPTY_DB)
        conn = await asyncpg.connect(self.pg.dsn(GROWN_DB))
        try:
            for n in range(copies):
                suffix = rb"did:plc:\g<1>" + f"{GROWN_MARK}{n}".encode()
                for d in dumps:
                    data = _DID.sub(suffix, d.data)
                    await conn.copy_to_table(
                        d.table, source=io.BytesIO(data), columns=d.columns, format="text"
                    )
            await conn.execute("VACUUM (ANALYZE)")
            rows = {t: await conn.fetchval(f"SELECT count(*) FROM {_q(t)}") for t in WRITTEN_TABLES}
        finally:
            await conn.close()
        await self.admin("CHECKPOINT")
        grown = GrownBase(rows, copies, time.perf_counter() - started)
        self.say(f"grown tables: {sum(rows.values()):,} rows in {grown.seconds:.1f} s")
        return grown

    async def machine(self) -> dict[str, str]:
        info = await self.redis.info("server")
        pg = {
            name: str(await self.admin(f"SHOW {name}"))
            for name in ("server_version", "shared_buffers", "fsync", "synchronous_commit")
        }
        return {
            "nproc": str(os.cpu_count()),
            "cpu": _cpu_model(),
            "ram": f"{_mem_total_gib():.1f} GiB",
            "postgres": pg.pop("server_version").split()[0],
            "postgres settings": ", ".join(f"{k}={v}" for k, v in pg.items()),
            "redis": str(info.get("redis_version", "?")),
            "python": f"{platform.python_version()} ({platform.python_implementation()})",
            "kernel": platform.release(),
        }

    async def run(self) -> Report:
        await self.prepare()
        report = Report(self.opts, await self.machine(), datetime.now(UTC))
        report.overhead_s = await self.overhead()
        self.say(f"fixed cost of one drain run: {report.overhead_s:.2f} s")
        for key, title, replicas in PHASES:
            if key == "g1":
                report.grown = await self.grow("bench_p1")
                await self.drop("bench_p1")
            report.phases[key] = await self.phase(key, title, replicas)
        report.total_s = time.perf_counter() - self._t0
        return report


def _indexer_executable() -> str:
    beside = Path(sys.executable).with_name("indexer")
    if beside.is_file():
        return str(beside)
    found = shutil.which("indexer")
    if found is None:
        raise RuntimeError("the `indexer` command is not installed (pip install -e .)")
    return found


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _mem_total_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return math.nan


# -- reporting -------------------------------------------------------------------------------

PHASE_HEADER = (
    "Phase",
    "Events",
    "Seconds",
    "Events/s",
    "COPY s",
    "COPY-eq events/s",
    "Indexer ÷ COPY",
    "Peak RSS MB",
    "CPU s indexer/PG/Redis",
    "Dead-lettered",
    "Log warnings",
    "Counters exact",
)


def _phase_rows(report: Report) -> list[list[str]]:
    rows = []
    for p in report.phases.values():
        title = p.title
        if p.key.startswith("g") and report.grown is not None:
            title += f" ({sum(report.grown.rows.values()):,} rows before)"
        indexer_cpu = sum(r.cpu_s for r in p.replicas)
        errors = ", ".join(f"{k} ({v})" for k, v in p.found.counter_errors.items())
        rows.append(
            [
                title,
                f"{p.events:,}",
                f"{p.seconds:.1f}",
                f"{p.rate:,.0f}",
                f"{p.copy.seconds:.2f}",
                f"{p.copy_rate:,.0f}",
                f"{p.ratio:.3f}",
                " / ".join(f"{r.peak_rss_mb:.0f}" for r in p.replicas),
                f"{indexer_cpu:.0f} / {p.pg_cpu_s:.0f} / {p.redis_cpu_s:.0f}",
                f"{p.dead_lettered:,}",
                f"{p.warnings:,}",
                "yes" if not errors else f"NO: {errors}",
            ]
        )
    return rows


def _row_counts(report: Report) -> tuple[list[str], list[list[str]]]:
    phases = list(report.phases.values())
    header = ["Table", *(p.key for p in phases if p.key.startswith("p"))]
    if report.grown is not None:
        header.append("grown base")
    header += [p.key for p in phases if p.key.startswith("g")]
    rows = []
    for table in (*WRITTEN_TABLES, "total"):
        cells = [table]
        for p in phases:
            if p.key == "g1" and report.grown is not None:
                cells.append(_count_cell(report.grown.rows, table))
            cells.append(_count_cell(p.found.rows, table))
        rows.append(cells)
    return header, rows


def _count_cell(rows: dict[str, int], table: str) -> str:
    return f"{sum(rows.values()) if table == 'total' else rows[table]:,}"


def _ratio(a: PhaseResult | None, b: PhaseResult | None, copy: bool = False) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{(a.copy_rate / b.copy_rate) if copy else (a.rate / b.rate):.2f}"


def _identical(a: PhaseResult | None, b: PhaseResult | None) -> str:
    if a is None or b is None:
        return "n/a"
    differ = [t for t in WRITTEN_TABLES if a.found.digests[t] != b.found.digests[t]]
    return "yes" if not differ else "no, differ in " + ", ".join(differ)


def _notes(report: Report) -> list[str]:
    ph = report.phases.get
    p1 = ph("p1")
    notes = [
        f"2 replicas ÷ 1 replica: empty {_ratio(ph('p2'), p1)}, grown {_ratio(ph('g2'), ph('g1'))}",
        f"grown ÷ empty: 1 replica {_ratio(ph('g1'), p1)}, 2 replicas "
        f"{_ratio(ph('g2'), ph('p2'))}, COPY {_ratio(ph('g1'), p1, copy=True)}",
        f"rows identical after 1 and 2 replicas: empty {_identical(p1, ph('p2'))}; "
        f"grown {_identical(ph('g1'), ph('g2'))}",
        f"fixed cost of one `indexer run --drain` on an empty stream (start-up, connect, "
        f"drain check, exit): {report.overhead_s:.2f} s, included in every wall time",
    ]
    if p1 is not None:
        notes.append(
            f"`indexer ingest file`: {p1.events / p1.ingest_seconds:,.0f} events/s "
            f"({p1.ingest_seconds:.1f} s, not part of any figure above)"
        )
    if report.grown is not None:
        g = report.grown
        notes.append(
            f"grown base: {sum(g.rows.values()):,} rows = {g.copies} copies of p1's rows "
            f"(DIDs suffixed {GROWN_MARK}N), COPY + VACUUM ANALYZE in {g.seconds:.0f} s"
        )
    notes.append(f"whole run: {report.total_s / 60:.1f} min")
    return notes


def render(report: Report, console: Console) -> None:
    o = report.opts
    table = Table(
        title=f"{o.events:,} events, batch {o.batch_size}, concurrency {o.concurrency}, "
        f"pool {o.pool_size}",
    )
    for n, name in enumerate(PHASE_HEADER):
        table.add_column(name, justify="left" if n == 0 else "right")
    for row in _phase_rows(report):
        table.add_row(*row)
    console.print(table)
    header, rows = _row_counts(report)
    counts = Table(title="Rows written (grown phases: the measured workload's rows only)")
    for n, name in enumerate(header):
        counts.add_column(name, justify="left" if n == 0 else "right")
    for row in rows:
        counts.add_row(*row)
    console.print(counts)
    for note in _notes(report):
        console.print(f"• {note}")


def _md_table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(":---" if n == 0 else "---:" for n in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(report: Report) -> str:
    o, m = report.opts, report.machine
    lines = [
        f"## {report.started:%Y-%m-%d %H:%M} UTC: {o.events:,} events",
        "",
        f"- machine: {m['nproc']} x {m['cpu']}, {m['ram']} RAM, kernel {m['kernel']}",
        f"- PostgreSQL {m['postgres']} ({m['postgres settings']}; throwaway test settings), "
        f"Redis {m['redis']}, Python {m['python']} with uvloop",
        f"- events {o.events:,} (seed {o.seed}; grown phases seed {o.seed + 1}), batch size "
        f"{o.batch_size}, concurrency {o.concurrency}, pool size {o.pool_size}, "
        f"grow rows {o.grow_rows:,}",
        "",
        *_md_table(PHASE_HEADER, _phase_rows(report)),
        "",
    ]
    lines += [f"- {note}" for note in _notes(report)]
    header, rows = _row_counts(report)
    lines += ["", "Rows written (grown phases: the measured workload's rows only):", ""]
    lines += _md_table(header, rows)
    return "\n".join(lines) + "\n"


def append_results(path: Path, section: str) -> None:
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    with path.open("a") as out:
        out.write("\n" + section)


# -- command line ----------------------------------------------------------------------------


def _count(text: str) -> int:
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="End-to-end indexer throughput beside the raw COPY rate of the same rows.",
    )
    parser.add_argument("--events", type=_count, default=200_000, help="events per phase")
    parser.add_argument("--batch-size", type=_count, default=constants.DEFAULT_BATCH_SIZE)
    parser.add_argument("--concurrency", type=_count, default=constants.DEFAULT_CONCURRENCY)
    parser.add_argument("--pool-size", type=_count, default=constants.DEFAULT_DB_POOL_SIZE)
    parser.add_argument(
        "--grow-rows", type=_count, default=2_000_000, help="rows in the grown tables (at least)"
    )
    parser.add_argument("--seed", type=int, default=1, help="workload seed (grown: seed + 1)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return Options(
        events=args.events,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        pool_size=args.pool_size,
        grow_rows=args.grow_rows,
        seed=args.seed,
        write=not args.no_write,
        results=args.results,
    )


async def _run(opts: Options, console: Console, work: Path) -> Report:
    with throwaway_redis(work) as redis_server, throwaway_postgres(work) as pg:
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
