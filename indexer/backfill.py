"""Backfill: whole repos (getRepo CARs) into the backfill stream, one envelope per record.

Each repo becomes `create` envelopes for every record at the repo's `rev` (`seq` -1), and a
`delete` at that rev for every record our database holds live and the repo no longer does: the
repo is the truth at its rev. The rev guard of the replicas decides between these and live
events, whichever arrives first, so a backfill never overwrites a newer live record and a late
live event older than the backfill changes nothing. Replicas read the live stream first.

Envelopes go out in MULTIs of BACKFILL_CHUNK; the last one also marks the repo done at its rev
(`<stream>:done`), so a repo cut off by kill -9 is fetched again and its repeats are absorbed by
the rev guard. A repo that cannot be fetched goes to `<stream>:failed` with the reason. Adding
pauses while the backfill stream's backlog is at BACKFILL_HIGH_WATER_MARK, so Redis holds a
bounded share of a large backfill.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from indexer.car import BadCar
from indexer.config import Settings
from indexer.constants import (
    BACKFILL_CHUNK,
    BACKFILL_STREAM,
    EVENT_FIELD,
    INGESTER_BACKOFF_MAX_S,
    backfill_done_key,
    backfill_failed_key,
)
from indexer.db import Database
from indexer.events import Create, Delete, encode
from indexer.metrics import BackfillMetrics
from indexer.repo import Snapshot, read_repo
from indexer.source import Allowlist
from indexer.stream import group_backlog, text
from indexer.xrpc import GaveUp, Unavailable, Xrpc

log = logging.getLogger(__name__)
T = TypeVar("T")

_LIVE_URIS = "SELECT uri FROM record_state WHERE did = $1 AND live"
_BACKPRESSURE_POLL_S = 0.5


@dataclass(slots=True)
class Progress:
    """What a backfill has done so far."""

    total: int | None = None  # repos to do, when known in advance
    done: int = 0
    skipped: int = 0
    failed: int = 0
    records: int = 0
    deletes: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.done + self.skipped + self.failed

    def line(self) -> str:
        """One line for a log or a terminal: repos, records, rate, ETA."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.records / elapsed
        of = f"/{self.total}" if self.total is not None else ""
        eta = ""
        if self.total is not None and self.finished:
            left_s = (self.total - self.finished) * elapsed / self.finished
            eta = f", ETA {left_s:.0f} s"
        return (
            f"{self.finished}{of} repos ({self.done} backfilled, {self.skipped} skipped, "
            f"{self.failed} failed), {self.records} records, {self.deletes} deletes, "
            f"{rate:.0f} records/s{eta}"
        )


@dataclass(frozen=True, slots=True)
class Job:
    """One repo to backfill: the rev listRepos gave (None: fetch it anyway), and what to call
    once it is finished."""

    did: str
    listed_rev: str | None = None
    finished: Callable[[], None] | None = None


async def jobs_of(dids: list[str]) -> AsyncIterator[Job]:
    """Jobs for DIDs named by the operator: each fetched whatever was backfilled before."""
    for did in dict.fromkeys(dids):
        yield Job(did)


def backfill_stream(settings: Settings) -> str:
    """The stream backfills go to: the second of INDEXER_STREAMS, as replicas read it."""
    return settings.streams[1] if len(settings.streams) > 1 else BACKFILL_STREAM


