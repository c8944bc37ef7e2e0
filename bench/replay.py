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
import contextlib
import itertools
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
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
    task: int  # serial numbers, not id(): an id is reused once its object is gone
    conn: int
    statement: Statement
    started: float = 0.0  # time.perf_counter() when sent, and when its reply came
    ended: float = 0.0


@dataclass(slots=True)
class Replayed:
    statements: int = 0
    errors: int = 0  # statements that failed (as in the drain, where a batch was retried)
    first_error: str = ""
    seconds: float = 0.0  # from the first transaction's BEGIN to the last one's end


@contextlib.contextmanager
def wrapping(names: Iterable[str], wrap: Callable[[Any, str], Any]) -> Iterator[None]:
    """asyncpg's connection methods `names`, each replaced by `wrap(method, name)` inside the
    block; the methods found are back when it ends, however it ends."""
    cls: Any = asyncpg.connection.Connection
    originals = {name: getattr(cls, name) for name in names}
    for name, method in originals.items():
        setattr(cls, name, wrap(method, name))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(cls, name, method)


class Recorder:
    """Notes the statements sent through asyncpg's connections inside `recording()`."""

    def __init__(self) -> None:
        self.sent: list[_Sent] = []
        self._serials: dict[int, tuple[object, int]] = {}  # id -> (the object, its serial)
        self._next = itertools.count(1)

    def recording(self) -> contextlib.AbstractContextManager[None]:
        return wrapping(_RECORDED, self._noting)

    def _serial(self, thing: object) -> int:
        known = self._serials.get(id(thing))
        if known is None or known[0] is not thing:  # kept alive here, so never a stale match
            known = (thing, next(self._next))
            self._serials[id(thing)] = known
        return known[1]

    def _noting(self, method: Callable[..., Awaitable[Any]], name: str) -> Any:
        sent = self.sent

        async def noted(conn: Any, query: Any = "", *args: Any, **kwargs: Any) -> Any:
            task, link = self._serial(asyncio.current_task()), self._serial(conn)
            note = _Sent(len(sent), task, link, Statement(name, str(query), args, kwargs))
            sent.append(note)
            note.started = time.perf_counter()
            try:
                return await method(conn, query, *args, **kwargs)
            finally:
                note.ended = time.perf_counter()

        return noted


def units(sent: list[_Sent]) -> list[list[list[Statement]]]:
    """Per task, in the order the tasks first sent: its units in order, each a transaction
    (BEGIN to COMMIT or ROLLBACK, on one connection) or a statement on its own. Whatever is
    sent on a connection inside its transaction belongs to it (the pool's ROLLBACK of a
    connection released mid-transaction, from a task of its own), and the pool's reset of a
    released connection goes with the task that used it last (it releases that task's session
    locks).

    A task that goes on with its transaction on one connection after sending on another
    cannot be replayed as it ran (its units are replayed one after the other): that raises
    ValueError. (A transaction it left, which the pool then rolls back, is fine.)"""
    open_units: dict[int, list[Statement]] = {}  # connection -> its transaction so far
    owner: dict[int, int] = {}  # connection -> the task whose transaction is open on it
    left: set[int] = set()  # connections whose owner has sent elsewhere since
    last_user: dict[int, int] = {}  # connection -> the task that used it last
    done: list[tuple[int, int, list[Statement]]] = []  # (first seq, task, unit)
    for s in sent:
        query = s.statement.query
        word = _first_word(query)
        left.update(c for c, t in owner.items() if t == s.task and c != s.conn)
        if (unit := open_units.get(s.conn)) is not None:
            if s.task == owner[s.conn] and s.conn in left:
                raise ValueError(
                    f"task {s.task} went on with its transaction on connection {s.conn} after "
                    "sending on another: the replay would reorder them"
                )
            unit.append(s.statement)
            if word in _ENDS and not _TO_SAVEPOINT.match(query):
                del open_units[s.conn], owner[s.conn]
                left.discard(s.conn)
            continue
        task = last_user.get(s.conn, s.task) if _POOL_RESET.match(query) else s.task
        last_user[s.conn] = task
        if word in _BEGINS:
            open_units[s.conn], owner[s.conn] = [s.statement], task
            done.append((s.seq, task, open_units[s.conn]))
        else:
            done.append((s.seq, task, [s.statement]))
    by_task: dict[int, list[list[Statement]]] = {}
    for _, task, unit in sorted(done, key=lambda d: d[0]):
        by_task.setdefault(task, []).append(unit)
    return list(by_task.values())


