"""bench.replay: a drain's statements cut into units per task, replayed, reported."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest

from bench import profile
from bench.replay import Ceiling, Recorder, Replayed, Statement, _Sent, replay, span, units


def _sent(seq: int, task: int, conn: int, query: str) -> _Sent:
    return _Sent(seq, task, conn, Statement("execute", query, (), {}))


def _queries(tasks: list[list[list[Statement]]]) -> list[list[list[str]]]:
    return [[[s.query for s in unit] for unit in task] for task in tasks]


def test_units_keep_each_transaction_whole_and_each_task_in_order() -> None:
    sent = [
        _sent(0, 1, 10, "BEGIN;"),
        _sent(1, 2, 20, "SELECT 1"),  # task 2, outside a transaction
        _sent(2, 1, 10, "INSERT a"),
        _sent(3, 2, 20, "BEGIN;"),
        _sent(4, 1, 10, "SAVEPOINT s"),
        _sent(5, 1, 10, "ROLLBACK TO SAVEPOINT s"),  # not the end of the transaction
        _sent(6, 2, 20, "INSERT b"),
        _sent(7, 1, 10, "COMMIT;"),
        _sent(8, 1, 11, "SELECT 2"),  # task 1 again, on another connection
        _sent(9, 2, 20, "ROLLBACK;"),
        _sent(10, 3, 10, "RESET ALL"),  # the pool's reset, from a task of its own
    ]
    assert _queries(units(sent)) == [
        [
            ["BEGIN;", "INSERT a", "SAVEPOINT s", "ROLLBACK TO SAVEPOINT s", "COMMIT;"],
            ["SELECT 2"],
        ],
        [["SELECT 1"], ["BEGIN;", "INSERT b", "ROLLBACK;"]],
        [["RESET ALL"]],
    ]


def test_a_task_on_two_connections_at_once_is_refused_not_reordered() -> None:
    sent = [
        _sent(0, 1, 10, "BEGIN;"),
        _sent(1, 1, 10, "INSERT a"),
        _sent(2, 1, 11, "SELECT 1"),  # task 1 on another connection, mid-transaction
        _sent(3, 1, 10, "INSERT b"),  # and back in its transaction: not replayable as it ran
        _sent(4, 1, 10, "COMMIT;"),
    ]
    with pytest.raises(ValueError, match="task 1 went on with its transaction on connection 10"):
        units(sent)
    # The same statement once the transaction has ended, or after one the task left for the
    # pool to roll back (a canceled batch, retried on another connection), is replayable.
    after = [sent[0], sent[1], sent[4], sent[2]]
    assert _queries(units(after)) == [[["BEGIN;", "INSERT a", "COMMIT;"], ["SELECT 1"]]]
    abandoned = [sent[0], sent[1], sent[2], _sent(3, 7, 10, "ROLLBACK;")]
    assert _queries(units(abandoned)) == [[["BEGIN;", "INSERT a", "ROLLBACK;"], ["SELECT 1"]]]


def test_the_pools_statements_go_with_the_task_that_used_the_connection() -> None:
    reset = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"
    sent = [
        _sent(0, 1, 10, "SELECT pg_advisory_lock(1, 2)"),  # a session lock, as deletions take
        _sent(1, 1, 10, "BEGIN;"),
        _sent(2, 1, 10, "INSERT a"),
        _sent(3, 7, 10, "ROLLBACK;"),  # the pool rolls back a connection released mid-way
        _sent(4, 8, 10, reset),  # and resets it, each from a task of its own
        _sent(5, 2, 10, "SELECT 4"),  # the next task to take the connection
    ]
    assert _queries(units(sent)) == [
        [["SELECT pg_advisory_lock(1, 2)"], ["BEGIN;", "INSERT a", "ROLLBACK;"], [reset]],
        [["SELECT 4"]],
    ]


def test_the_span_runs_from_the_first_begin_to_the_last_transactions_end() -> None:
    sent = [
        _Sent(0, 1, 10, Statement("execute", "SELECT 1", (), {}), started=1.0, ended=1.5),
        _Sent(1, 1, 10, Statement("execute", "BEGIN;", (), {}), started=2.0, ended=2.1),
        _Sent(2, 2, 11, Statement("execute", "BEGIN;", (), {}), started=2.5, ended=2.6),
        _Sent(3, 1, 10, Statement("execute", "COMMIT;", (), {}), started=4.0, ended=4.2),
        _Sent(4, 2, 11, Statement("execute", "ROLLBACK;", (), {}), started=5.0, ended=5.5),
        _Sent(5, 1, 10, Statement("fetch", "SELECT 2", (), {}), started=6.0, ended=7.0),
    ]
    assert span(sent) == pytest.approx(3.5)
    assert span(sent[:1]) == 0.0


def test_a_transaction_left_open_stays_one_unit() -> None:
    sent = [_sent(0, 1, 10, "BEGIN"), _sent(1, 1, 10, "UPDATE x"), _sent(2, 1, 11, "SELECT 3")]
    assert _queries(units(sent)) == [[["BEGIN", "UPDATE x"], ["SELECT 3"]]]


def test_the_report_sets_the_drain_and_the_replay_beside_copy() -> None:
    ceiling = Ceiling(
        events=100_000, drain_s=8.0, drain_run_s=10.0, drain_client_cpu_s=3.0,
        drain_server_cpu_s=6.0,
        replay=Replayed(statements=2_266, errors=1, first_error="DeadlockDetectedError: x",
                        seconds=5.0),
        replay_client_cpu_s=0.5, replay_server_cpu_s=6.5, copy_s=4.0, connections=3,
        differ=["like", "post_agg"],
    )  # fmt: skip
    assert ceiling.report().splitlines() == [
        "replay: the drain's 2,266 statements again, without the replica, over 3 connections "
        "(one per task that sent them)",
        "  events/s from the first BEGIN to the end of the last transaction:",
        "  drain     12,500 events/s  (10,000 over the whole run)  CPU µs per event: replica 30, "
        "PostgreSQL 60",
        "  replay    20,000 events/s  CPU µs per event: client 5, PostgreSQL 65; statements "
        "failed 1 (first: DeadlockDetectedError: x)",
        "  COPY      25,000 events/s  (4.00 s for the drain's rows, one connection)",
        "  ÷ COPY: drain 0.50, replay 0.80; replay ÷ drain 1.60",
        "  rows after the replay: differ from the drain's in like, post_agg",
    ]


# Each waits, in one statement, until the other has done its part: only side by side do both
# finish (one after the other, the first gives up after 5 s).
_UNTIL_WAITED_FOR = """DO $$ BEGIN FOR i IN 1..500 LOOP
  IF EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted) THEN RETURN;
  END IF; PERFORM pg_sleep(0.01); END LOOP; RAISE EXCEPTION 'nobody waited'; END $$"""
_UNTIL_HELD = """DO $$ BEGIN FOR i IN 1..500 LOOP
  IF EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
             AND pid <> pg_backend_pid()) THEN RETURN;
  END IF; PERFORM pg_sleep(0.01); END LOOP; RAISE EXCEPTION 'nobody held it'; END $$"""


async def test_a_replay_runs_the_tasks_side_by_side_and_counts_what_fails(
    database_url: str,
) -> None:
    setup = await asyncpg.connect(database_url)
    await setup.execute("CREATE TABLE t (k int PRIMARY KEY)")
    conns = [await asyncpg.connect(database_url) for _ in range(3)]

    async def holder() -> None:
        await conns[0].execute("SELECT pg_advisory_lock(4242)")
        await conns[0].execute(_UNTIL_WAITED_FOR)
        await conns[0].execute("SELECT pg_advisory_unlock(4242)")

    async def waiter() -> None:
        await conns[1].execute(_UNTIL_HELD)
        await conns[1].execute("SELECT pg_advisory_lock(4242)")
        await conns[1].execute("INSERT INTO t VALUES (1)")
        await conns[1].execute("SELECT pg_advisory_unlock(4242)")

    async def failing() -> None:
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with conns[2].transaction():
                await conns[2].execute("INSERT INTO t VALUES (2)")
                await conns[2].execute("SELECT 1 / 0")

    recorder = Recorder()
    try:
        with recorder.recording():
            await asyncio.gather(holder(), waiter(), failing())
    finally:
        for conn in conns:
            await conn.close()
    assert await setup.fetch("SELECT k FROM t") == [(1,)]
    await setup.execute("TRUNCATE t")
    tasks = units(recorder.sent)
    assert len(tasks) == 3
    replayed = await replay(database_url, tasks, timeout_s=30)
    try:
        assert (replayed.errors, replayed.first_error.split(":")[0]) == (1, "DivisionByZeroError")
        assert replayed.statements == len(recorder.sent) == 4 + 3 + 4  # BEGIN ... ROLLBACK
        assert await setup.fetch("SELECT k FROM t") == [(1,)]  # not 2: it was rolled back
        assert replayed.seconds > 0
    finally:
        await setup.close()


def test_a_replay_writes_the_rows_the_drain_wrote(capsys: pytest.CaptureFixture[str]) -> None:
    methods = {name: getattr(asyncpg.connection.Connection, name) for name in _METHODS}
    profile.main(["--events", "3000", "--batch-size", "500", "--replay"])
    # the clock's and the recorder's wrappers are gone: later tests run asyncpg as it is
    assert {name: getattr(asyncpg.connection.Connection, name) for name in _METHODS} == methods
    out = capsys.readouterr().out
    report = out[out.index("replay: the drain's ") :].splitlines()
    sent = int(re.match(r"replay: the drain's ([\d,]+) statements", report[0])[1].replace(",", ""))
    assert sent >= 6 * 10  # six batches of ten statements and more
    lines = {line.split()[0]: line for line in report[2:5]}  # drain, replay, COPY
    assert re.search(r"CPU µs per event: client \d+, PostgreSQL \d+; statements failed 0$",
                     lines["replay"])  # fmt: skip
    assert report[-1] == "  rows after the replay: identical to the drain's"
    rates = {k: float(re.search(r"([\d,]+) events/s", v)[1].replace(",", "")) for k, v in
             lines.items()}  # fmt: skip
    whole = float(re.search(r"\(([\d,]+) over the whole run\)", lines["drain"])[1].replace(",", ""))
    assert rates["drain"] > whole > 0  # the span leaves start-up and shutdown out
    assert rates["replay"] > 0 and rates["COPY"] > 0


_METHODS = ("execute", "fetch", "fetchval", "fetchrow", "executemany", "copy_records_to_table")
