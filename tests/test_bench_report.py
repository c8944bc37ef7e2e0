"""The benchmark report's CPU note: cost per event, busy share and the cores' bound."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from bench.options import Options
from bench.procs import ReplicaStats
from bench.report import PhaseResult, Report, markdown
from bench.tables import WRITTEN_TABLES, CopyResult, Inspection


def _phase(key: str, seconds: float, replica_cpu: list[float], pg: float) -> PhaseResult:
    found = Inspection(dict.fromkeys(WRITTEN_TABLES, 0), {}, dict.fromkeys(WRITTEN_TABLES, ""))
    return PhaseResult(
        key, key, 100_000, seconds, 1.0,
        [ReplicaStats(f"r{n}", seconds, 70.0, c) for n, c in enumerate(replica_cpu)],
        0, 0, pg, 1.0, found, CopyResult(500_000, 4.0, 50.0), 0, 0.0, 0.0,
    )  # fmt: skip


def test_the_cpu_note_gives_cost_per_event_busy_share_and_bound() -> None:
    opts = Options(100_000, 2000, 2, 4, 1, 1, 0.0, False, Path("unused"), {}, "C")
    machine = dict.fromkeys(("cpu", "ram", "kernel", "postgres", "postgres settings"), "x")
    machine |= {"nproc": "2", "redis": "7", "python": "3.11"}
    report = Report(opts, machine, datetime(2026, 12, 7))
    # p1: 4 + 15 + 1 = 20 CPU s for 100,000 events in 12.5 s on 2 cores
    report.phases["p1"] = _phase("p1", 12.5, [4.0], 15.0)
    # p2: 3 + 3 + 13 + 1 = 20 CPU s in 10 s: every core busy
    report.phases["p2"] = _phase("p2", 10.0, [3.0, 3.0], 13.0)
    assert report.phases["p1"].cpu_bound(2) == 10_000.0
    text = markdown(report)
    # 200 µs per event; 20 of 25 core-seconds; 2 cores / 200 µs = 10,000 events/s, and
    # COPY-eq events/s is 100,000 / 4 s = 25,000
    assert "p1 200 µs, 80% busy, bound 10,000 (0.40)" in text
    assert "p2 200 µs, 100% busy, bound 10,000 (0.40)" in text
    assert "the events/s the 2 cores would allow" in text
