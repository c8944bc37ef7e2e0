"""Database failures are classified: retry (outage, contention), dead-letter (data), or crash."""

from __future__ import annotations

import asyncpg
import msgspec
import pytest
from asyncpg.exceptions import _base

from indexer.db import BadRows, is_contention, is_data_error, is_unavailable, rows_json


def test_failures_are_classified():
    assert is_data_error(asyncpg.UniqueViolationError("dup"))
    assert is_data_error(asyncpg.ProgramLimitExceededError("index row too big"))
    assert is_data_error(_base.DataError("invalid input for query argument"))
    assert not is_unavailable(_base.DataError("invalid input for query argument"))
    assert is_unavailable(asyncpg.InterfaceError("connection is closed"))
    assert is_unavailable(asyncpg.ConnectionDoesNotExistError("gone"))
    assert is_unavailable(asyncpg.CannotConnectNowError("starting up"))
    assert is_unavailable(ConnectionRefusedError())
    assert is_unavailable(TimeoutError())
    assert is_contention(asyncpg.DeadlockDetectedError("deadlock"))
    assert is_contention(asyncpg.SerializationError("serialization"))
    assert is_contention(asyncpg.InvalidCachedStatementError("cached plan must not change"))
    assert not is_unavailable(asyncpg.UndefinedTableError("no table"))
    assert not is_data_error(asyncpg.UndefinedTableError("no table"))


def test_rows_json_round_trips_and_refuses_what_it_cannot_send_as_bad_data():
    rows = [("at://x/y/z", None, 3, True, 'quote " back\\slash \u00e9 \x1f')]
    assert msgspec.json.decode(rows_json(rows)) == [list(rows[0])]
    for bad in ([("lone \ud800 surrogate",)], [(object(),)]):
        with pytest.raises(BadRows) as caught:
            rows_json(bad)
        assert is_data_error(caught.value) and not is_unavailable(caught.value)
