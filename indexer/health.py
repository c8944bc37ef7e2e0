"""Liveness and readiness of a process, and the small HTTP server for /metrics, /health, /ready.

Liveness is honest about stalls: the loop must keep beating, and while there is a backlog the
work must keep moving. A socket that stays open while nothing arrives, or a batch retried
forever, turns `/health` to 503 after `stall_after_s`, with the number of seconds in the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

READY_CHECKS = ("redis", "postgres", "schema")
_REQUEST_TIMEOUT_S = 5.0
_MAX_HEADER_LINES = 100


class Health:
    """What a process knows about itself: is its loop alive, is its work moving, is it ready.

    It starts idle. A replica reports its backlog (`set_backlog`), so silence is fine only while
    there is nothing to do; a source that must keep talking (an ingester's socket) calls
    `progressed()` when it starts listening and at every message, and never `idle()`; one
    listened to in rounds (`indexer compare --every`) resumes with `silent_for()`, so that its
    silence adds up across rounds.
    """

    def __init__(self, stall_after_s: float, checks: tuple[str, ...] = READY_CHECKS) -> None:
        self.stall_after_s = stall_after_s
        now = time.monotonic()
        self._beat_at = now
        self._progress_at = now
        self._idle = True
        self._backlog: int | None = None
        self._checks: dict[str, tuple[bool, str]] = {
            name: (False, "not checked yet") for name in checks
        }

    def beat(self) -> None:
        """The loop is alive (called once per turn of it)."""
        self._beat_at = time.monotonic()

    def progressed(self) -> None:
        """Work moved: a batch was ACKed, a message arrived."""
        now = time.monotonic()
        self._beat_at = self._progress_at = now
        self._idle = False

    def idle(self) -> None:
        """Nothing to do: there is no backlog, so silence is fine."""
        now = time.monotonic()
        self._beat_at = self._progress_at = now
        self._idle = True

    def silent_for(self, seconds: float) -> None:
        """Work must move from now on, and has not for `seconds` already (a source listened to
        again after a pause, its earlier silence carried over)."""
        now = time.monotonic()
        self._beat_at = now
        self._progress_at = now - seconds
        self._idle = False

    def set_backlog(self, entries: int) -> None:
        """How much work is waiting (lag plus pending), for the reason text; 0 means idle."""
        self._backlog = entries
        if entries == 0:
            self._idle = True
            self._progress_at = time.monotonic()
        elif self._idle:
            # Work appeared: from now on it must move.
            self._idle = False
            self._progress_at = time.monotonic()

    def set_check(self, name: str, ok: bool, detail: str = "") -> None:
        """One part of readiness ("redis", "postgres", "schema", ...)."""
        self._checks[name] = (ok, detail)

    def live(self) -> tuple[bool, str]:
        """Alive: the loop beats, and a backlog is not standing still."""
        now = time.monotonic()
        silent = now - self._beat_at
        stalled = now - self._progress_at
        if not self._idle and stalled > self.stall_after_s:
            backlog = "" if self._backlog is None else f" with a backlog of {self._backlog}"
            return False, f"no progress for {_secs(stalled)} s{backlog}"
        if silent > self.stall_after_s:
            return False, f"loop silent for {_secs(silent)} s"
        if self._idle:
            return True, "alive, idle"
        return True, f"alive, last progress {_secs(stalled)} s ago"

    def ready(self) -> tuple[bool, str]:
        """Ready: alive, and every check passed."""
        alive, reason = self.live()
        failed = [
            f"{name}: {detail or 'failed'}" for name, (ok, detail) in self._checks.items() if not ok
        ]
        if not alive:
            failed.insert(0, reason)
        if failed:
            return False, "; ".join(failed)
        return True, "ready"


class HealthServer:
    """GET /metrics (the registry), /health (live) and /ready, on the running event loop."""

    def __init__(self, registry: CollectorRegistry, health: Health, port: int) -> None:
        self._registry = registry
        self._health = health
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port bound (useful when started on port 0, as tests do)."""
        if self._server is None:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str = "0.0.0.0") -> None:
        self._server = await asyncio.start_server(self._serve, host, self._port)
        log.info("serving /metrics, /health and /ready on port %d", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                path = await _read_request(reader)
                status, content_type, body = self._respond(path)
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode() + body)
                await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as exc:
            log.debug("health request dropped: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _respond(self, path: str | None) -> tuple[str, str, bytes]:
        if path is None:
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path in ("/health", "/ready"):
            ok, reason = self._health.live() if path == "/health" else self._health.ready()
            status = "200 OK" if ok else "503 Service Unavailable"
            return status, "text/plain; charset=utf-8", f"{reason}\n".encode()
        return "404 Not Found", "text/plain", b"try /metrics, /health or /ready\n"


def _secs(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"


async def _read_request(reader: asyncio.StreamReader) -> str | None:
    """The path of a GET request (query string dropped), or None for another method."""
    request_line = (await reader.readline()).decode("latin-1").split()
    if len(request_line) < 2:
        raise ValueError("malformed request line")
    for _ in range(_MAX_HEADER_LINES):
        if (await reader.readline()) in (b"\r\n", b"\n", b""):
            break
    method, target = request_line[0], request_line[1]
    if method != "GET":
        return None
    return target.split("?", 1)[0]


@contextlib.asynccontextmanager
async def serving(registry: CollectorRegistry, health: Health, port: int) -> AsyncIterator[None]:
    """Serve /metrics, /health and /ready on `port` for the duration; port 0 serves nothing."""
    if not port:
        yield
        return
    async with HealthServer(registry, health, port):
        yield


def probe(url: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """GET a /health or /ready URL, as a container health check does: (healthy, one line)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return False, f"not an http(s) URL: {url}"
    what = "ready" if parts.path.rstrip("/").endswith("ready") else "healthy"
    # No proxy from the environment: the probe is about this host's own server.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as answer:
            return True, _first_line(answer.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return False, f"not {what}: {_first_line(exc.read())}"
        return False, f"{url} answered {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"no answer from {url}: {reason}"


def _first_line(body: bytes) -> str:
    return body.decode("utf-8", "replace").strip().splitlines()[0] if body.strip() else ""
