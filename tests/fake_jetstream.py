"""A fake Jetstream on loopback: the real protocol's cursor, filter and compression, plus faults.

Serves a fixed list of Jetstream events (as `indexer.workload` makes them) to every connection,
the way Jetstream replays from a cursor: `cursor` (time_us) starts the replay at the first event
with `time_us >= cursor`; `wantedCollections` (exact NSIDs or `prefix.*`) filters commits while
identity and account events always pass; `compress=true` sends each event as one zstd frame made
with the dictionary shipped in the package, in a binary message. After the last event the
connection stays open and silent, as a live Jetstream between events.

Faults, set as attributes at any time and read by each new connection:
- `drop_after`: abort the TCP connection after that many messages;
- `stall_after`: stop sending after that many messages and keep the connection open;
- `faulty_connections`: how many connections (counting from the first) get those two faults,
  None for all;
- `schedule`: faults for the first connections one by one, `("drop", n)`, `("stall", n)` or
  None, before the attributes above apply;
- `garbage_at`: {event index: frame}, a frame sent once, just before that event (if sent);
- `rate`: events per second per connection (on average), None for as fast as it can;
- `disconnect_all()`: abort the open connections now (a server shedding slow consumers).

`version=2` adds a top-level `cursor` (1, 2, 3, ...) to each event, and a `cursor` below 10**15
is then such a sequence. `prepare()` encodes everything beforehand (for benchmarks).

    async with FakeJetstream(events) as server:
        ... connect to server.url ...
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import zstandard
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

CLOSE_AFTER = -2  # an index meaning: send this message, then close the connection
GARBAGE_TEXT = b"{this is not json"
GARBAGE_BINARY = b"\x28\xb5\x2f\xfd garbage that is not a zstd frame"


def dictionary() -> bytes:
    """The zstd dictionary Jetstream compresses with, as shipped in the package."""
    return resources.files("indexer").joinpath("data/zstd_dictionary").read_bytes()


class FakeServer:
    """What the fake Jetstream and the fake relay share: a loopback server, its faults, counts."""

    path = "/"

    def __init__(
        self,
        *,
        drop_after: int | None = None,
        stall_after: int | None = None,
        faulty_connections: int | None = None,
        garbage_at: Mapping[int, bytes | str] | None = None,
        schedule: Sequence[tuple[str, int] | None] = (),
        rate: float | None = None,
    ) -> None:
        self.drop_after = drop_after
        self.stall_after = stall_after
        self.faulty_connections = faulty_connections
        self.garbage_at: dict[int, bytes | str] = dict(garbage_at or {})
        self.schedule = list(schedule)
        self.rate = rate  # events per second per connection, None for as fast as possible
        self.connections = 0
        self.sent = 0  # messages sent, over all connections
        self.queries: list[dict[str, list[str]]] = []  # query of each connection, in order
        self._server: Server | None = None
        self._open: set[ServerConnection] = set()
        self._port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}{self.path}"

    async def start(self) -> None:
        self._server = await serve(
            self._handle, "127.0.0.1", self._port, compression=None, max_size=2**20
        )
        self._port = self._server.sockets[0].getsockname()[1]

    def disconnect_all(self) -> None:
        """Abort every open connection, as a server shedding slow consumers does."""
        for ws in list(self._open):
            ws.transport.abort()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeServer:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        self._open.add(ws)
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        self.queries.append(query)
        drop_after, stall_after = self._faults(self.connections)
        count = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            for index, message, text in self.messages(query):
                if index == CLOSE_AFTER:
                    await ws.send(message, text=text)
                    await ws.close()
                    return
                garbage = self.garbage_at.pop(index, None)
                if garbage is not None:
                    await ws.send(garbage)
                if count == drop_after:
                    ws.transport.abort()
                    return
                if count == stall_after:
                    break
                await ws.send(message, text=text)
                count += 1
                self.sent += 1
                if self.rate:  # on average: sleep whenever ahead of the schedule
                    ahead = count / self.rate - (loop.time() - started)
                    if ahead > 0.002:
                        await asyncio.sleep(ahead)
                elif count % 256 == 0:
                    await asyncio.sleep(0)  # let other connections and the test run
            await ws.wait_closed()
        except ConnectionClosed:
            pass
        finally:
            self._open.discard(ws)

    def _faults(self, connection: int) -> tuple[int | None, int | None]:
        """(drop after, stall after) for the n-th connection."""
        if connection <= len(self.schedule):
            fault = self.schedule[connection - 1]
            if fault is None:
                return None, None
            kind, count = fault
            return (count, None) if kind == "drop" else (None, count)
        if self.faulty_connections is not None and connection > self.faulty_connections:
            return None, None
        return self.drop_after, self.stall_after

    def messages(self, query: dict[str, list[str]]) -> Iterator[tuple[int, bytes, bool]]:
        """(event index, message, is text) to send for a connection's query, in order."""
        raise NotImplementedError


