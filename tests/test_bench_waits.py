"""The benchmark's reading of pg_stat_activity samples: which of them wait for a lock."""

from __future__ import annotations

from collections import Counter

from bench.waits import lock_wait_share, top_lock_waits

SAMPLES = Counter(
    {
        ("running", "WITH input AS"): 50,
        ("Lock:transactionid", "INSERT INTO actor"): 20,
        ("Lock:transactionid", "WITH input AS"): 15,
        ("Lock:advisory", "SELECT pg_advisory_xact_lock"): 5,
        ("LWLock:WALWrite", "INSERT INTO actor"): 10,  # not a heavyweight lock
    }
)


def test_lock_waits_are_shares_of_all_samples():
    assert lock_wait_share(SAMPLES) == 0.4
    assert lock_wait_share(SAMPLES, "INSERT INTO actor") == 0.2
    assert lock_wait_share(Counter()) == 0.0


def test_the_statements_waiting_most_come_first():
    assert top_lock_waits(SAMPLES, 2) == [
        ("Lock:transactionid", "INSERT INTO actor", 0.2),
        ("Lock:transactionid", "WITH input AS", 0.15),
    ]
    assert [w for w, _, _ in top_lock_waits(SAMPLES, 5)] == ["Lock:transactionid"] * 2 + [
        "Lock:advisory"
    ]
    assert top_lock_waits(Counter(), 3) == []
