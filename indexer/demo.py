"""`make demo`: the whole job on an embedded default, on throwaway local servers.

Starts Redis and PostgreSQL in a temporary directory, migrates, ingests the bundled sample of
events (or a freshly generated one), drains the stream with two replica processes, and prints
what was indexed, the lag and the throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from indexer.devservers import throwaway_postgres, throwaway_redis
from indexer.drift import drift
from indexer.workload import write_jsonl

SAMPLE = Path(__file__).parent / "data" / "sample.jsonl.zst"
TABLES = (
    "record", "actor", "post", "like", "repost", "follow", "actor_block", "profile", "quote",
    "feed_item", "duplicate_record", "post_agg", "profile_agg",
)  # fmt: skip
console = Console()


def _indexer(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "indexer.cli", *args], env=env)


def _check(proc: subprocess.Popen[bytes], what: str) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"demo: {what} failed with exit code {proc.returncode}")


def _run(sample: Path, workdir: Path, replicas: int) -> dict[str, Any]:
    with throwaway_redis(workdir) as redis_server, throwaway_postgres(workdir) as pg:
        pg.create_database("demo")
        env = os.environ | {
            "REDIS_URL": redis_server.url, "DATABASE_URL": pg.dsn("demo"), "METRICS_PORT": "0",
        }  # fmt: skip
        _check(_indexer(env, "migrate"), "indexer migrate")
        console.print(f"[bold]ingesting[/] {sample}")
        _check(_indexer(env, "--log-level", "WARNING", "ingest", "file", str(sample)), "ingest")
        console.print(f"[bold]draining[/] with {replicas} replicas")
        started = time.monotonic()
        procs = [
            _indexer(env, "--log-level", "WARNING", "run", "--drain", "--consumer", f"demo-{n}")
            for n in range(1, replicas + 1)
        ]
        for proc in procs:
            _check(proc, "indexer run --drain")
        seconds = time.monotonic() - started
        return asyncio.run(_report(redis_server.url, pg.dsn("demo"), seconds))


async def _report(redis_url: str, dsn: str, seconds: float) -> dict[str, Any]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    conn = await asyncpg.connect(dsn)
    try:
        groups = await client.xinfo_groups("firehose_live")
        stream_length = await client.xlen("firehose_live")
        rows = {t: await conn.fetchval(f'SELECT count(*) FROM "{t}"') for t in TABLES}
        hot_posts = await conn.fetch(
            'SELECT uri, "likeCount", "repostCount", "replyCount", "quoteCount" FROM post_agg '
            'ORDER BY "likeCount" DESC LIMIT 5'
        )
        hot_people = await conn.fetch(
            'SELECT did, "followersCount", "followsCount", "postsCount" FROM profile_agg '
            'ORDER BY "followersCount" DESC LIMIT 5'
        )
        return {
            "seconds": seconds,
            "events": int(groups[0]["entries-read"] or 0),  # the stream itself is trimmed
            "stream_length": stream_length,
            "group": groups[0],
            "dlq": await client.xlen("firehose_live:dlq"),
            "rows": rows,
            "hot_posts": hot_posts,
            "hot_people": hot_people,
            "drift": await drift(conn),
        }
    finally:
        await conn.close()
        await client.aclose()


def _print(report: dict[str, Any]) -> None:
    rows = Table("table", "rows", title="Indexed")
    for table, count in report["rows"].items():
        rows.add_row(table, f"{count:,}")
    console.print(rows)
    posts = Table("post", "likes", "reposts", "replies", "quotes", title="Hottest posts")
    for r in report["hot_posts"]:
        posts.add_row(r["uri"], *(str(v) for v in list(r.values())[1:]))
    console.print(posts)
    people = Table("account", "followers", "follows", "posts", title="Most followed")
    for r in report["hot_people"]:
        people.add_row(r["did"], *(str(v) for v in list(r.values())[1:]))
    console.print(people)
    group, n, s = report["group"], report["events"], report["seconds"]
    drifted = sum(report["drift"].values())
    console.print(
        f"[bold]lag[/]: {group['lag']} entries not yet delivered, {group['pending']} pending, "
        f"{report['dlq']} dead-lettered; the stream holds {report['stream_length']:,} entries "
        "(trimmed below what the group has ACKed)\n"
        f"[bold]throughput[/]: {n:,} events in {s:.1f}s = {n / s:,.0f} events/s "
        f"(two replicas, this machine, including process start-up)\n"
        f"[bold]counters[/]: {'exact (drift 0)' if drifted == 0 else f'{drifted} keys drifted'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m indexer.demo", description=__doc__)
    parser.add_argument(
        "--events",
        type=int,
        default=0,
        help="generate this many events instead of the bundled sample",
    )
    parser.add_argument("--replicas", type=int, default=2, help="replica processes (default 2)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="indexer-demo-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)  # the PostgreSQL server user must reach its data directory
        sample = SAMPLE
        if args.events:
            sample = workdir / "sample.jsonl.zst"
            write_jsonl(sample, args.events, seed=1)
        _print(_run(sample, workdir, args.replicas))


if __name__ == "__main__":
    main()
