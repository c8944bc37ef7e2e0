"""One `indexer backfill` run: its connections, metrics server, signals and progress display."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from indexer.backfill import Backfill, Job, Progress, jobs_of
from indexer.config import Settings
from indexer.constants import BACKFILL_PAGE, BACKFILL_PROGRESS_S
from indexer.db import Database
from indexer.health import Health, serving
from indexer.listing import Listing
from indexer.metrics import BackfillMetrics
from indexer.stream import connect

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to backfill: the DIDs named, or (`dids` None) every repo the relay lists."""

    dids: list[str] | None
    from_relay: bool = False
    page_size: int = BACKFILL_PAGE  # repos per listRepos page


@dataclass(frozen=True, slots=True)
class Result:
    progress: Progress
    stream: str
    complete: bool  # `all`: the relay's list was walked to its end
    stopped: bool


async def backfill(
    settings: Settings,
    plan: Plan,
    *,
    standalone: bool = True,
    metrics: BackfillMetrics | None = None,
) -> Result:
    """Run a backfill to its end (or to SIGINT/SIGTERM: the repos in hand are finished).

    Standalone, it owns the signals and serves its metrics on METRICS_PORT; inside another
    command (`compare --repair`) it does neither.
    """
    client = connect(settings)
    db = Database(settings)
    await db.open()
    metrics = metrics or BackfillMetrics()
    engine = Backfill(settings, client, db, metrics, from_relay=plan.from_relay)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if standalone else ()
    for sig in signals:
        loop.add_signal_handler(sig, engine.stop)
    listing: Listing | None = None
    try:
        work: AsyncIterator[Job]
        if plan.dids is None:
            listing = Listing(
                client, engine.xrpc, engine.stream, engine.relay_http, engine.retrying
            )
            listing.page_size = plan.page_size
            work = listing.jobs()
        else:
            engine.progress.total = len(dict.fromkeys(plan.dids))
            work = jobs_of(plan.dids)
        health = Health(settings.stall_after_s, checks=())
        port = settings.metrics_port if standalone else 0
        async with serving(metrics.registry, health, port), _reporting(engine):
            try:
                progress = await engine.run(work)
            finally:  # also when the listing failed: the cursor after what was finished
                if listing is not None:
                    await listing.finish()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await engine.close()
        await db.close()
        await client.aclose()
    complete = listing.complete if listing is not None else not engine.stopping
    return Result(progress, engine.stream, complete, engine.stopping)


@contextlib.asynccontextmanager
async def _reporting(engine: Backfill) -> AsyncIterator[None]:
    """Progress every BACKFILL_PROGRESS_S: a live line on a terminal, else a log line."""
    done = asyncio.Event()

    async def report() -> None:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            console = Console(stderr=True)
            with Live(engine.progress.line(), console=console, transient=True) as live:
                while not await _wait(done, 0.5):
                    live.update(engine.progress.line())
            return
        while not await _wait(done, BACKFILL_PROGRESS_S):
            log.info("backfill: %s", engine.progress.line())

    task = asyncio.create_task(report())
    try:
        yield
    finally:
        done.set()
        await task


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)
    return event.is_set()
