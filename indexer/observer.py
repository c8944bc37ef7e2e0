"""A replica's look at itself every few seconds: stream gauges, backlog, Redis and PostgreSQL.

The figures of our group go to the `indexer_stream_*` gauges; the backlog (lag plus pending)
goes to `Health`, so that a backlog which stops moving makes the replica unhealthy; the checks
of Redis (reachable, loaded), PostgreSQL (reachable) and the schema (every migration applied)
make up readiness. It runs from the start, so readiness is told during start-up waits too, and
each round is a beat of the process loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from indexer.config import Settings
from indexer.db import Database, is_unavailable
from indexer.health import Health
from indexer.lag import collect, publish
from indexer.metrics import Metrics
from indexer.migrate import applied_versions, load_migrations

log = logging.getLogger(__name__)

_MIN_ROUND_TIMEOUT_S = 5.0


class Observer:
    """Runs beside the workers of one replica until cancelled."""

    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        db: Database,
        metrics: Metrics,
        health: Health,
    ) -> None:
        self._settings = settings
        self._redis = client
        self._db = db
        self._metrics = metrics
        self._health = health
        self._committed_at = -1e9
        self._failing: set[str] = set()
        self._needed = {m.version for m in load_migrations()}
        self._stopped = asyncio.Event()

    def committed(self) -> None:
        """A batch committed: PostgreSQL answers, no probe needed this round."""
        self._committed_at = time.monotonic()

    def stop(self) -> None:
        """End `run()` after the round in hand. An event, not a cancellation: on Python 3.11 a
        cancel that lands as a redis-py command completes is lost (its `asyncio.wait_for`)."""
        self._stopped.set()

    async def run(self) -> None:
        try:
            while not self._stopped.is_set():
                await self.observe()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), self._settings.stats_interval_s)
        except Exception:
            log.exception("observer crashed: stream gauges and readiness are no longer updated")
            raise

    async def observe(self) -> None:
        """One round: stream figures, then PostgreSQL."""
        self._health.beat()
        s = self._settings
        try:
            async with asyncio.timeout(max(s.stats_interval_s, _MIN_ROUND_TIMEOUT_S)):
                figures = await collect(self._redis, s.streams, s.group, others=False)
        except TimeoutError:
            self._check("redis", False, "no answer in time")
        except (RedisError, OSError) as exc:
            self._check("redis", False, f"{exc.__class__.__name__}: {exc}")
        else:
            publish(self._metrics, figures)
            self._health.set_backlog(sum(f.backlog for f in figures))
            self._check("redis", True)
        if time.monotonic() - self._committed_at < s.stats_interval_s:
            self._check("postgres", True)  # a batch committed just now: no probe needed
        elif not self._db.is_open:
            # start-up: not a failure to warn about (the replica logs what it waits for)
            self._health.set_check("postgres", False, "not connected yet")
        else:
            await self._probe_postgres()

    async def _probe_postgres(self) -> None:
        """PostgreSQL answers, and every migration this code knows is applied."""
        try:
            async with asyncio.timeout(self._settings.stats_interval_s):
                async with self._db.connection() as conn:
                    missing = self._needed - await applied_versions(conn)
        except TimeoutError:
            self._check("postgres", False, f"no answer in {self._settings.stats_interval_s:g} s")
            return
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self._check("postgres", False, f"{exc.__class__.__name__}: {exc}")
            return
        self._check("postgres", True)
        pending = ", ".join(f"{v:03d}" for v in sorted(missing))
        self._check("schema", not missing, f"migrations {pending} not applied" if missing else "")

    def _check(self, name: str, ok: bool, detail: str = "") -> None:
        """Report a check; log when it starts or stops failing (not every round)."""
        self._health.set_check(name, ok, detail)
        if not ok and name not in self._failing:
            log.warning("%s not ready: %s", name, detail)
            self._failing.add(name)
        elif ok and name in self._failing:
            log.info("%s ready again", name)
            self._failing.discard(name)