def span(sent: list[_Sent]) -> float:
    """Seconds from the first BEGIN sent to the end of the last transaction: the batches'
    span, without the start-up before them and the shutdown after them."""
    begins = [s.started for s in sent if _first_word(s.statement.query) in _BEGINS]
    ends = [s.ended for s in sent if _first_word(s.statement.query) in _ENDS]
    return max(ends) - min(begins) if begins and ends else 0.0


_TO_SAVEPOINT = re.compile(r"\s*ROLLBACK\s+(WORK\s+|TRANSACTION\s+)?TO\b", re.IGNORECASE)
_POOL_RESET = re.compile(r"\s*SELECT pg_advisory_unlock_all\(\)")  # asyncpg's reset query
_BEGINS = frozenset({"BEGIN", "START"})
_ENDS = frozenset({"COMMIT", "ROLLBACK", "END", "ABORT"})


def _first_word(query: str) -> str:
    words = query.split(None, 1)
    return words[0].rstrip(";").upper() if words else ""


async def replay(
    dsn: str, tasks: list[list[list[Statement]]], timeout_s: float = 600.0
) -> Replayed:
    """Send each task's units over a connection of its own, the tasks at once; a failed
    statement is counted and its transaction rolled back, as the drain's was. The connections
    are closed before this returns."""
    result = Replayed()
    sent: list[_Sent] = []
    conns = [await asyncpg.connect(dsn) for _ in tasks]
    try:
        for conn in conns:
            await setup_connection(conn)
        sends = (_send(c, t, result, sent) for c, t in zip(conns, tasks, strict=True))
        try:
            await asyncio.wait_for(asyncio.gather(*sends), timeout_s)
        except TimeoutError:
            raise RuntimeError(f"the replay did not finish in {timeout_s:.0f} s") from None
    finally:
        for conn in conns:
            await conn.close()
    result.seconds = span(sent)
    return result


async def _send(
    conn: Any, task: list[list[Statement]], result: Replayed, sent: list[_Sent]
) -> None:
    for unit in task:
        for statement in unit:
            result.statements += 1
            note = _Sent(len(sent), 0, 0, statement, started=time.perf_counter())
            sent.append(note)
            try:
                await getattr(conn, statement.method)(
                    statement.query, *statement.args, **statement.kwargs
                )
            except Exception as exc:  # counted, and the unit goes on as the drain's did
                result.errors += 1
                result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
            note.ended = time.perf_counter()
        if not conn.is_closed() and conn.is_in_transaction():  # a unit cut short
            await conn.execute("ROLLBACK")


@dataclass(slots=True)
class Ceiling:
    """A drain, its replay and COPY of its rows, side by side."""

    events: int
    drain_s: float  # the batches' span (`span`)
    drain_run_s: float  # the whole `replica.run`, start-up and shutdown included
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
        failed = f"statements failed {self.replay.errors}"
        if self.replay.errors:
            failed += f" (first: {self.replay.first_error[:120]})"
        return "\n".join(
            [
                f"replay: the drain's {self.replay.statements:,} statements again, without the "
                f"replica, over {self.connections} connections (one per task that sent them)",
                "  events/s from the first BEGIN to the end of the last transaction:",
                f"  drain  {drain_rate:9,.0f} events/s  ({n / self.drain_run_s:,.0f} over the "
                "whole run)  CPU µs per event: replica "
                f"{per_event(self.drain_client_cpu_s):.0f}, PostgreSQL "
                f"{per_event(self.drain_server_cpu_s):.0f}",
                f"  replay {replay_rate:9,.0f} events/s  CPU µs per event: client "
                f"{per_event(self.replay_client_cpu_s):.0f}, PostgreSQL "
                f"{per_event(self.replay_server_cpu_s):.0f}; {failed}",
                f"  COPY   {copy_rate:9,.0f} events/s  ({self.copy_s:.2f} s for the drain's rows, "
                "one connection)",
                f"  ÷ COPY: drain {drain_rate / copy_rate:.2f}, "
                f"replay {replay_rate / copy_rate:.2f}; "
                f"replay ÷ drain {replay_rate / drain_rate:.2f}",
                f"  rows after the replay: {rows}",
            ]
        )