class Backfill:
    """Fetches repos and adds their records to the backfill stream, bounded and resumable."""

    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        db: Database,
        metrics: BackfillMetrics,
        *,
        from_relay: bool = False,
    ) -> None:
        self._settings = settings
        self._redis = client
        self._db = db
        self._metrics = metrics
        self._from_relay = from_relay
        self._stream = backfill_stream(settings)
        self._allowed = Allowlist(settings.ingester_collections)
        self._xrpc = Xrpc(settings, lambda kind: metrics.retries.labels(kind).inc())
        self._stopping = asyncio.Event()
        self.progress = Progress()

    @property
    def stream(self) -> str:
        return self._stream

    @property
    def xrpc(self) -> Xrpc:
        return self._xrpc

    def stop(self) -> None:
        """Finish the repos in hand, start no other (signal handlers call this)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def close(self) -> None:
        await self._xrpc.close()

    async def run(self, work: AsyncIterator[Job]) -> Progress:
        """Backfill every job of `work` with BACKFILL_CONCURRENCY workers (a bounded queue
        between them); each job's `finished` is called once its repo is done, skipped or failed.
        If `work` raises, the jobs it gave are finished first, then its error is raised."""
        queue: asyncio.Queue[Job | None] = asyncio.Queue(self._settings.backfill_concurrency)

        async def worker() -> None:
            while (job := await queue.get()) is not None:
                await self.one(job.did, job.listed_rev)
                if job.finished is not None:
                    job.finished()

        workers = [
            asyncio.create_task(worker()) for _ in range(self._settings.backfill_concurrency)
        ]
        failure: Exception | None = None
        try:
            try:
                async for item in work:
                    if self.stopping:
                        break
                    await queue.put(item)
            except Exception as exc:  # the listing failed: finish what it gave, then say so
                failure = exc
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
        if failure is not None:
            raise failure
        return self.progress

    async def one(self, did: str, listed_rev: str | None = None) -> str:
        """Backfill one repo: `done`, `skipped` (already at this rev or newer) or `failed`."""
        self._metrics.in_flight.inc()
        try:
            outcome = await self._one(did, listed_rev)
        except Exception as exc:  # a bug or an answer nobody foresaw: this repo alone fails
            log.exception("backfill of %s: unexpected error", did)
            await self._failed(did, f"unexpected error: {type(exc).__name__}: {exc}")
            outcome = "failed"
        finally:
            self._metrics.in_flight.dec()
        self._metrics.repos.labels(outcome).inc()
        setattr(self.progress, outcome, getattr(self.progress, outcome) + 1)
        return outcome

    async def _one(self, did: str, listed_rev: str | None) -> str:
        # Repos named by the operator (listed_rev None) are added again whatever was done.
        if listed_rev is not None and await self._done_at(did, listed_rev):
            return "skipped"
        try:
            base = self.relay_http if self._from_relay else await self._xrpc.pds_of(did)
            car = await self._xrpc.get_repo(base, did)
            snapshot = await asyncio.to_thread(read_repo, car)
            if snapshot.did != did:
                raise Unavailable(f"the repo of {did} is signed as {snapshot.did}")
        except BadCar as exc:
            await self._failed(did, f"the repo of {did} is not a readable CAR: {exc}")
            return "failed"
        except (Unavailable, GaveUp) as exc:
            await self._failed(did, str(exc))
            return "failed"
        if listed_rev is not None and await self._done_at(did, snapshot.rev):
            return "skipped"
        creates, deletes = await self._envelopes(snapshot)
        await self._add(did, snapshot.rev, creates + deletes)
        self.progress.records += len(creates)
        self.progress.deletes += len(deletes)
        self._metrics.records.labels("create").inc(len(creates))
        self._metrics.records.labels("delete").inc(len(deletes))
        return "done"

    async def _envelopes(self, snapshot: Snapshot) -> tuple[list[bytes], list[bytes]]:
        """Creates for the repo's records, deletes for what we hold live and it does not."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        common: dict[str, Any] = {
            "seq": -1, "time": now, "did": snapshot.did, "commit": snapshot.commit,
            "rev": snapshot.rev,
        }  # fmt: skip
        creates: list[bytes] = []
        held: set[str] = set()
        for r in snapshot.records:
            if not self._allowed(r.collection):
                continue
            held.add(f"at://{snapshot.did}/{r.collection}/{r.rkey}")
            if r.record is None:
                self._metrics.records.labels("bad_record").inc()
                continue
            creates.append(encode(Create(collection=r.collection, rkey=r.rkey, cid=r.cid,
                                         record=r.record, **common)))  # fmt: skip
        live = await self.retrying(lambda: self._live_uris(snapshot.did))
        deletes = []
        for uri in sorted(live - held):
            collection, rkey = uri.rsplit("/", 2)[1:]
            if self._allowed(collection):
                deletes.append(encode(Delete(collection=collection, rkey=rkey, **common)))
        return creates, deletes

    async def _live_uris(self, did: str) -> set[str]:
        async with self._db.connection() as conn:
            return {row["uri"] for row in await conn.fetch(_LIVE_URIS, did)}

    async def _add(self, did: str, rev: str, envelopes: list[bytes]) -> None:
        """The envelopes in MULTIs of BACKFILL_CHUNK; the last one marks the repo done."""
        chunks = [
            envelopes[i : i + BACKFILL_CHUNK] for i in range(0, len(envelopes), BACKFILL_CHUNK)
        ]
        for index, chunk in enumerate(chunks or [[]]):
            await self._wait_for_room()
            last = index == max(len(chunks) - 1, 0)

            async def multi(chunk: list[bytes] = chunk, last: bool = last) -> None:
                async with self._redis.pipeline(transaction=True) as pipe:
                    for envelope in chunk:
                        pipe.xadd(self._stream, {EVENT_FIELD: envelope})
                    if last:
                        pipe.hset(backfill_done_key(self._stream), did, rev)
                        pipe.hdel(backfill_failed_key(self._stream), did)
                    await pipe.execute()

            await self.retrying(multi)

    async def _wait_for_room(self) -> None:
        """Wait while the backfill stream's backlog is at BACKFILL_HIGH_WATER_MARK."""
        mark = self._settings.backfill_high_water_mark
        group = self._settings.group
        backlog = await self.retrying(lambda: group_backlog(self._redis, self._stream, group))
        if backlog < mark:
            self._metrics.backpressure.set(0)
            return
        self._metrics.backpressure.set(1)
        while backlog >= mark:
            await asyncio.sleep(_BACKPRESSURE_POLL_S)
            backlog = await self.retrying(lambda: group_backlog(self._redis, self._stream, group))
        self._metrics.backpressure.set(0)

    async def _done_at(self, did: str, rev: str) -> bool:
        """Whether the repo was backfilled at `rev` or a newer one."""
        done = await self.retrying(lambda: self._redis.hget(backfill_done_key(self._stream), did))
        return done is not None and text(done) >= rev

    async def _failed(self, did: str, reason: str) -> None:
        log.warning("backfill of %s failed: %s", did, reason)
        value = json.dumps({"reason": reason, "time": datetime.now(UTC).isoformat()})
        await self.retrying(lambda: self._redis.hset(backfill_failed_key(self._stream), did, value))

    @property
    def relay_http(self) -> str:
        """RELAY_URL as the HTTP base of its XRPC calls (ws -> http, wss -> https)."""
        url = self._settings.relay_url.rstrip("/")
        for ws, http in (("wss://", "https://"), ("ws://", "http://")):
            if url.startswith(ws):
                url = http + url.removeprefix(ws)
        return url.split("/xrpc/", 1)[0]

    async def retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run a Redis or PostgreSQL step until it succeeds: an outage is waited out."""
        delay = self._settings.ingester_backoff_s
        while True:
            try:
                return await step()
            except (RedisError, OSError, asyncpg.PostgresConnectionError,
                    asyncpg.CannotConnectNowError, asyncpg.InterfaceError) as exc:  # fmt: skip
                log.warning("backfill: %s unavailable; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(INGESTER_BACKOFF_MAX_S, delay * 2)


async def failed_repos(client: aioredis.Redis, stream: str) -> dict[str, dict[str, str]]:
    """The repos whose backfill failed: did -> the reason and time of the last failure."""
    failed = await client.hgetall(backfill_failed_key(stream))
    out = {}
    for did, value in sorted(failed.items()):
        try:
            detail = msgspec.json.decode(value, type=dict[str, str])
        except msgspec.DecodeError:
            detail = {"reason": text(value), "time": ""}
        out[text(did)] = detail
    return out
