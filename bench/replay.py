"""A drain's statements replayed without the replica: what PostgreSQL alone makes of them.

`Recorder` notes every statement a drain sends through asyncpg (the method, the SQL and the
parameters as sent), with the connection it went over and the task that sent it. `units` cuts
each connection's statements into transactions (BEGIN to COMMIT or ROLLBACK) and single
statements, and gives each task its units in the order they ran. `replay` sends them again,
into another copy of the database the drain started from, one connection per task, the tasks
side by side as the replica's workers ran: the same SQL, the same rows, with none of the
replica's Python between the statements (no stream reads, no decoding, no rows built). Its rate
is what the write design itself allows, which a faster replica could approach. (The recorder
keeps every parameter until the replay: a few MB per batch.)
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from indexer.db import setup_connection

_RECORDED = ("execute", "fetch", "fetchval", "fetchrow", "executemany")


@dataclass(slots=True)
class Statement:
    method: str
    query: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(slots=True)
class _Sent:
    seq: int
    task: int
    conn: int
    statement: Statement


@dataclass(slots=True)
class Replayed:
    statements: int = 0
    errors: int = 0  # statements that failed (as in the drain, where a batch was retried)
    first_error: str = ""
    seconds: float = 0.0


class Recorder:
    """Notes the statements sent through asyncpg's connections between `start` and `stop`."""

    def __init__(self) -> None:
        self.sent: list[_Sent] = []
        self._originals: dict[str, Any] = {}

    def start(self) -> None:
        cls: Any = asyncpg.connection.Connection
        for name in _RECORDED:
            self._originals[name] = getattr(cls, name)
            setattr(cls, name, self._noting(self._originals[name], name))

    def stop(self) -> None:
        cls: Any = asyncpg.connection.Connection
        for name, method in self._originals.items():
            setattr(cls, name, method)
        self._originals.clear()

    def _noting(self, method: Callable[..., Awaitable[Any]], name: str) -> Any:
        sent = self.sent

        async def noted(conn: Any, query: Any = "", *args: Any, **kwargs: Any) -> Any:
            statement = Statement(name, str(query), args, kwargs)
            sent.append(_Sent(len(sent), id(asyncio.current_task()), id(conn), statement))
            return await method(conn, query, *args, **kwargs)

        return noted


def units(sent: list[_Sent]) -> list[list[list[Statement]]]:
    """Per task, in the order the tasks first sent: its units in order, each a transaction
    (BEGIN to COMMIT or ROLLBACK, on one connection) or a statement on its own."""
    open_units: dict[int, list[Statement]] = {}  # connection -> its transaction so far
    done: list[tuple[int, int, list[Statement]]] = []  # (first seq, task, unit)
    for s in sent:
        word = _first_word(s.statement.query)
        if (unit := open_units.get(s.conn)) is not None:
            unit.append(s.statement)
            if word in _ENDS and not _TO_SAVEPOINT.match(s.statement.query):
                del open_units[s.conn]
        elif word in _BEGINS:
            open_units[s.conn] = [s.statement]
            done.append((s.seq, s.task, open_units[s.conn]))
        else:
            done.append((s.seq, s.task, [s.statement]))
    by_task: dict[int, list[list[Statement]]] = {}
    for _, task, unit in sorted(done, key=lambda d: d[0]):
        by_task.setdefault(task, []).append(unit)
    return list(by_task.values())


_TO_SAVEPOINT = re.compile(r"\s*ROLLBACK\s+(WORK\s+|TRANSACTION\s+)?TO\b", re.IGNORECASE)
_BEGINS = frozenset({"BEGIN", "START"})
_ENDS = frozenset({"COMMIT", "ROLLBACK", "END", "ABORT"})


def _first_word(query: str) -> str:
    words = query.split(None, 1)
    return words[0].rstrip(";").upper() if words else ""


async def replay(dsn: str, tasks: list[list[list[Statement]]]) -> Replayed:
    """Send each task's units over a connection of its own, the tasks at once; a failed
    statement is counted and its transaction rolled back, as the drain's was."""
    result = Replayed()
    conns = [await asyncpg.connect(dsn) for _ in tasks]
    try:
        for conn in conns:
            await setup_connection(conn)
        started = time.perf_counter()
        await asyncio.gather(*(_send(c, t, result) for c, t in zip(conns, tasks, strict=True)))
        result.seconds = time.perf_counter() - started
    finally:
        for conn in conns:
            await conn.close()
    return result


async def _send(conn: Any, task: list[list[Statement]], result: Replayed) -> None:
    for unit in task:
        for statement in unit:
            result.statements += 1
            try:
                await getattr(conn, statement.method)(
                    statement.query, *statement.args, **statement.kwargs
                )
            except asyncpg.PostgresError as exc:
                result.errors += 1
                result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
        if conn.is_in_transaction():  # a unit whose COMMIT failed, or one cut short
            await conn.execute("ROLLBACK")


@dataclass(slots=True)
class Ceiling:
    """A drain, its replay and COPY of its rows, side by side."""

    events: int
    drain_s: float
    drain_client_cpu_s: float
    drain_server_cpu_s: float
    replay: Replayed
    replay_client_cpu_s: float
    replay_server_cpu_s: float
    copy_s: float
    connections: int
    differ: list[str] = field(default_factory=list)  # tables whose rows differ from the drain's

    def report(self) -> str:
        n = self.events

        def per_event(seconds: float) -> float:
            return seconds / n * 1e6

        copy_rate = n / self.copy_s
        drain_rate, replay_rate = n / self.drain_s, n / self.replay.seconds
        rows = "identical to the drain's"
        if self.differ:
            rows = f"differ from the drain's in {', '.join(self.differ)}"
        return "\n".join(
            [
                f"replay: the drain's {self.replay.statements:,} statements again, without the "
                f"replica, over {self.connections} connections (one per task that sent them)",
                f"  drain  {drain_rate:9,.0f} events/s  CPU µs per event: replica "
                f"{per_event(self.drain_client_cpu_s):.0f}, PostgreSQL "
                f"{per_event(self.drain_server_cpu_s):.0f}",
                f"  replay {replay_rate:9,.0f} events/s  CPU µs per event: client "
                f"{per_event(self.replay_client_cpu_s):.0f}, PostgreSQL "
                f"{per_event(self.replay_server_cpu_s):.0f}; statements failed "
                f"{self.replay.errors}"
                + (f" (first: {self.replay.first_error[:120]})" if self.replay.errors else ""),
                f"  COPY   {copy_rate:9,.0f} events/s  ({self.copy_s:.2f} s for the drain's rows, "
                "one connection)",
                f"  ÷ COPY: drain {drain_rate / copy_rate:.2f}, "
                f"replay {replay_rate / copy_rate:.2f}",
                f"  rows after the replay: {rows}",
            ]
        )
