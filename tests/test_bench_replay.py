"""bench.replay: a drain's statements cut into units per task, replayed, reported."""

from __future__ import annotations

import re

import pytest

from bench import profile
from bench.replay import Ceiling, Replayed, Statement, _Sent, units


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


def test_a_transaction_left_open_stays_one_unit() -> None:
    sent = [_sent(0, 1, 10, "BEGIN"), _sent(1, 1, 10, "UPDATE x"), _sent(2, 1, 11, "SELECT 3")]
    assert _queries(units(sent)) == [[["BEGIN", "UPDATE x"], ["SELECT 3"]]]


def test_the_report_sets_the_drain_and_the_replay_beside_copy() -> None:
    ceiling = Ceiling(
        events=100_000, drain_s=8.0, drain_client_cpu_s=3.0, drain_server_cpu_s=6.0,
        replay=Replayed(statements=2_266, errors=1, first_error="DeadlockDetectedError: x",
                        seconds=5.0),
        replay_client_cpu_s=0.5, replay_server_cpu_s=6.5, copy_s=4.0, connections=3,
        differ=["like", "post_agg"],
    )  # fmt: skip
    assert ceiling.report().splitlines() == [
        "replay: the drain's 2,266 statements again, without the replica, over 3 connections "
        "(one per task that sent them)",
        "  drain     12,500 events/s  CPU µs per event: replica 30, PostgreSQL 60",
        "  replay    20,000 events/s  CPU µs per event: client 5, PostgreSQL 65; statements "
        "failed 1 (first: DeadlockDetectedError: x)",
        "  COPY      25,000 events/s  (4.00 s for the drain's rows, one connection)",
        "  ÷ COPY: drain 0.50, replay 0.80",
        "  rows after the replay: differ from the drain's in like, post_agg",
    ]


def test_a_replay_writes_the_rows_the_drain_wrote(capsys: pytest.CaptureFixture[str]) -> None:
    profile.main(["--events", "3000", "--batch-size", "500", "--replay"])
    out = capsys.readouterr().out
    report = out[out.index("replay: the drain's ") :].splitlines()
    sent = int(re.match(r"replay: the drain's ([\d,]+) statements", report[0])[1].replace(",", ""))
    assert sent >= 6 * 10  # six batches of ten statements and more
    assert re.search(r"CPU µs per event: client \d+, PostgreSQL \d+; statements failed 0$",
                     report[2])  # fmt: skip
    assert report[-1] == "  rows after the replay: identical to the drain's"
    replay_rate, copy_rate = (float(re.search(r"([\d,]+) events/s", line)[1].replace(",", ""))
                              for line in report[2:4])  # fmt: skip
    assert replay_rate > 0 and copy_rate > 0