class FakeJetstream(FakeServer):
    """A Jetstream `/subscribe` endpoint on loopback serving a fixed list of events."""

    path = "/subscribe"

    def __init__(
        self, events: Sequence[Mapping[str, Any] | bytes], *, version: int = 1, **faults: Any
    ) -> None:
        super().__init__(**faults)
        self.version = version  # 2 adds a top-level `cursor` (a sequence) to every event
        self._events = [_decoded(e) for e in events]
        self._times = [int(e["time_us"]) for e in self._events]
        if self._times != sorted(self._times):
            raise ValueError("events must be in time_us order, as Jetstream sends them")
        self._plain: list[bytes] | None = None
        self._compressed: list[bytes] | None = None

    @property
    def cursors(self) -> list[int | None]:
        """The `cursor` each connection asked for (None when it asked for none)."""
        return [int(q["cursor"][0]) if "cursor" in q else None for q in self.queries]

    def messages(self, query: dict[str, list[str]]) -> Iterator[tuple[int, bytes, bool]]:
        wanted = query.get("wantedCollections", [])
        compress = query.get("compress", ["false"])[0] == "true"
        start = 0
        if "cursor" in query:
            cursor = int(query["cursor"][0])
            if self.version == 2 and cursor < 10**15:  # a v2 sequence, not a time
                start = max(0, cursor - 1)
            else:
                start = bisect.bisect_left(self._times, cursor)
        payloads = self._compressed_payloads() if compress else self._plain_payloads()
        for index in range(start, len(self._events)):
            if wanted and not _wanted(self._events[index], wanted):
                continue
            yield index, payloads[index], not compress

    def prepare(self, *, compress: bool) -> None:
        """Encode (and compress) every event now, before timing anything."""
        if compress:
            self._compressed_payloads()
        else:
            self._plain_payloads()

    def _plain_payloads(self) -> list[bytes]:
        if self._plain is None:
            encode = msgspec.json.encode
            if self.version == 2:
                self._plain = [encode(e | {"cursor": i + 1}) for i, e in enumerate(self._events)]
            else:
                self._plain = [encode(e) for e in self._events]
        return self._plain

    def _compressed_payloads(self) -> list[bytes]:
        if self._compressed is None:
            compressor = zstandard.ZstdCompressor(
                dict_data=zstandard.ZstdCompressionDict(dictionary())
            )
            self._compressed = [compressor.compress(p) for p in self._plain_payloads()]
        return self._compressed

    async def __aenter__(self) -> FakeJetstream:
        await self.start()
        return self


def _decoded(event: Mapping[str, Any] | bytes) -> dict[str, Any]:
    if isinstance(event, bytes):
        decoded: dict[str, Any] = msgspec.json.decode(event)
        return decoded
    return dict(event)


def _wanted(event: Mapping[str, Any], wanted: list[str]) -> bool:
    if event.get("kind") != "commit":
        return True
    collection = event["commit"]["collection"]
    return any(fnmatch.fnmatchcase(collection, pattern) for pattern in wanted)


async def serve_forever(events: Sequence[Mapping[str, Any] | bytes]) -> None:
    """Run a FakeJetstream until cancelled (for trying the CLI by hand)."""
    async with FakeJetstream(events) as server:
        print(server.url, flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
