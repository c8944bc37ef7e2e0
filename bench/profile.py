"""Where a replica's time goes: SQL statements by round-trip time, and the replica's Python.

    python -m bench.profile [--events N] [--batch-size B] [--concurrency C] [--grow COPIES]
                            [--celebrity SHARE [--scatter]] [--pyinstrument FILE]
                            [--server-statements] [--states] [--replay]

One in-process replica (uvloop) drains a workload (indexer.workload) from a throwaway Redis into
a throwaway migrated PostgreSQL, optionally after the tables were grown by COPIES suffixed
copies of a first pass (the copies alone: the pass runs in a database of its own), and optionally
with a celebrity taking SHARE of the likes, reposts and follows of the measured workload. Every
statement's round trip is timed on the client (PostgreSQL's work, lock waits, the wire),
grouped by statement; the rest of the wall time is the replica's own Python (decode, rows,
asyncpg encoding) and Redis. With --server-statements the cluster loads `pg_stat_statements`,
and the server's side is printed too: each statement's execution time (its lock waits
included; the round trip and the client not), rows and WAL records during the drain. With
--states, who runs during the drain instead of the backends' wait events: the replica,
PostgreSQL, both or neither (`bench.states`). With --replay, the drain's statements are then
sent again without the replica into a copy of the database it started from, and its rows are
copied with COPY into another: the write design's own rate beside the drain and COPY
(`bench.replay`; the drain runs on a third copy, each step starts after a checkpoint, the
rates count the batches' span from the first BEGIN to the last transaction's end, and
autovacuum is off unless --pg-setting says otherwise).
A development tool: its figures are wall times on a shared machine, to compare statements with
each other, not runs with runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop

from bench.options import add_server_options
from bench.procs import find_server_pid, tree_cpu_s
from bench.replay import Ceiling, Recorder, replay, span, units, wrapping
from bench.states import load as load_states
from bench.states import parent_pid
from bench.states import report as states_report
from bench.tables import (
    copy_load,
    dump_tables,
    inspect,
    load_suffixed_copies,
    quote_ident,
)
from bench.waits import sample_waits, until_no_clients
from indexer import constants, gcpolicy
from indexer.config import load_settings
from indexer.db import connect
from indexer.devservers import throwaway_postgres, throwaway_redis
from indexer.ingest_file import ingest_file
from indexer.metrics import Metrics
from indexer.migrate import migrate
from indexer.replica import Replica
from indexer.workload import DEFAULT_START_TIME_US, write_jsonl
from plugins import registry

# With --replay: three copies of the database as the drain finds it, none of them in
# PostgreSQL's cache, so the drain, the replay and COPY start alike.
_DRAIN_DB, _REPLAY_DB, _COPY_DB = "drain_target", "replay_target", "copy_target"
_FIRST_DB = "grow_first"  # --grow's first pass
_TIMED = ("execute", "fetch", "fetchval", "fetchrow", "executemany", "copy_records_to_table")
_SAMPLER_TABLE = "pg_stat_activity"  # what bench.waits reads; not the replica's statement
_STATEMENTS_LIBRARY = "pg_stat_statements"
# The database's statements since the reset, the tools' own (pg_stat_*) left out.
_SERVER_STATEMENTS = (
    "SELECT calls, rows, total_exec_time AS exec_ms, total_plan_time AS plan_ms, wal_records, "
    "regexp_replace(query, '\\s+', ' ', 'g') AS query FROM pg_stat_statements "
    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND query NOT LIKE '%pg\\_stat\\_%' ORDER BY total_exec_time DESC"
)


class StatementClock:
    """Wall seconds and calls per statement, measured around asyncpg's connection methods."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: defaultdict[str, int] = defaultdict(int)

    def timing(self) -> contextlib.AbstractContextManager[None]:
        return wrapping(_TIMED, self._timed)

    def _timed(self, method: Callable[..., Awaitable[Any]], name: str) -> Any:
        clock = self

        async def timed(conn: Any, query: Any = "", *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(conn, query, *args, **kwargs)
            finally:
                key = _label(name, query)
                clock.seconds[key] += time.perf_counter() - started
                clock.calls[key] += 1

        return timed

    def report(self, wall_s: float, batches: int) -> str:
        """The replica's statements by client-side time (the wait sampler's left out)."""
        timed = {k: v for k, v in self.seconds.items() if _SAMPLER_TABLE not in k}
        total = sum(timed.values())
        calls = sum(self.calls[k] for k in timed)
        lines = [
            f"wall {wall_s:.2f} s, {batches} batches; statements {total:.2f} s "
            f"({calls / max(batches, 1):.1f} per batch)",
            f"{'seconds':>8} {'share':>6} {'calls':>7} {'ms/call':>8}  statement",
        ]
        for key, seconds in sorted(timed.items(), key=lambda kv: -kv[1]):
            calls = self.calls[key]
            lines.append(
                f"{seconds:8.2f} {seconds / total:6.1%} {calls:7d} "
                f"{seconds / calls * 1000:8.2f}  {key}"
            )
        return "\n".join(lines)


def _label(method: str, query: Any) -> str:
    text = re.sub(r"\s+", " ", str(query))
    return f"{method}: {text[:110]}"


def _waits_report(counts: Counter[tuple[str, str]]) -> str:
    total = sum(counts.values()) or 1
    by_wait: Counter[str] = Counter()
    for (wait, _), n in counts.items():
        by_wait[wait] += n
    lines = ["backend samples (active client backends, every 10 ms):"]
    lines += [f"{n / total:6.1%}  {wait}" for wait, n in by_wait.most_common(8)]
    lines.append("top (state, statement):")
    lines += [f"{n / total:6.1%}  {w:28} {q}" for (w, q), n in counts.most_common(14)]
    return "\n".join(lines)


def server_report(rows: Sequence[Any], events: int, top: int = 25) -> str:
    """Execution time per statement on the server (pg_stat_statements rows), per event and per
    row, with the WAL records each wrote."""
    executed = sum(r["exec_ms"] for r in rows) / 1000
    planned = sum(r["plan_ms"] for r in rows) / 1000
    lines = [
        f"server: statements executed {executed:.2f} s ({executed / events * 1e6:.1f} µs per "
        f"event), planned {planned:.2f} s; {len(rows)} statements",
        f"{'exec s':>7} {'µs/event':>8} {'calls':>6} {'rows':>8} {'µs/row':>7} {'WAL recs':>9}"
        "  statement",
    ]
    for r in rows[:top]:
        us = r["exec_ms"] * 1000
        per_row = f"{us / r['rows']:7.1f}" if r["rows"] else f"{'-':>7}"
        lines.append(
            f"{r['exec_ms'] / 1000:7.2f} {us / events:8.1f} {r['calls']:6d} {r['rows']:8d} "
            f"{per_row} {r['wal_records']:9d}  {r['query'][:100]}"
        )
    return "\n".join(lines)


async def _query(dsn: str, *statements: str) -> list[Any]:
    """Run the statements on a connection of their own; the last one's rows."""
    conn = await connect(dsn)
    try:
        rows: list[Any] = []
        for statement in statements:
            rows = list(await conn.fetch(statement))
        return rows
    finally:
        await conn.close()


def _with_statements_library(settings: dict[str, str]) -> dict[str, str]:
    """The server settings with pg_stat_statements preloaded and tracking planning."""
    loaded = [x.strip() for x in settings.get("shared_preload_libraries", "").split(",")]
    loaded = [x for x in loaded if x]
    if _STATEMENTS_LIBRARY not in loaded:
        loaded.append(_STATEMENTS_LIBRARY)
    return settings | {
        "shared_preload_libraries": ",".join(loaded),
        "pg_stat_statements.track_planning": "on",
    }


async def _drain(
    redis_url: str, dsn: str, stream: str, args: argparse.Namespace
) -> tuple[float, float]:
    env = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": dsn,
        "INDEXER_STREAMS": stream,
        "INDEXER_BATCH_SIZE": str(args.batch_size),
        "INDEXER_CONCURRENCY": str(args.concurrency),
        "METRICS_PORT": "0",
        "INDEXER_BLOCK_MS": "100",
    }
    replica = Replica(load_settings(env), registry(), Metrics())
    gcpolicy.tune()  # as `indexer run` does
    started, cpu = time.perf_counter(), time.process_time()
    await replica.run(drain=True)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"replica CPU {cpu:.2f} s of {wall:.2f} s wall")
    return wall, cpu


