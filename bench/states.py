"""Who runs while a replica drains: its process and its database's backends, read from /proc.

About every millisecond and a half (1 ms apart, plus the reading), in a process of its own
(the replica's interpreter is not disturbed): whether the replica's main thread is running (or
runnable), and what each backend of the database does.
A backend is `running`; waiting for its client inside a transaction (`client`: its title says
`idle in transaction`, the replica has not sent the next statement); waiting on something else
inside a statement (`waiting`: a lock, I/O, the WAL); or `idle` between transactions. The joint
states say where cores go unused: PostgreSQL waiting for the replica's Python, the replica
waiting for PostgreSQL, or both waiting on something else. Linux only.

    python -m bench.states REPLICA_PID POSTMASTER_PID DATABASE    (until SIGTERM; prints JSON)
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# (replica running, backends running, backends waiting for the client, backends waiting else)
Joint = tuple[bool, int, int, int]

_PROC = Path("/proc")
_REFRESH_S = 0.1  # how often the backend list is read again
_INTERVAL_S = 0.001


def run_state(stat: str) -> str:
    """The state letter of a /proc/PID/stat line (R running or runnable, S, D, ...)."""
    return stat[stat.rindex(")") + 2]


def parent_pid(stat: str) -> int:
    return int(stat[stat.rindex(")") + 4 :].split(" ", 1)[0])


def backend_state(stat: str, title: bytes) -> str:
    """`running`, `client`, `waiting` or `idle`, from a backend's stat line and process title."""
    if run_state(stat) == "R":
        return "running"
    if b" idle in transaction" in title:
        return "client"
    if title.rstrip(b"\0 ").endswith(b" idle"):
        return "idle"
    return "waiting"


def joint(replica_stat: str, backends: Sequence[tuple[str, bytes]]) -> Joint:
    states = Counter(backend_state(stat, title) for stat, title in backends)
    return (run_state(replica_stat) == "R", states["running"], states["client"], states["waiting"])


@dataclass(frozen=True, slots=True)
class Shares:
    """The drain's samples, in shares that add up to 1 (except `busy`)."""

    postgres_waits_for_replica: float  # the replica running, no backend: one waits for it
    both_running: float
    postgres_only: float  # backends running, the replica not
    replica_alone: float  # the replica running, no transaction open
    nothing_running: float
    busy: float  # the mean share of `cores` these processes kept running


def shares(samples: Counter[Joint], cores: int) -> Shares:
    total = sum(samples.values()) or 1
    kinds: Counter[str] = Counter()
    busy = 0
    for (py, running, client, _waiting), n in samples.items():
        if running:
            kinds["both_running" if py else "postgres_only"] += n
        elif py:
            kinds["postgres_waits_for_replica" if client else "replica_alone"] += n
        else:
            kinds["nothing_running"] += n
        busy += min(cores, py + running) * n
    return Shares(
        postgres_waits_for_replica=kinds["postgres_waits_for_replica"] / total,
        both_running=kinds["both_running"] / total,
        postgres_only=kinds["postgres_only"] / total,
        replica_alone=kinds["replica_alone"] / total,
        nothing_running=kinds["nothing_running"] / total,
        busy=busy / (cores * total),
    )


def report(samples: Counter[Joint], cores: int) -> str:
    s = shares(samples, cores)
    total = sum(samples.values())
    lines = [
        f"who runs ({total:,} samples over the drain; {s.busy:.0%} of {cores} cores kept "
        "busy by the replica and its backends):",
        f"{s.postgres_waits_for_replica:6.1%}  PostgreSQL waits for the replica's Python "
        "(a backend idle in transaction, none running)",
        f"{s.both_running:6.1%}  the replica and PostgreSQL both running",
        f"{s.postgres_only:6.1%}  PostgreSQL running, the replica not",
        f"{s.replica_alone:6.1%}  the replica running, no statement in progress or awaited",
        f"{s.nothing_running:6.1%}  nothing running (Redis, the network, locks, I/O)",
    ]
    return "\n".join(lines)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:  # the process is gone
        return None


def _stat_and_title(pid: int) -> tuple[str, bytes] | None:
    """A process's /proc stat line and title (its command line), or None once it is gone."""
    stat, title = _read(_PROC / str(pid) / "stat"), _read(_PROC / str(pid) / "cmdline")
    return None if stat is None or title is None else (stat.decode(), title)


def database_backends(postmaster: int, database: str) -> list[int]:
    """The postmaster's children whose title names the database (its client backends)."""
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        read = _stat_and_title(int(entry.name))
        if read is None or parent_pid(read[0]) != postmaster:
            continue
        words = read[1].split()
        if len(words) > 2 and words[0] == b"postgres:" and words[2] == database.encode():
            found.append(int(entry.name))
    return found


def sample(replica: int, postmaster: int, database: str, stop: list[bool]) -> Counter[Joint]:
    samples: Counter[Joint] = Counter()
    pids: list[int] = []
    refreshed = 0.0
    while not stop:
        now = time.monotonic()
        if now - refreshed > _REFRESH_S:
            pids, refreshed = database_backends(postmaster, database), now
        replica_stat = _read(_PROC / str(replica) / "stat")
        if replica_stat is None:
            break
        backends = [read for pid in pids if (read := _stat_and_title(pid)) is not None]
        if backends:  # the replica's pool is open: the drain
            samples[joint(replica_stat.decode(), backends)] += 1
        time.sleep(_INTERVAL_S)
    return samples


def main(argv: Sequence[str] | None = None) -> None:
    replica, postmaster, database = (argv if argv is not None else sys.argv[1:])[:3]
    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    samples = sample(int(replica), int(postmaster), database, stop)
    json.dump([[list(k), n] for k, n in samples.items()], sys.stdout)


def load(output: str) -> Counter[Joint]:
    """The sampler's JSON output back as counts."""
    return Counter({(bool(k[0]), k[1], k[2], k[3]): n for k, n in json.loads(output)})


if __name__ == "__main__":
    main()
