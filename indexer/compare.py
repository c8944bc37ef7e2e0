"""`indexer compare`: of what the network produced in a window, how much is in our database?

Subscribes to Jetstream for the chosen collections, lets the connection warm up, then records
every create seen during the sample window by its identity (did, collection, rkey, rev), not by
subtracting running totals, which reconnects and replays make lie. A reconnect restarts the
window. After a grace period for late indexing, each record is looked up in `record_state` (a
record counts as indexed when the newest rev we hold is at least the create's rev: a later
delete or update of it means the create went through) and the coverage per collection is the
share found.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg
import msgspec
from rich.console import Console
from rich.table import Table
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from indexer import constants
from indexer.config import Settings, mask_url
from indexer.health import Health, serving
from indexer.metrics import CoverageMetrics
from indexer.migrate import SchemaNotReady

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOOKUP_CHUNK = 5_000
_RECONNECT_DELAY_S = 0.5
_MAX_MESSAGE_BYTES = 2**21
_BY_STATE = "SELECT uri, rev FROM record_state WHERE uri = ANY($1::varchar[])"
_BY_RECORD = "SELECT uri, NULL AS rev FROM record WHERE uri = ANY($1::varchar[])"

# did, rkey, rev of one create
Identity = tuple[str, str, str]


class _Commit(msgspec.Struct):
    operation: str = ""
    collection: str = ""
    rkey: str = ""
    rev: str = ""


class _Event(msgspec.Struct):
    did: str = ""
    kind: str = ""
    commit: _Commit | None = None


_decoder = msgspec.json.Decoder(_Event)


@dataclass(frozen=True, slots=True)
class CompareOptions:
    url: str
    collections: tuple[str, ...]
    warmup_s: float = constants.DEFAULT_COMPARE_WARMUP_S
    duration_s: float = constants.DEFAULT_COMPARE_DURATION_S
    grace_s: float = constants.DEFAULT_COMPARE_GRACE_S
    max_reconnects: int = 10
    examples: int = 3


@dataclass(slots=True)
class CollectionCoverage:
    collection: str
    network: int
    indexed: int
    network_per_s: float
    indexed_per_s: float
    coverage_pct: float | None
    missing_examples: list[str] = field(default_factory=list)
    missing_repos: list[str] = field(default_factory=list)  # the DIDs of all missing creates


@dataclass(slots=True)
class Comparison:
    url: str
    window_s: float
    reconnects: int
    collections: list[CollectionCoverage]

    @property
    def network_total(self) -> int:
        return sum(c.network for c in self.collections)

    @property
    def missing_repos(self) -> list[str]:
        """Every repo with a create the network has and the database lacks."""
        return sorted({did for c in self.collections for did in c.missing_repos})

    def below(self, min_coverage_pct: float) -> list[CollectionCoverage]:
        """Collections that saw creates and found fewer than `min_coverage_pct` of them."""
        return [
            c
            for c in self.collections
            if c.coverage_pct is not None and c.coverage_pct < min_coverage_pct
        ]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Window:
    """The creates seen during one complete sample window, per collection."""

    seconds: float
    seen: dict[str, set[Identity]]
    reconnects: int = 0
    undecodable: int = 0


class JetstreamUnavailable(ConnectionError):
    """Jetstream could not be reached, or kept dropping the connection."""


class DatabaseUnavailable(ConnectionError):
    """The database could not be reached or read (down, restarting, refusing the query)."""


def subscribe_url(url: str, collections: tuple[str, ...]) -> str:
    """The URL with one `wantedCollections` per collection added to its query."""
    parts = urlsplit(url)
    extra = urlencode([("wantedCollections", c) for c in collections])
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


async def sample(opts: CompareOptions, on_message: Callable[[], None] | None = None) -> Window:
    """One complete sample window; a dropped connection restarts it (up to max_reconnects)."""
    url = subscribe_url(opts.url, opts.collections)
    reconnects = 0
    connected = False
    while True:
        try:
            async with connect(
                url, compression=None, max_size=_MAX_MESSAGE_BYTES, open_timeout=10
            ) as ws:
                connected = True
                window = await _window(ws, opts, on_message)
            window.reconnects = reconnects
            return window
        except InvalidURI as exc:
            raise ValueError(f"not a websocket URL: {exc}") from None
        except (ConnectionClosed, OSError, TimeoutError, InvalidHandshake) as exc:
            reason = str(exc) or exc.__class__.__name__
            # Never reached at all: say so at once. Dropped: try again, a few times.
            if not connected or reconnects >= opts.max_reconnects:
                raise JetstreamUnavailable(
                    f"jetstream at {mask_url(opts.url)}: {reason} ({reconnects} reconnects)"
                ) from None
            reconnects += 1
            log.warning("jetstream connection lost (%s); the window starts again", reason)
            await asyncio.sleep(_RECONNECT_DELAY_S * min(reconnects, 5))


async def _window(
    ws: ClientConnection, opts: CompareOptions, on_message: Callable[[], None] | None
) -> Window:
    """Warm up, then collect creates until the window ends (a disconnect raises)."""
    window = Window(opts.duration_s, {c: set() for c in opts.collections})
    started = time.monotonic()
    window_start = started + opts.warmup_s
    window_end = window_start + opts.duration_s
    while (left := window_end - time.monotonic()) > 0:
        try:
            async with asyncio.timeout(left):
                message = await ws.recv(decode=False)
        except TimeoutError:
            break
        if on_message is not None:
            on_message()
        if time.monotonic() < window_start:
            continue
        try:
            event = _decoder.decode(message)
        except msgspec.DecodeError:
            window.undecodable += 1
            continue
        commit = event.commit
        if event.kind != "commit" or commit is None or commit.operation != "create":
            continue
        found = window.seen.get(commit.collection)
        if found is not None:
            found.add((event.did, commit.rkey, commit.rev))
    if window.undecodable:
        log.warning("%d undecodable messages in the window, not counted", window.undecodable)
    return window


async def check_database(
    conn: asyncpg.Connection, window: Window, opts: CompareOptions
) -> list[CollectionCoverage]:
    """Per collection: how many of the window's creates the database holds."""
    tables = await conn.fetchrow(
        "SELECT to_regclass('record_state') IS NOT NULL AS state,"
        " to_regclass('record') IS NOT NULL AS record"
    )
    if not tables["state"] and not tables["record"]:
        raise SchemaNotReady("the database has no record table: run `indexer migrate`")
    sql = _BY_STATE if tables["state"] else _BY_RECORD
    report = []
    for collection, identities in window.seen.items():
        uris = {i: f"at://{i[0]}/{collection}/{i[1]}" for i in identities}
        newest: dict[str, str | None] = {}
        wanted = sorted(set(uris.values()))
        for start in range(0, len(wanted), _LOOKUP_CHUNK):
            rows = await conn.fetch(sql, wanted[start : start + _LOOKUP_CHUNK])
            newest.update((r["uri"], r["rev"]) for r in rows)
        missing = sorted(
            uri
            for identity, uri in uris.items()
            if uri not in newest or (newest[uri] or identity[2]) < identity[2]
        )
        network, indexed = len(identities), len(identities) - len(missing)
        report.append(
            CollectionCoverage(
                collection=collection,
                network=network,
                indexed=indexed,
                network_per_s=network / window.seconds,
                indexed_per_s=indexed / window.seconds,
                coverage_pct=100.0 * indexed / network if network else None,
                missing_examples=missing[: opts.examples],
                missing_repos=sorted({uri.split("/", 3)[2] for uri in missing}),
            )
        )
    return report


