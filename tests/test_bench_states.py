"""bench.states: who runs during a drain, from /proc, against a real PostgreSQL backend."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import asyncpg

from bench import states

# /proc/PID/stat lines: the name in parentheses may hold spaces and parentheses itself
_RUNNING = "4242 (postgres: a (b)) R 17 4242 4242 0 -1"
_SLEEPING = "4242 (postgres) S 17 4242 4242 0 -1"


def test_stat_lines_give_the_state_and_the_parent() -> None:
    assert states.run_state(_RUNNING) == "R"
    assert states.run_state(_SLEEPING) == "S"
    assert states.parent_pid(_RUNNING) == 17


def test_a_backend_is_running_waiting_for_its_client_waiting_or_idle() -> None:
    title = b"postgres: root bsky 127.0.0.1(5000) "
    assert states.backend_state(_RUNNING, title + b"idle in transaction\0") == "running"
    assert states.backend_state(_SLEEPING, title + b"idle in transaction\0") == "client"
    assert states.backend_state(_SLEEPING, title + b"idle\0") == "idle"
    assert states.backend_state(_SLEEPING, title + b"INSERT\0") == "waiting"
    both = [(_SLEEPING, title + b"idle in transaction"), (_RUNNING, title + b"BIND")]
    assert states.joint(_RUNNING, both) == (True, 1, 1, 0)


def test_shares_add_up_and_count_busy_cores() -> None:
    samples: Counter[states.Joint] = Counter(
        {
            (True, 0, 1, 0): 30,  # PostgreSQL waits for the replica: 1 core of 2
            (True, 1, 1, 0): 20,  # both: 2 cores
            (False, 3, 0, 0): 10,  # three backends running: capped at 2 cores
            (True, 0, 0, 0): 15,  # the replica alone: 1 core
            (False, 0, 0, 1): 25,  # nothing: 0 cores
        }
    )
    s = states.shares(samples, cores=2)
    assert (s.postgres_waits_for_replica, s.both_running, s.postgres_only) == (0.3, 0.2, 0.1)
    assert (s.replica_alone, s.nothing_running) == (0.15, 0.25)
    assert s.busy == (30 + 40 + 20 + 15) / 200
    assert "30.0%  PostgreSQL waits for the replica's Python" in states.report(samples, 2)


async def test_the_sampler_sees_a_backend_waiting_in_a_transaction(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        pid, database = await conn.fetchrow("SELECT pg_backend_pid(), current_database()")
        stat = await asyncio.to_thread(Path(f"/proc/{pid}/stat").read_text)
        postmaster = states.parent_pid(stat)
        assert states.database_backends(postmaster, database) == [pid]
        await conn.execute("BEGIN")  # idle in transaction from here on
        sampler = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.states", str(os.getpid()), str(postmaster), database,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(1.0)  # this process sleeps too
        sampler.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(sampler.communicate(), 10)
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()
    samples = states.load(output.decode())
    assert sum(samples.values()) > 100
    # the backend waited for its client (this process) in every sample
    assert {key[1:] for key in samples} == {(0, 1, 0)}
