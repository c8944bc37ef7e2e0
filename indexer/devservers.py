"""Throwaway local Redis and PostgreSQL servers for tests, `make demo` and the benchmark.

Each server runs from the binaries installed on this machine, in its own directory, on a free
loopback port, with durability turned off for speed. Nothing here is meant for production.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

log = logging.getLogger(__name__)

T = TypeVar("T")

HOST = "127.0.0.1"
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PG_SUPERUSER = "postgres"
PG_SYSTEM_USER = "postgres"
REDIS_READY_TIMEOUT_S = 10.0
PG_READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.05
LOG_TAIL_LINES = 20
UNIX_SOCKET_PATH_MAX = 107

# --no-sync: a throwaway cluster need not survive a power cut. The locale is initdb's --locale.
INITDB_OPTIONS = ("--auth=trust", "--encoding=UTF8", "--no-sync")
PG_TEST_LOCALE = "C"

# Fast where it is safe to be: a crash of the machine may corrupt the cluster (fsync=off), but a
# kill -9 of the server loses no committed transaction (synchronous_commit stays on), so tests
# that kill PostgreSQL can hold the indexer to "ACK only after COMMIT".
PG_TEST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "128MB",
}

_APT_PACKAGE = {
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "initdb": "postgresql",
    "pg_ctl": "postgresql",
    "postgres": "postgresql",
    "pg_isready": "postgresql-client",
    "psql": "postgresql-client",
}


class MissingPrerequisite(RuntimeError):
    """Something this machine must provide to run a throwaway server is absent."""


class MissingBinary(MissingPrerequisite):
    """A server binary is not installed; the message says what to install."""


def find_binary(name: str) -> str:
    """Path of an executable: PATH first, then /usr/lib/postgresql/*/bin, newest version first."""
    found = shutil.which(name)
    if found:
        return found
    for bindir in sorted(glob.glob(PG_BIN_GLOB), key=_version_key, reverse=True):
        candidate = os.path.join(bindir, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    package = _APT_PACKAGE.get(name, name)
    raise MissingBinary(f"{name} not found: install it with `apt-get install -y {package}`")


def _version_key(bindir: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/16/bin -> (16,); numeric, so 9.6 sorts below 10.
    return tuple(int(part) for part in re.findall(r"\d+", Path(bindir).parent.name))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class _Process:
    """One child server process, appending its stdout and stderr to a log file."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self.alive and self._popen is not None else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def spawn(self, argv: list[str], account: pwd.struct_passwd | None, cwd: Path) -> None:
        # A session of its own: Ctrl-C on the test run must not reach the server, the
        # teardown stops it in order.
        with self.log_path.open("ab") as log_file:
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                **_account_kwargs(account),
            )

    def stop(self, sig: signal.Signals, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Send `sig` and wait for the exit; SIGKILL after `timeout_s`."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:
            popen.send_signal(sig)
            try:
                popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) ignored %s for %.0f s; killing it",
                    self.name,
                    popen.pid,
                    sig.name,
                    timeout_s,
                )
                popen.kill()
                popen.wait()
        self._popen = None

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll `ready` until it is true; raise with the log tail on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive:
                code = self._popen.returncode if self._popen is not None else None
                raise RuntimeError(
                    f"{self.name} exited (code {code}) while starting; "
                    f"last lines of {self.log_path}:\n{self.tail()}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not {what} within {timeout_s:.0f} s; "
                    f"last lines of {self.log_path}:\n{self.tail()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def tail(self) -> str:
        try:
            data = self.log_path.read_bytes()[-8192:]
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(data.decode(errors="replace").splitlines()[-LOG_TAIL_LINES:])


def _account_kwargs(account: pwd.struct_passwd | None) -> dict[str, Any]:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


class RedisServer:
    """A redis-server on a port that stays the same across restarts; without persistence
    unless `options` say otherwise (they are passed as `--name value` and may be changed
    between restarts, e.g. `{"appendonly": "yes", "appendfsync": "always"}`)."""

    def __init__(self, workdir: Path, options: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.options = dict(options or {})
        self._port = free_port()
        self._process = _Process("redis-server", self.workdir / "redis.log")

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self._port}/0"

    def start(self, *, loaded: bool = True) -> None:
        """Start the server and wait until it answers PING (with `loaded=False`, until it
        answers at all, even if only `LOADING` while it reads its data)."""
        if self._process.alive:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        options = {
            "port": str(self._port),
            "bind": HOST,
            "save": "",
            "appendonly": "no",
            "dir": str(self.workdir),
            "daemonize": "no",
        } | self.options
        argv = [find_binary("redis-server")]
        for key, value in options.items():
            argv += [f"--{key}", value]
        self._process.spawn(argv, account=None, cwd=self.workdir)
        answers = (b"+PONG",) if loaded else (b"+PONG", b"-LOADING")
        try:
            self._process.wait_until(
                lambda: self._answers_ping(answers),
                REDIS_READY_TIMEOUT_S,
                f"answer PING on {HOST}:{self._port}",
            )
        except BaseException:
            self.kill()
            raise
        log.info("redis-server ready at %s (pid %s)", self.url, self._process.pid)

    def stop(self) -> None:
        """Shut down gracefully; with persistence off, the data is gone."""
        self._process.stop(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        self._process.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _answers_ping(self, answers: tuple[bytes, ...]) -> bool:
        try:
            with socket.create_connection((HOST, self._port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(answers)
        except OSError:
            return False


class PostgresServer:
    """A throwaway PostgreSQL cluster with test-speed settings, reachable over TCP with trust auth.

    initdb and postgres refuse to run as root; as root they run as the `postgres` system user,
    in a data directory that user owns.
    """

    def __init__(
        self, workdir: Path, settings: dict[str, str] | None = None, locale: str = PG_TEST_LOCALE
    ) -> None:
        self.workdir = Path(workdir)
        self.settings = PG_TEST_SETTINGS | (settings or {})  # server `-c` options
        self.locale = locale  # the cluster's, so its databases' collation: initdb --locale
        self._port = free_port()
        self._process = _Process("postgres", self.workdir / "postgres.log")
        self._account: pwd.struct_passwd | None = None
        self._root: Path | None = None
        self._outside_root: Path | None = None  # made by us outside workdir; removed by cleanup()

    @property
    def port(self) -> int:
        return self._port

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{PG_SUPERUSER}@{HOST}:{self._port}/{dbname}"

    def start(self) -> None:
        """Create the cluster on first use, start it and wait until it accepts connections."""
        if self._process.alive:
            return
        root = self._prepare()
        postgres = _sibling_binary(find_binary("initdb"), "postgres")
        argv = [postgres, "-D", str(root / "data"), "-p", str(self._port), "-h", HOST]
        argv += ["-k", str(root / "run")]  # the Unix socket stays inside our directory
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        self._process.spawn(argv, account=self._account, cwd=root)
        try:
            self._process.wait_until(
                self._accepts_connections,
                PG_READY_TIMEOUT_S,
                f"accept connections on {HOST}:{self._port}",
            )
        except BaseException:
            self.kill()
            raise
        log.info("postgres ready at %s (pid %s)", self.dsn(), self._process.pid)

    def stop(self) -> None:
        """Fast shutdown: roll back open transactions, disconnect clients, checkpoint."""
        self._process.stop(signal.SIGINT)

    def stop_immediate(self) -> None:
        """`pg_ctl stop -m immediate`: no checkpoint, clients cut off; recovery at next start."""
        self._process.stop(signal.SIGQUIT)

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children at once, as a crash of the host would."""
        pid = self._process.pid
        children = _child_pids(pid) if pid is not None else []
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        self._process.stop(signal.SIGKILL)
        # A new postmaster refuses to start while an old child still holds the shared memory.
        _wait_gone(children, STOP_TIMEOUT_S)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop, and delete what this server put outside its workdir."""
        self.stop()
        if self._outside_root is not None:
            shutil.rmtree(self._outside_root, ignore_errors=True)
            self._outside_root = None
            self._root = None

    def create_database(
        self, name: str, template: str | None = None, collate: str | None = None
    ) -> None:
        """CREATE DATABASE, optionally as a copy of `template` (which must have no sessions),
        optionally with its own LC_COLLATE (from template0 only, as PostgreSQL requires)."""
        sql = f"CREATE DATABASE {_quote_ident(name)}"
        if template is not None:
            sql += f" TEMPLATE {_quote_ident(template)}"
        if collate is not None:
            sql += " LC_COLLATE '{}'".format(collate.replace("'", "''"))
        _run_sync(lambda: _execute(self.dsn(), sql))

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS, disconnecting its sessions."""
        sql = f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)"
        _run_sync(lambda: _execute(self.dsn(), sql))

    def _prepare(self) -> Path:
        """Directories and initdb, once; the same data directory serves every restart."""
        if self._root is not None:
            return self._root
        self._account = _postgres_account()
        self.workdir.mkdir(parents=True, exist_ok=True)
        root = self.workdir / "pg"
        socket_path = root / "run" / f".s.PGSQL.{self._port}"
        unreachable = self._account is not None and not _reachable(self.workdir, self._account)
        if unreachable or len(str(socket_path)) > UNIX_SOCKET_PATH_MAX:
            root = self._outside_root = Path(tempfile.mkdtemp(prefix="firehose-pg-"))
            root.chmod(0o755)
            log.info("postgres data in %s: %s is unreachable or too deep", root, self.workdir)
        (root / "run").mkdir(parents=True, exist_ok=True)
        if self._account is not None:
            for path in (root, root / "run"):
                os.chown(path, self._account.pw_uid, self._account.pw_gid)
        if not (root / "data" / "PG_VERSION").exists():
            self._initdb(root / "data")
        self._root = root
        return root

    def _initdb(self, pgdata: Path) -> None:
        argv = [find_binary("initdb"), "-D", str(pgdata), "-U", PG_SUPERUSER, *INITDB_OPTIONS]
        argv.append(f"--locale={self.locale}")
        with self._process.log_path.open("ab") as log_file:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=pgdata.parent,
                check=False,
                **_account_kwargs(self._account),
            )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed (code {result.returncode}); last lines of "
                f"{self._process.log_path}:\n{self._process.tail()}"
            )

    def _accepts_connections(self) -> bool:
        return _run_sync(lambda: _can_connect(self.dsn()))


def _postgres_account() -> pwd.struct_passwd | None:
    """The account to run initdb and postgres as: None for ourselves, unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise MissingPrerequisite(
            "running as root, and initdb/postgres refuse to run as root, but there is no "
            f"`{PG_SYSTEM_USER}` system user to run them as: install it with "
            "`apt-get install -y postgresql` or `useradd --system --user-group postgres`"
        ) from None


def _reachable(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether `account` may traverse every directory from / down to `path`."""
    gids = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _sibling_binary(initdb: str, name: str) -> str:
    """`name` from initdb's own directory, so initdb and the server are the same version."""
    candidate = Path(os.path.realpath(initdb)).parent / name
    return str(candidate) if candidate.is_file() else find_binary(name)


def _child_pids(pid: int) -> list[int]:
    children = []
    for stat_file in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat_file).read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            children.append(int(Path(stat_file).parent.name))
    return children


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    """Wait until every pid has exited (a zombie counts: it holds no memory)."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                break
            if state in ("Z", "X"):
                break
            time.sleep(POLL_INTERVAL_S)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _run_sync(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private loop in a private thread.

    The thread makes this callable from sync fixtures and from async tests alike, and leaves
    the caller's event loop (pytest-asyncio's) untouched.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _can_connect(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False  # not listening yet, or "the database system is starting up"
    await conn.close()
    return True


@contextlib.contextmanager
def throwaway_redis(
    base: Path | None = None, options: dict[str, str] | None = None
) -> Iterator[RedisServer]:
    """A started RedisServer in a fresh temporary directory, stopped and deleted on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="firehose-redis-", dir=base))
    server = RedisServer(workdir, options)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def throwaway_postgres(
    base: Path | None = None, settings: dict[str, str] | None = None, locale: str = PG_TEST_LOCALE
) -> Iterator[PostgresServer]:
    """A started PostgresServer in a fresh temporary directory, stopped and deleted on exit;
    `settings` override PG_TEST_SETTINGS, `locale` is the cluster's (initdb --locale)."""
    workdir = Path(tempfile.mkdtemp(prefix="firehose-pg-", dir=base))
    workdir.chmod(0o755)  # mkdtemp makes it 0700; as root, the postgres user must get through
    server = PostgresServer(workdir, settings, locale)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