async def compare(
    opts: CompareOptions, database_url: str, on_message: Callable[[], None] | None = None
) -> Comparison:
    """Sample the network, wait the grace period, then look the records up."""
    return await measure(opts, database_url, await sample(opts, on_message))


async def measure(opts: CompareOptions, database_url: str, window: Window) -> Comparison:
    """After the grace period, how much of a window the database holds; raises
    DatabaseUnavailable or SchemaNotReady, never a driver error."""
    log.info(
        "window of %gs: %d creates seen; checking the database in %gs",
        window.seconds, sum(len(s) for s in window.seen.values()), opts.grace_s,
    )  # fmt: skip
    await asyncio.sleep(opts.grace_s)
    try:
        conn = await asyncpg.connect(database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(f"cannot connect to {mask_url(database_url)}: {exc}") from None
    # A restart or an unmigrated table is the operator's to see in one line, not a bug.
    try:
        found = await check_database(conn, window, opts)
    except asyncpg.UndefinedTableError as exc:
        raise SchemaNotReady(f"{exc}: run `indexer migrate`") from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = str(exc) or exc.__class__.__name__
        raise DatabaseUnavailable(f"database at {mask_url(database_url)}: {reason}") from None
    finally:
        if not conn.is_closed():  # a dropped session is closed already
            await conn.close()
    return Comparison(mask_url(opts.url), window.seconds, window.reconnects, found)


def publish(metrics: CoverageMetrics, result: Comparison) -> None:
    """Set `indexer_coverage_ratio` and the two rates per collection; a collection without
    creates in the window has no ratio (NaN), so no alert reads an old one."""
    for c in result.collections:
        ratio = math.nan if c.coverage_pct is None else c.coverage_pct / 100
        metrics.coverage.labels(c.collection).set(ratio)
        metrics.network_rate.labels(c.collection).set(c.network_per_s)
        metrics.indexed_rate.labels(c.collection).set(c.indexed_per_s)


def publish_failed(metrics: CoverageMetrics, collections: tuple[str, ...]) -> None:
    """A round that failed measured nothing: every figure is NaN until one succeeds."""
    for collection in collections:
        for gauge in (metrics.coverage, metrics.network_rate, metrics.indexed_rate):
            gauge.labels(collection).set(math.nan)


def render(result: Comparison) -> Table:
    """The comparison as a table, with a few missing URIs per collection."""
    table = Table(
        title=f"{result.url}: window {result.window_s:g} s, {result.reconnects} reconnect(s)",
        title_justify="left",
    )
    for heading in ("collection", "network/s", "indexed/s", "coverage", "missing (examples)"):
        left = heading.startswith(("collection", "missing"))
        table.add_column(heading, justify="left" if left else "right")
    for c in result.collections:
        coverage = "-" if c.coverage_pct is None else f"{c.coverage_pct:.1f}%"
        table.add_row(
            c.collection,
            f"{c.network_per_s:.1f}",
            f"{c.indexed_per_s:.1f}",
            coverage,
            "\n".join(c.missing_examples),
        )
    return table


def verdict(result: Comparison, min_coverage_pct: float | None) -> int:
    """The exit code: 1 when nothing was seen, or a collection is below the minimum."""
    if not result.network_total:
        log.error("no creates of the chosen collections seen in the window: check --url")
        return 1
    below = result.below(min_coverage_pct) if min_coverage_pct is not None else []
    for c in below:
        log.error("%s: coverage %.2f%% below %g%%", c.collection, c.coverage_pct, min_coverage_pct)
    return 1 if below else 0


def show(result: Comparison, json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
        sys.stdout.flush()
    else:
        Console().print(render(result))


class SourceSilence:
    """How long Jetstream has said nothing while we listened, carried across rounds, on `health`.

    Between rounds nobody listens, so that pause is not silence; but once the source has been
    silent too long, or could not be reached, the clock runs on until it talks again, so that
    `/health` stays 503 however the rounds and pauses fall.
    """

    def __init__(self, health: Health) -> None:
        self._health = health
        self._carried_s = 0.0
        self._since: float | None = None  # start of the running part of the silence
        self.messages = 0  # in the current round

    def listen(self) -> None:
        """A round starts listening: from here on the source must talk."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        self.messages = 0
        self._health.silent_for(self._carried_s + now - self._since)

    def heard(self) -> None:
        """A message arrived."""
        self._carried_s, self._since = 0.0, time.monotonic()
        self.messages += 1
        self._health.progressed()

    def rest(self, *, reached: bool) -> None:
        """The round stopped listening; `reached`: its window completed."""
        now = time.monotonic()
        silent_s = self._carried_s + now - (now if self._since is None else self._since)
        if reached and silent_s < self._health.stall_after_s:
            self._carried_s, self._since = silent_s, None
            self._health.idle()


async def continuously(
    opts: CompareOptions,
    settings: Settings,
    every_s: float,
    *,
    json_out: bool,
    min_coverage_pct: float | None = None,
    repair: Callable[[list[str]], Coroutine[Any, Any, object]] | None = None,
) -> int:
    """A comparison every `every_s` until SIGINT/SIGTERM, exported as `indexer_coverage_ratio`
    on METRICS_PORT with /health (Jetstream silent for `stall_after_s` while listened to is
    unhealthy) and /ready (the last round heard creates and read the database). A failed round
    is logged and its figures set to NaN; collections below `min_coverage_pct` are logged;
    `repair` is given the repos with missing creates after each round."""
    metrics = CoverageMetrics()
    health = Health(settings.stall_after_s, checks=("jetstream", "postgres"))
    silence = SourceSilence(health)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serving(metrics.registry, health, settings.metrics_port):
        while not stop.is_set():
            started = time.monotonic()
            result = await _alive_until(
                asyncio.create_task(_round(opts, settings, health, silence)), stop, health
            )
            if result is not None:
                publish(metrics, result)
                show(result, json_out)
                verdict(result, min_coverage_pct)
                if repair is not None and result.missing_repos:
                    await _alive_until(
                        asyncio.create_task(repair(result.missing_repos)), stop, health
                    )
            elif not stop.is_set():
                publish_failed(metrics, opts.collections)
            pause = asyncio.create_task(
                asyncio.sleep(max(0.0, started + every_s - time.monotonic()))
            )
            await _alive_until(pause, stop, health)
    return 0


async def _alive_until(task: asyncio.Task[T], stop: asyncio.Event, health: Health) -> T | None:
    """Await `task`, beating `health` meanwhile (long pauses are not a dead loop); a stop
    request cancels it and returns None."""
    beat_s = max(0.05, health.stall_after_s / 4)
    while not task.done() and not stop.is_set():
        health.beat()
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([task, stopper], timeout=beat_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()


async def _round(
    opts: CompareOptions, settings: Settings, health: Health, silence: SourceSilence
) -> Comparison | None:
    """One comparison; a failure is reported in /ready and the log, not raised."""
    silence.listen()
    try:
        window = await sample(opts, silence.heard)
    except JetstreamUnavailable as exc:
        silence.rest(reached=False)
        health.set_check("jetstream", False, str(exc))
        log.error("comparison skipped: %s", exc)
        return None
    silence.rest(reached=True)
    if not silence.messages:
        health.set_check(
            "jetstream", False, f"no messages in the last {opts.duration_s:g} s window"
        )
    elif not any(window.seen.values()):
        health.set_check(
            "jetstream", False, "no creates of the chosen collections in the last window"
        )
    else:
        health.set_check("jetstream", True)
    try:
        result = await measure(opts, settings.database_url, window)
    except (DatabaseUnavailable, SchemaNotReady) as exc:
        health.set_check("postgres", False, str(exc))
        log.error("comparison failed: %s", exc)
        return None
    health.set_check("postgres", True)
    return result
