"""Processes: `indexer` subprocesses, their peak RSS and CPU, the servers' pids, the machine."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from indexer.config import ENVIRONMENT_VARIABLES

PHASE_TIMEOUT_S = 3600.0
POLL_S = 0.02
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class ReplicaStats:
    name: str
    seconds: float
    peak_rss_mb: float
    cpu_s: float


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_bytes()[-8192:].decode(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def log_warnings(log: Path) -> int:
    """WARNING and ERROR lines in a replica's log (retries, dead-lettering, failures)."""
    with log.open("rb") as lines:
        return sum(1 for line in lines if b" WARNING " in line or b" ERROR " in line)


def ingest_file(indexer: str, env: dict[str, str], path: Path, log_path: Path) -> float:
    """`indexer ingest file PATH` as a subprocess; its wall seconds."""
    started = time.perf_counter()
    with log_path.open("wb") as log:
        result = subprocess.run(
            [indexer, "ingest", "file", str(path)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=PHASE_TIMEOUT_S,
        )
    if result.returncode != 0:
        raise RuntimeError(f"ingest exited with {result.returncode}:\n{log_tail(log_path)}")
    return time.perf_counter() - started


def run_replicas(
    indexer: str, env: dict[str, str], count: int, log_prefix: Path
) -> tuple[float, list[ReplicaStats]]:
    """Start `count` `indexer run --drain` processes at once; wall seconds to the last exit."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(_kill_remaining, procs)
        started = time.perf_counter()
        for n in range(1, count + 1):
            name = f"r{n}"
            log = stack.enter_context(Path(f"{log_prefix}-{name}.log").open("wb"))
            procs[name] = subprocess.Popen(
                [indexer, "run", "--drain", "--consumer", name],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stats = _reap_all(procs, started, log_prefix)
    return max(s.seconds for s in stats), stats


def _reap_all(
    procs: dict[str, subprocess.Popen[bytes]], started: float, log_prefix: Path
) -> list[ReplicaStats]:
    """Wait for every process, sampling its peak RSS; wait4 gives its own CPU time."""
    done: dict[str, ReplicaStats] = {}
    peak_kb = dict.fromkeys(procs, 0)
    while len(done) < len(procs):
        for name, proc in procs.items():
            if name in done:
                continue
            peak_kb[name] = max(peak_kb[name], vm_hwm_kb(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                log = log_tail(Path(f"{log_prefix}-{name}.log"))
                raise RuntimeError(f"replica {name} exited with {proc.returncode}:\n{log}")
            seconds = time.perf_counter() - started
            cpu = usage.ru_utime + usage.ru_stime
            done[name] = ReplicaStats(name, seconds, peak_kb[name] / 1024, cpu)
        if time.perf_counter() - started > PHASE_TIMEOUT_S:
            raise TimeoutError(f"replicas still running after {PHASE_TIMEOUT_S:.0f} s")
        if len(done) < len(procs):
            time.sleep(POLL_S)
    return [done[name] for name in procs]


def vm_hwm_kb(pid: int) -> int:
    """Peak RSS (VmHWM) of a live process, 0 once it has exited.

    Not ru_maxrss from wait4: at exec, Linux carries the forking parent's peak RSS into the
    child's maxrss, so a child of this (large) process would report our memory, not its own.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _kill_remaining(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (index 1 is the parent pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cpu_ticks(fields: list[str]) -> int:
    # utime, stime, cutime, cstime: the process and the children it has reaped
    return sum(int(fields[i]) for i in (11, 12, 13, 14))


def tree_cpu_s(root: int | None) -> float:
    """CPU seconds of a server process, its live children and the children it has reaped."""
    if root is None:
        return 0.0
    fields = _stat(root)
    if fields is None:
        return 0.0
    ticks = _cpu_ticks(fields)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            child = _stat(int(entry))
            if child is not None and int(child[1]) == root:
                ticks += _cpu_ticks(child)
    return ticks / _CLOCK_TICKS


def find_server_pid(program: str, port: int) -> int | None:
    """The pid of the `program` server started with `port` on its command line."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        words = argv.replace("\0", " ").split()
        if words and Path(words[0]).name == program and any(str(port) in w for w in words):
            return int(entry)
    return None


def indexer_env(settings: dict[str, str]) -> dict[str, str]:
    """The environment of an `indexer` subprocess: ours without any indexer setting (a
    developer's REDIS_URL must not leak into a benchmark), plus `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT_VARIABLES}
    return env | settings


def indexer_executable() -> str:
    """The `indexer` command beside this Python, else the one on PATH."""
    beside = Path(sys.executable).with_name("indexer")
    if beside.is_file():
        return str(beside)
    found = shutil.which("indexer")
    if found is None:
        raise RuntimeError("the `indexer` command is not installed (pip install -e .)")
    return found


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def mem_total_gib() -> float:
    """The machine's RAM in GiB, NaN if /proc/meminfo cannot say."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return math.nan


def code_version() -> str:
    """The commit measured, with `+changes` when the work tree differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+changes" if dirty else "")
