"""Reporting: what a run measured, printed with rich and appended to RESULTS.md as markdown."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.options import RESULTS_PATH, Options
from bench.procs import ReplicaStats
from bench.tables import GROWN_MARK, WRITTEN_TABLES, CopyResult, Inspection

RESULTS_HEADER = (
    "# Benchmark results\n\n"
    "Appended by `make bench` (`python -m bench.run`), one section per run; see the docstring "
    "of `bench/run.py` for what each figure means.\n"
)


@dataclass(slots=True)
class PhaseResult:
    key: str
    title: str
    events: int
    seconds: float
    ingest_seconds: float
    replicas: list[ReplicaStats]
    dead_lettered: int
    warnings: int
    pg_cpu_s: float
    redis_cpu_s: float
    found: Inspection
    copy: CopyResult
    deadlocks: int
    lock_waits: float  # share of backend samples waiting for a lock
    counter_lock_waits: float  # ... in the counter statement

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def copy_rate(self) -> float:
        """Events/s if the phase's rows had been written at the raw COPY speed."""
        return self.events / self.copy.seconds

    @property
    def ratio(self) -> float:
        return self.rate / self.copy_rate

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the replicas, PostgreSQL (all its processes) and Redis."""
        return sum(r.cpu_s for r in self.replicas) + self.pg_cpu_s + self.redis_cpu_s

    def cpu_bound(self, cores: int) -> float:
        """Events/s if `cores` did nothing but this phase's work at its CPU cost per event: about
        the most the phase could reach on this machine without doing less work per event (a
        bound on the generous side: the cost per event measured can rise as the cores get
        busier)."""
        return cores * self.events / self.cpu_s if self.cpu_s else 0.0


@dataclass(slots=True)
class GrownBase:
    rows: dict[str, int]
    copies: int
    seconds: float


@dataclass(slots=True)
class Report:
    opts: Options
    machine: dict[str, str]
    started: datetime
    overhead_s: float = 0.0
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    grown: GrownBase | None = None
    total_s: float = 0.0


PHASE_HEADER = (
    "Phase",
    "Events",
    "Seconds",
    "Events/s",
    "COPY s",
    "COPY-eq events/s",
    "Indexer ÷ COPY",
    "Peak RSS MB",
    "CPU s indexer/PG/Redis",
    "Dead-lettered",
    "Log warnings",
    "Counters exact",
    "Deadlocks",
    "Lock-wait samples (counters)",
)


def _phase_rows(report: Report) -> list[list[str]]:
    rows = []
    for p in report.phases.values():
        title = p.title
        if p.key.startswith("g") and report.grown is not None:
            title += f" ({sum(report.grown.rows.values()):,} rows before)"
        indexer_cpu = sum(r.cpu_s for r in p.replicas)
        errors = ", ".join(f"{k} ({v})" for k, v in p.found.counter_errors.items())
        rows.append(
            [
                title,
                f"{p.events:,}",
                f"{p.seconds:.1f}",
                f"{p.rate:,.0f}",
                f"{p.copy.seconds:.2f}",
                f"{p.copy_rate:,.0f}",
                f"{p.ratio:.3f}",
                " / ".join(f"{r.peak_rss_mb:.0f}" for r in p.replicas),
                f"{indexer_cpu:.0f} / {p.pg_cpu_s:.0f} / {p.redis_cpu_s:.0f}",
                f"{p.dead_lettered:,}",
                f"{p.warnings:,}",
                "yes" if not errors else f"NO: {errors}",
                f"{p.deadlocks:,}",
                f"{p.lock_waits:.1%} ({p.counter_lock_waits:.1%})",
            ]
        )
    return rows


def _row_counts(report: Report) -> tuple[list[str], list[list[str]]]:
    phases = list(report.phases.values())
    header = ["Table", *(p.key for p in phases if not p.key.startswith("g"))]
    if report.grown is not None:
        header.append("grown base")
    header += [p.key for p in phases if p.key.startswith("g")]
    rows = []
    for table in (*WRITTEN_TABLES, "total"):
        cells = [table]
        for p in phases:
            if p.key == "g1" and report.grown is not None:
                cells.append(_count_cell(report.grown.rows, table))
            cells.append(_count_cell(p.found.rows, table))
        rows.append(cells)
    return header, rows


def _count_cell(rows: dict[str, int], table: str) -> str:
    return f"{sum(rows.values()) if table == 'total' else rows[table]:,}"


def _ratio(a: PhaseResult | None, b: PhaseResult | None, copy: bool = False) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{(a.copy_rate / b.copy_rate) if copy else (a.rate / b.rate):.2f}"


def _identical(a: PhaseResult | None, b: PhaseResult | None) -> str:
    if a is None or b is None:
        return "n/a"
    differ = [t for t in WRITTEN_TABLES if a.found.digests[t] != b.found.digests[t]]
    return "yes" if not differ else "no, differ in " + ", ".join(differ)


def _actors(p: PhaseResult | None) -> str:
    return "n/a" if p is None else f"{p.found.rows['actor']:,}"


def _cpu_note(report: Report) -> str:
    cores = int(report.machine.get("nproc") or 1)
    per_phase = []
    for p in report.phases.values():
        bound = p.cpu_bound(cores)
        per_phase.append(
            f"{p.key} {p.cpu_s / p.events * 1e6:.0f} µs, {p.cpu_s / (cores * p.seconds):.0%} "
            f"busy, bound {bound:,.0f} ({bound / p.copy_rate:.2f})"
        )
    return (
        "CPU per event (indexer, PostgreSQL and Redis together), the share of the "
        f"{cores} cores that was busy, and the events/s the {cores} cores would allow at that "
        "cost per event if always busy (÷ COPY-eq events/s): " + "; ".join(per_phase)
    )


def _copy_note(report: Report) -> str:
    """How the COPY baseline was taken, and how far its loads moved in each phase."""
    loads = report.opts.copy_loads
    if loads == 1:
        return "COPY s: one load per phase"
    spreads = ", ".join(f"{p.key} {p.copy.spread:.2f}" for p in report.phases.values())
    return (
        f"COPY s: the median of {loads} loads per phase, each into a fresh copy of the "
        f"database the phase started from; slowest ÷ fastest load: {spreads}"
    )


def _notes(report: Report) -> list[str]:
    ph = report.phases.get
    p1 = ph("p1")
    notes = [
        _cpu_note(report),
        f"2 replicas ÷ 1 replica: empty {_ratio(ph('p2'), p1)}, grown {_ratio(ph('g2'), ph('g1'))}",
        f"grown ÷ empty: 1 replica {_ratio(ph('g1'), p1)}, 2 replicas "
        f"{_ratio(ph('g2'), ph('p2'))}, COPY {_ratio(ph('g1'), p1, copy=True)}",
        f"rows identical after 1 and 2 replicas: empty {_identical(p1, ph('p2'))}; "
        f"grown {_identical(ph('g1'), ph('g2'))}"
        + (f"; celebrity {_identical(ph('c1'), ph('c2'))}" if ph("c1") else "")
        + (f"; control {_identical(ph('s1'), ph('s2'))}" if ph("s1") else ""),
        _copy_note(report),
        f"fixed cost of one `indexer run --drain` on an empty stream (start-up, connect, "
        f"drain check, exit): {report.overhead_s:.2f} s, included in every wall time",
    ]
    if ph("c1") is not None:
        notes.append(
            f"celebrity {report.opts.celebrity:.0%} ÷ its control (the same fan accounts, their "
            f"subjects scattered): 1 replica {_ratio(ph('c1'), ph('s1'))}, 2 replicas "
            f"{_ratio(ph('c2'), ph('s2'))}; COPY {_ratio(ph('c1'), ph('s1'), copy=True)}"
        )
        notes.append(
            f"celebrity ÷ the workload without fans: 1 replica {_ratio(ph('c1'), p1)}, 2 "
            f"replicas {_ratio(ph('c2'), ph('p2'))} (the fans are new accounts: "
            f"{_actors(ph('c1'))} actors instead of {_actors(p1)})"
        )
    if p1 is not None:
        notes.append(
            f"`indexer ingest file`: {p1.events / p1.ingest_seconds:,.0f} events/s "
            f"({p1.ingest_seconds:.1f} s, not part of any figure above)"
        )
    if report.grown is not None:
        g = report.grown
        notes.append(
            f"grown base: {sum(g.rows.values()):,} rows = {g.copies} copies of p1's rows "
            f"(DIDs suffixed {GROWN_MARK}N), COPY + VACUUM ANALYZE in {g.seconds:.0f} s"
        )
    notes.append(f"whole run: {report.total_s / 60:.1f} min")
    return notes


def render(report: Report, console: Console) -> None:
    """The phase table, the rows written and the notes, on the console."""
    o = report.opts
    table = Table(
        title=f"{o.events:,} events, batch {o.batch_size}, concurrency {o.concurrency}, "
        f"pool {o.pool_size}",
    )
    for n, name in enumerate(PHASE_HEADER):
        table.add_column(name, justify="left" if n == 0 else "right")
    for row in _phase_rows(report):
        table.add_row(*row)
    console.print(table)
    header, rows = _row_counts(report)
    counts = Table(title="Rows written (grown phases: the measured workload's rows only)")
    for n, name in enumerate(header):
        counts.add_column(name, justify="left" if n == 0 else "right")
    for row in rows:
        counts.add_row(*row)
    console.print(counts)
    for note in _notes(report):
        console.print(f"• {note}")


def _md_table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(":---" if n == 0 else "---:" for n in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(report: Report) -> str:
    """The run as a RESULTS.md section: machine, settings, the same tables and notes."""
    o, m = report.opts, report.machine
    lines = [
        f"## {report.started:%Y-%m-%d %H:%M} UTC: {o.events:,} events",
        "",
        f"- machine: {m['nproc']} x {m['cpu']}, {m['ram']} RAM, kernel {m['kernel']}",
        f"- PostgreSQL {m['postgres']} ({m['postgres settings']}; throwaway test settings), "
        f"Redis {m['redis']}, Python {m['python']} with uvloop",
        f"- events {o.events:,} (seed {o.seed}; grown phases seed {o.seed + 1}; "
        f"{f'celebrity share {o.celebrity:.0%}' if o.celebrity else 'no celebrity phases'}), "
        "batch size "
        f"{o.batch_size}, concurrency {o.concurrency}, pool size {o.pool_size}, "
        f"grow rows {o.grow_rows:,}",
        f"- code: {m.get('code', '?')}",
        "",
        *_md_table(PHASE_HEADER, _phase_rows(report)),
        "",
    ]
    lines += [f"- {note}" for note in _notes(report)]
    header, rows = _row_counts(report)
    lines += ["", "Rows written (grown phases: the measured workload's rows only):", ""]
    lines += _md_table(header, rows)
    return "\n".join(lines) + "\n"


def append_results(path: Path, section: str) -> None:
    """Append a section to the results file, creating it with its header first."""
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    with path.open("a") as out:
        out.write("\n" + section)


def publish(section: str, *, write: bool) -> None:
    """Print a tool's markdown section and, if `write`, append it to bench/RESULTS.md."""
    print(section)
    if write:
        append_results(RESULTS_PATH, section)
