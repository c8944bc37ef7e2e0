"""`indexer backfill all`: every repo a relay lists, resumable after kill -9.

`com.atproto.sync.listRepos` is read page by page. The cursor of a page is saved
(`<backfill stream>:cursor:<relay host>`) only once every repo listed before it is finished
(backfilled, skipped or failed), whatever order the workers finish them in; a restart lists
again from there and skips repos already backfilled at the listed rev or a newer one. When the
last page is finished, the cursor is removed, so the next `backfill all` walks the whole list
again and adds only repos that changed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from indexer.backfill import Job
from indexer.constants import BACKFILL_PAGE, cursor_key
from indexer.source import host_of
from indexer.stream import text
from indexer.xrpc import GaveUp, Unavailable, Xrpc

log = logging.getLogger(__name__)

Retrying = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


class ListingFailed(ConnectionError):
    """listRepos gave up; the repos listed before were finished and the cursor kept."""


@dataclass(slots=True)
class _Page:
    remaining: int
    next_cursor: str | None
    listed: bool = False  # every repo of the page has been handed out

    def finish_one(self) -> None:
        self.remaining -= 1


class Listing:
    """The repos of a relay's listRepos as backfill jobs, with the cursor saved in order."""

    def __init__(
        self, client: aioredis.Redis, xrpc: Xrpc, stream: str, base: str, retrying: Retrying
    ) -> None:
        self._redis = client
        self._retrying = retrying  # Redis steps wait out an outage
        self._xrpc = xrpc
        self._base = base
        self._key = cursor_key(stream, host_of(base))
        self._pages: deque[_Page] = deque()
        self.listed = 0
        self.inactive = 0
        self.complete = False
        self.page_size = BACKFILL_PAGE

    async def jobs(self) -> AsyncIterator[Job]:
        """Every active repo listed after the saved cursor, page by page."""
        saved = await self._retrying(lambda: self._redis.get(self._key))
        cursor = text(saved) if saved else None
        if cursor:
            log.info("resuming listRepos of %s after cursor %s", self._base, cursor)
        while True:
            try:
                page = await self._xrpc.list_repos(self._base, cursor, self.page_size)
            except (GaveUp, Unavailable) as exc:
                raise ListingFailed(
                    f"listRepos of {self._base} failed: {exc}; what was listed before is "
                    "finished and the cursor kept: run it again to go on"
                ) from None
            active = [r for r in page.repos if r.active]
            self.listed += len(page.repos)
            self.inactive += len(page.repos) - len(active)
            state = _Page(remaining=len(active), next_cursor=page.cursor)
            self._pages.append(state)
            for repo in active:
                yield Job(repo.did, repo.rev, state.finish_one)
            state.listed = True
            await self._save()
            if not page.cursor or not page.repos:
                return
            cursor = page.cursor

    async def _save(self) -> None:
        """Save the cursor after the leading pages whose repos are all finished."""
        cursor: str | None = None
        moved = False
        while self._pages and self._pages[0].listed and self._pages[0].remaining == 0:
            cursor = self._pages.popleft().next_cursor
            moved = True
        if not moved:
            return
        if cursor is None:
            await self._retrying(lambda: self._redis.delete(self._key))
            self.complete = True
        else:
            await self._retrying(lambda: self._redis.set(self._key, cursor))

    async def finish(self) -> None:
        """After the workers are done: save what they finished since the last page."""
        await self._save()