async def _prepare(args: argparse.Namespace, work: Path, redis_url: str, pg: Any) -> str:
    """Migrate, grow the tables if asked, and fill the stream with the measured workload; the
    database to drain into (with --replay, one of three copies)."""
    dsn = pg.dsn()
    await migrate(dsn)
    if args.grow:
        # The first pass goes into a database of its own, as `bench.run` grows its tables: the
        # base is the copies alone (the first pass's own rows, unmarked, would count as the
        # measured workload's, and COPY of them would collide), and the tables it writes besides
        # the copied ones (`dirty_counter`, ...) stay as the migration left them.
        await _clone(pg.dsn, _FIRST_DB)
        first, first_dsn = work / "first.jsonl", str(pg.dsn(_FIRST_DB))
        write_jsonl(first, args.events, args.seed + 100)
        await ingest_file(_settings(redis_url, first_dsn, "grow_live"), str(first))
        await _drain(redis_url, first_dsn, "grow_live", args)
        dumps = await dump_tables(first_dsn, False, "text")
        await _quiet(pg.dsn, _FIRST_DB)
        await _query(pg.dsn("template1"), f"DROP DATABASE {quote_ident(_FIRST_DB)}")
        await load_suffixed_copies(dsn, dumps, args.grow)
    path = work / "workload.jsonl"
    later = DEFAULT_START_TIME_US + (86_400_000_000 if args.grow else 0)
    write_jsonl(
        path, args.events, args.seed, start_time_us=later, celebrity=args.celebrity,
        scatter=args.scatter,
    )  # fmt: skip
    await ingest_file(_settings(redis_url, dsn, "profile_live"), str(path))
    if not args.replay:
        return str(dsn)
    for target in (_DRAIN_DB, _REPLAY_DB, _COPY_DB):
        await _clone(pg.dsn, target)
    return str(pg.dsn(_DRAIN_DB))


