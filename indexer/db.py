"""The PostgreSQL pool: bounded, every acquire with a timeout, failures classified."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import msgspec
from asyncpg.exceptions import _base as asyncpg_base

from indexer.config import Settings, mask_url

log = logging.getLogger(__name__)

Connection = Any  # asyncpg ships no type information
_rows_encoder = msgspec.json.Encoder()

# SQLSTATE classes that mean "this data is bad": retrying the same rows fails the same way
# (22 data exception, 23 constraint violation, 54 limit exceeded, such as an index row too big).
_DATA_CLASSES = ("22", "23", "54")
# Contention between concurrent batches: retrying the whole transaction is the cure.
_RETRY_STATES = ("40001", "40P01", "55P03")
# The server gave up on a statement after a set time, or was asked to: 57014 (statement_timeout,
# pg_cancel_backend) and 55P03 (lock_timeout). The same batch may outlast it again.
_GAVE_UP_STATES = ("57014", "55P03")


def is_data_error(exc: BaseException) -> bool:
    """The rows are bad: PostgreSQL refused them, or asyncpg could not encode a value."""
    if isinstance(exc, asyncpg_base.DataError):
        return True
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and state[:2] in _DATA_CLASSES


def is_contention(exc: BaseException) -> bool:
    """Lock contention, or a statement cached before a migration changed its tables (asyncpg
    drops the cache, so the retry prepares it afresh)."""
    if isinstance(exc, asyncpg.InvalidCachedStatementError):
        return True
    return getattr(exc, "sqlstate", None) in _RETRY_STATES


def is_timed_out(exc: BaseException) -> bool:
    """PostgreSQL canceled a statement: a timeout the database or role sets, or a cancel
    request. Retried (it is contention or load, not bad data), but smaller batches may pass."""
    return getattr(exc, "sqlstate", None) in _GAVE_UP_STATES


def is_unavailable(exc: BaseException) -> bool:
    """PostgreSQL is down, restarting or unreachable: wait and retry, never dead-letter."""
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    if type(exc) is asyncpg.InterfaceError:  # "connection is closed"; not its subclasses
        return True
    if isinstance(exc, asyncpg.InternalClientError):  # a connection left mid-operation by a
        return True  # server that went away ("cannot switch to state ..."); a fresh one works
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        # 08 connection, 57 shutdown/admin, 53 resources; 25006: a read-only server (a standby
        # during failover) refuses writes until the new primary takes over.
        return state[:2] in ("08", "57", "53") or state == "25006"
    return False


def json_rows(types: tuple[str, ...], param: int = 1) -> str:
    """`SELECT (r->>0)::t0, ... FROM jsonb_array_elements($param::jsonb) AS r`: the rows of one
    `rows_json` parameter, one column per type."""
    values = ", ".join(f"(r->>{i})::{t}" for i, t in enumerate(types))
    return f"SELECT {values} FROM jsonb_array_elements(${param}::jsonb) AS r"


def rows_json(rows: list[tuple[Any, ...]]) -> bytes:
    """Rows as one JSON array of arrays (UTF-8), for `json_rows`.

    One parameter instead of an array per column: asyncpg encodes arrays element by element
    in Python, which cost the replica more than any other step of a batch; msgspec encodes the
    whole batch at once. It stays bytes on its way to the server (`_jsonb_encode`): decoded to
    a str, one non-ASCII character made the whole batch's text four bytes a character, which
    asyncpg then encoded back to UTF-8. (Strings hold no NUL, which jsonb refuses:
    `indexer.normalize`.)
    """
    try:
        return _rows_encoder.encode(rows)
    except (UnicodeEncodeError, TypeError) as exc:  # a lone surrogate, a value of no JSON type
        raise BadRows(f"rows cannot be sent: {exc}") from None


def _jsonb_encode(value: bytes | str) -> bytes:
    """jsonb's binary format: a version byte, 1, then the JSON text in UTF-8."""
    return b"\x01" + (value if isinstance(value, bytes) else value.encode())


def _jsonb_decode(data: bytes) -> str:
    return data[1:].decode()  # as asyncpg returns jsonb by default: the JSON text


async def setup_connection(conn: Connection) -> None:
    """What every connection that runs the indexer's statements needs: `rows_json` as jsonb."""
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", format="binary",
        encoder=_jsonb_encode, decoder=_jsonb_decode,
    )  # fmt: skip


async def connect(dsn: str) -> Connection:
    """One connection outside the pool (tools, tests) that can run the indexer's statements."""
    conn = await asyncpg.connect(dsn)
    await setup_connection(conn)
    return conn


class BadRows(ValueError):
    """Rows that cannot be encoded: bad data, dead-lettered like a value PostgreSQL refuses."""

    sqlstate = "22021"  # character_not_in_repertoire


class Database:
    """A pool whose acquisitions are bounded in number and time.

    asyncpg does not say how many tasks wait for a connection, so `waiting` and `in_use` are
    counted here, around `acquire`; `observe_acquire` is told how long each acquire waited.
    """

    def __init__(
        self, settings: Settings, observe_acquire: Callable[[float], None] | None = None
    ) -> None:
        self._settings = settings
        self._pool: Any = None
        self._observe_acquire = observe_acquire
        self.waiting = 0
        self.in_use = 0

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._settings.database_url,
                min_size=1,
                max_size=self._settings.db_pool_size,
                command_timeout=300,
                statement_cache_size=512,
                init=setup_connection,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            url = mask_url(self._settings.database_url)
            raise ConnectionError(f"cannot connect to PostgreSQL at {url}: {exc}") from None

    async def close(self, timeout_s: float = 10.0) -> None:
        """Close the pool once its connections are released; past `timeout_s` (a stuck task
        still holds one) asyncpg terminates them, so a shutdown deadline stays a deadline."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout_s)
            except TimeoutError:
                log.warning("connections still in use after %gs; terminated", timeout_s)

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    @property
    def size(self) -> int:
        return self._settings.db_pool_size

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection; waits at most `acquire_timeout_s` for one."""
        pool = self._pool  # released to the pool it came from, even if closed meanwhile
        self.waiting += 1
        started = time.monotonic()
        try:
            conn = await pool.acquire(timeout=self._settings.acquire_timeout_s)
        finally:
            self.waiting -= 1
            if self._observe_acquire is not None:
                self._observe_acquire(time.monotonic() - started)
        self.in_use += 1
        try:
            yield conn
        except BaseException as exc:
            gone = is_unavailable(exc) and not is_timed_out(exc)  # a canceled one is fine
            if gone or isinstance(exc, asyncpg.InternalClientError):
                # The server went away mid-operation: never hand this connection out again
                # (its protocol state may be mid-query); the pool opens a fresh one.
                conn.terminate()
            raise
        finally:
            self.in_use -= 1
            await pool.release(conn)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self.connection() as conn, conn.transaction():
            yield conn

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(sql, *args)
