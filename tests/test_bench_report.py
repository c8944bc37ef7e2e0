"""The benchmark report's CPU note: cost per event, busy share and the cores' bound."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from bench.options import Options, parse_args
from bench.procs import ReplicaStats
from bench.report import PhaseResult, Report, markdown
from bench.tables import WRITTEN_TABLES, CopyResult, Inspection, median_load


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


def test_the_copy_baseline_is_the_median_load_and_its_spread_is_noted() -> None:
    loads = [CopyResult(500_000, s, 50.0) for s in (5.0, 4.0, 4.4)]
    copy = median_load(loads)
    assert (copy.rows, copy.seconds, copy.loads) == (500_000, 4.4, (5.0, 4.0, 4.4))
    assert copy.spread == 1.25
    with pytest.raises(ValueError, match="no COPY loads"):
        median_load([])
    opts = parse_args(["--no-write"])
    assert opts.copy_loads == 3
    machine = dict.fromkeys(("cpu", "ram", "kernel", "postgres", "postgres settings"), "x")
    report = Report(opts, machine | {"nproc": "2", "redis": "7", "python": "3.11"}, datetime.now())
    report.phases["p1"] = _phase("p1", 10.0, [4.0], 15.0)
    report.phases["p1"].copy = copy
    text = markdown(report)
    assert "| 4.40 | 22,727 | 0.440 |" in text  # 100,000 events / 4.4 s, beside 10,000 events/s
    assert "COPY s: the median of 3 loads per phase" in text
    assert "slowest ÷ fastest load: p1 1.25" in text
    single = Report(parse_args(["--copy-loads", "1"]), report.machine, datetime.now())
    single.phases["p1"] = _phase("p1", 10.0, [4.0], 15.0)
    assert "COPY s: one load per phase" in markdown(single)
    with pytest.raises(SystemExit):
        parse_args(["--copy-loads", "0"])