async def _clone(dsn: Callable[[str], str], name: str) -> None:
    """A database `name` copied from `postgres` (migrated, and grown if asked) as it is now."""
    clone = f"CREATE DATABASE {quote_ident(name)} TEMPLATE postgres STRATEGY FILE_COPY"
    await _query(dsn("template1"), clone)


async def _main(args: argparse.Namespace, work: Path) -> None:
    with (
        throwaway_redis(work) as redis_server,
        throwaway_postgres(work, _server_settings(args), args.pg_locale) as pg,
    ):
        dsn = await _prepare(args, work, redis_server.url, pg)
        clock = StatementClock()
        with clock.timing():
            await _profile(args, redis_server.url, pg, dsn, clock)


async def _profile(
    args: argparse.Namespace, redis_url: str, pg: Any, dsn: str, clock: StatementClock
) -> None:
    """The drain, timed by `clock`, and what was asked beside it, printed."""
    recorder = Recorder()
    profiler = None
    if args.pyinstrument:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled", interval=0.002)
        profiler.start()
    waits: Counter[tuple[str, str]] = Counter()
    done = asyncio.Event()
    # With --states, the backends are read from /proc instead: a sampling connection
    # would be one more backend among them; with --replay, it would cost the drain
    # PostgreSQL's CPU that the replay does not pay.
    sampled = not (args.states or args.replay)
    sampler = asyncio.create_task(sample_waits(dsn, waits, done, 0.01)) if sampled else None
    states = await _start_states(dsn) if args.states else None
    if args.server_statements:
        await _query(
            dsn,
            f"CREATE EXTENSION IF NOT EXISTS {_STATEMENTS_LIBRARY}",
            "SELECT pg_stat_statements_reset()",
        )
    before = await _wal_and_checkpoints(dsn)
    pg_pid = find_server_pid("postgres", pg.port)
    server_cpu = tree_cpu_s(pg_pid)
    with recorder.recording() if args.replay else contextlib.nullcontext():
        wall, replica_cpu = await _drain(redis_url, dsn, "profile_live", args)
    if args.replay:  # the backends' CPU once they have exited and been counted
        await _quiet(pg.dsn, _DRAIN_DB)
    server_cpu = tree_cpu_s(pg_pid) - server_cpu
    if states is not None:
        states.terminate()
        output, _ = await states.communicate()
        who_runs = states_report(load_states(output.decode()), os.cpu_count() or 1)
    after = await _wal_and_checkpoints(dsn)
    statements = await _query(dsn, _SERVER_STATEMENTS) if args.server_statements else None
    done.set()
    if sampler is not None:
        await sampler
    if profiler is not None:
        profiler.stop()
        text = profiler.output_text(unicode=False, color=False, show_all=True)
        await asyncio.to_thread(Path(args.pyinstrument).write_text, text)
    print(f"{args.events / wall:,.0f} events/s")
    wal, checkpoints = (a - b for a, b in zip(after, before, strict=True))
    print(f"WAL {wal / 2**20:,.0f} MiB, {checkpoints} checkpoint(s) during the drain")
    print(clock.report(wall, -(-args.events // args.batch_size)))
    if states is not None:
        print(who_runs)
    elif sampler is not None:
        print(_waits_report(waits))
    if statements is not None:
        print(server_report(statements, args.events))
    if args.replay:
        drain = (wall, replica_cpu, server_cpu)
        print((await _ceiling(pg.dsn, pg_pid, recorder, drain, args)).report())


async def _ceiling(
    dsn: Callable[[str], str],
    pg_pid: int | None,
    recorder: Recorder,
    drain: tuple[float, float, float],
    args: argparse.Namespace,
) -> Ceiling:
    """The drain (wall, replica and server CPU seconds) beside COPY of its rows and its
    statements replayed without the replica, each after a checkpoint (the pages the one before
    dirtied are written before, not during, the next)."""
    grown = bool(args.grow)
    dumps = await dump_tables(dsn(_DRAIN_DB), grown, "binary")
    await _query(dsn("postgres"), "CHECKPOINT")
    copied = await copy_load(dsn(_COPY_DB), dumps)
    tasks, drain_s = units(recorder.sent), span(recorder.sent)
    recorder.sent.clear()
    await _query(dsn("postgres"), "CHECKPOINT")
    server, client = tree_cpu_s(pg_pid), time.process_time()
    replayed = await replay(dsn(_REPLAY_DB), tasks, timeout_s=max(60.0, 10 * drain[0]))
    client = time.process_time() - client
    await _quiet(dsn, _REPLAY_DB)
    server = tree_cpu_s(pg_pid) - server
    drained, again = await inspect(dsn(_DRAIN_DB), grown), await inspect(dsn(_REPLAY_DB), grown)
    differ = [t for t, digest in drained.digests.items() if again.digests.get(t) != digest]
    return Ceiling(
        args.events, drain_s, *drain, replayed, client, server, copied.seconds, len(tasks),
        differ,
    )  # fmt: skip


async def _quiet(dsn: Callable[[str], str], database: str) -> None:
    """Wait until no backend serves `database`, so the CPU of every one is counted."""
    conn = await connect(dsn("postgres"))
    try:
        await until_no_clients(conn, database)
    finally:
        await conn.close()


async def _start_states(dsn: str) -> asyncio.subprocess.Process:
    """`bench.states` sampling this process (the replica) and the database's backends."""
    conn = await connect(dsn)
    try:  # the backend's parent is the postmaster; read while the backend lives
        pid, database = await conn.fetchrow("SELECT pg_backend_pid(), current_database()")
        stat = await asyncio.to_thread(Path(f"/proc/{pid}/stat").read_text)
    finally:
        await conn.close()
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.states", str(os.getpid()), str(parent_pid(stat)), database,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


def _server_settings(args: argparse.Namespace) -> dict[str, str]:
    settings = dict(args.pg_setting)
    if args.replay:  # no vacuum of one copy's tables while another is measured
        settings.setdefault("autovacuum", "off")
    return _with_statements_library(settings) if args.server_statements else settings


async def _wal_and_checkpoints(dsn: str) -> tuple[int, int]:
    """Bytes of WAL written so far, and checkpoints started (timed or requested)."""
    (row,) = await _query(
        dsn,
        "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn AS wal, "
        "checkpoints_timed + checkpoints_req AS checkpoints FROM pg_stat_bgwriter",
    )
    return int(row["wal"]), int(row["checkpoints"])


def _settings(redis_url: str, dsn: str, stream: str) -> Any:
    return load_settings({"REDIS_URL": redis_url, "DATABASE_URL": dsn, "INDEXER_STREAMS": stream})


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="firehose-profile-") as work:
        Path(work).chmod(0o755)
        uvloop.run(_main(args, Path(work)))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=constants.DEFAULT_BATCH_SIZE)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--grow", type=int, default=0, help="suffixed copies of a first pass")
    parser.add_argument("--seed", type=int, default=1)
    add_server_options(parser)
    parser.add_argument(
        "--celebrity", type=float, default=0.0, help="share of likes and follows for one post"
    )
    parser.add_argument(
        "--scatter",
        action="store_true",
        help="the celebrity's control: its fans like and follow what everyone else does",
    )
    parser.add_argument(
        "--pyinstrument", help="write a pyinstrument text report here (pip install pyinstrument)"
    )
    parser.add_argument(
        "--server-statements",
        action="store_true",
        help="also print the server's execution time, rows and WAL records per statement "
        "(loads pg_stat_statements into the throwaway cluster)",
    )
    parser.add_argument(
        "--replay",
        action="store_true",
        help="then send the drain's statements again, without the replica, into a copy of the "
        "database it started from, and COPY its rows into another: the write design's own "
        "rate beside the drain and COPY (bench.replay; autovacuum off)",
    )
    parser.add_argument(
        "--states",
        action="store_true",
        help="instead of the backends' wait events, who runs during the drain: the replica, "
        "PostgreSQL, both or neither (bench.states, from /proc; Linux)",
    )
    return parser


if __name__ == "__main__":
    main()
