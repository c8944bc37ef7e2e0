"""What PostgreSQL's backends do while replicas run: pg_stat_activity, sampled."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import asyncpg

_ACTIVITY = (
    "SELECT coalesce(wait_event_type || ':' || wait_event, 'running'), left(query, 60) "
    "FROM pg_stat_activity WHERE state = 'active' AND backend_type = 'client backend' "
    "AND datname = current_database() AND pid <> pg_backend_pid()"
)
_CLIENTS = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"


async def until_no_clients(conn: asyncpg.Connection, database: str, within_s: float = 10.0) -> None:
    """Wait (`within_s` at most) until no backend serves `database`, asking over `conn` (a
    connection to another database): a backend that has exited has reported its statistics,
    and been reaped, so its CPU is in the postmaster's count of its children."""
    for _ in range(int(within_s / 0.05)):
        if not await conn.fetchval(_CLIENTS, database):
            return
        await asyncio.sleep(0.05)


async def sample_waits(
    dsn: str, counts: Counter[tuple[str, str]], done: asyncio.Event, interval_s: float
) -> None:
    """Count (state, statement) of the database's active backends every interval until done:
    running, or waiting on what (`Lock:tuple`, `LWLock:WALWrite`, `Client:ClientRead`...)."""
    conn = await asyncpg.connect(dsn)
    try:
        while not done.is_set():
            for wait, query in await conn.fetch(_ACTIVITY):
                counts[(wait, re.sub(r"\s+", " ", query))] += 1
            await asyncio.sleep(interval_s)
    finally:
        await conn.close()


def lock_wait_share(counts: Counter[tuple[str, str]], statement: str = "") -> float:
    """The share of backend samples waiting for a heavyweight lock (a row, a transaction), in
    statements containing `statement` (all statements by default)."""
    total = sum(counts.values())
    locked = sum(n for (wait, query), n in _locked(counts) if statement in query)
    return locked / total if total else 0.0


def top_lock_waits(counts: Counter[tuple[str, str]], most: int) -> list[tuple[str, str, float]]:
    """The (wait, statement) pairs with the most samples waiting for a heavyweight lock, each
    with its share of all samples, most first."""
    total = sum(counts.values())
    ranked = sorted(_locked(counts), key=lambda pair: pair[1], reverse=True)
    return [(wait, query, n / total) for (wait, query), n in ranked[:most]]


def _locked(counts: Counter[tuple[str, str]]) -> list[tuple[tuple[str, str], int]]:
    return [(key, n) for key, n in counts.items() if key[0].startswith("Lock:")]
