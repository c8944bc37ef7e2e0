"""Start-up: wait for Redis to finish loading and for PostgreSQL to accept us, with a deadline.

Containers start in any order and Redis answers `LOADING` while it reads a large AOF, so a
replica waits for both (logging what it waits for, every few seconds) instead of crashing, and
gives up with one clear line once `startup_timeout_s` has passed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError, RedisError

from indexer.config import Settings, mask_url
from indexer.db import Database, is_unavailable
from indexer.migrate import SchemaNotReady, collation_warning
from indexer.migrate import pending as pending_migrations

log = logging.getLogger(__name__)

_POLL_S = 0.5
_LOG_EVERY_S = 5.0


class _Waiter:
    """Polls until ready; logs progress at most every few seconds; raises at the deadline."""

    def __init__(self, what: str, timeout_s: float) -> None:
        self._what = what
        self._started = time.monotonic()
        self._deadline = self._started + timeout_s
        self._timeout_s = timeout_s
        self._logged = 0.0

    def expired(self) -> bool:
        return time.monotonic() >= self._deadline

    def note(self, state: str) -> None:
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY_S:
            self._logged = now
            log.info("waiting for %s: %s (%.0fs so far)", self._what, state, now - self._started)

    def give_up(self, state: str) -> str:
        return f"{self._what} not ready after {self._timeout_s:g}s: {state}"


async def loading_progress(client: aioredis.Redis) -> str:
    """How far Redis has got with loading its data, as INFO persistence reports it."""
    try:
        info = await client.info("persistence")
    except RedisError:
        return "loading its data"
    if not int(info.get("loading", 0)):
        return "loaded"
    return f"loading its data, {float(info.get('loading_loaded_perc', 0.0)):.0f}% done"


async def _pause(stop: asyncio.Event | None) -> bool:
    """Sleep one poll interval; True if a stop was requested meanwhile."""
    if stop is None:
        await asyncio.sleep(_POLL_S)
        return False
    try:
        await asyncio.wait_for(stop.wait(), _POLL_S)
    except TimeoutError:
        return False
    return True


async def wait_for_redis(
    client: aioredis.Redis, settings: Settings, stop: asyncio.Event | None = None
) -> bool:
    """Return True once Redis answers commands (not `LOADING`), False if `stop` was set first;
    ConnectionError at the deadline."""
    waiter = _Waiter(f"redis at {mask_url(settings.redis_url)}", settings.startup_timeout_s)
    while True:
        try:
            await client.ping()
            if not int((await client.info("persistence")).get("loading", 0)):
                return True
            state = await loading_progress(client)
        except BusyLoadingError:
            state = await loading_progress(client)
        except (RedisError, OSError) as exc:
            state = str(exc) or exc.__class__.__name__
        if waiter.expired():
            raise ConnectionError(waiter.give_up(state))
        waiter.note(state)
        if await _pause(stop):
            return False


async def wait_for_postgres(
    db: Database, settings: Settings, stop: asyncio.Event | None = None
) -> bool:
    """Open the pool and return True once every migration is applied (False if `stop` was set
    first); raise at the deadline (ConnectionError when PostgreSQL never answered,
    SchemaNotReady when it is not migrated)."""
    waiter = _Waiter(f"PostgreSQL at {mask_url(settings.database_url)}", settings.startup_timeout_s)
    while True:
        try:
            if not db.is_open:
                await db.open()
            async with db.connection() as conn:
                missing = await pending_migrations(conn)
                if not missing:
                    if warning := await collation_warning(conn):
                        log.warning("%s", warning)
                    return True
            names = ", ".join(m.name for m in missing)
            problem: Exception = SchemaNotReady(
                f"database is not migrated ({names} pending): run `indexer migrate`"
            )
        except ConnectionError as exc:
            problem = exc
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            problem = ConnectionError(f"PostgreSQL unavailable: {exc}")
        if waiter.expired():
            if isinstance(problem, SchemaNotReady):
                raise problem
            raise ConnectionError(waiter.give_up(str(problem)))
        waiter.note(str(problem))
        if await _pause(stop):
            return False
