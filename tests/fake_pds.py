"""A fake atproto network on loopback for backfill: PDSes, a relay and a PLC directory.

Each server is a minimal HTTP/1.1 server (keep-alive, or `Connection: close` with
`keep_alive = False`) on 127.0.0.1 with its own event loop in a thread, so a test may call it
from async code, from blocking code or from a subprocess alike. Every server records its
requests (`hits`, `count`, `arrivals`, `max_in_flight`, `connections`) and serves scripted
faults before the real answer (`fail`), after an optional `delay` per response. The repos they
serve are real (`tests.fake_repo`).

    network = make_network(n_repos=20, records_per_repo=30, n_pdses=3, seed=1)
    async with network:
        ... PLC_URL = network.plc.url, relay at network.relay.url ...
        assert stored == network.expected()
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import msgspec

from indexer.workload import DEFAULT_START_TIME_US
from tests.fake_repo import FakeRepo, make_repos

GET_REPO = "com.atproto.sync.getRepo"
LATEST_COMMIT = "com.atproto.sync.getLatestCommit"
LIST_REPOS = "com.atproto.sync.listRepos"
DID_DOC = "did-document"  # the PLC directory's `GET /{did}`
RESET = "reset"  # a scripted fault: close the connection without answering


# --- HTTP -------------------------------------------------------------------------------------

_ERROR_NAMES = {
    400: "InvalidRequest",
    404: "NotFound",
    429: "RateLimitExceeded",
    500: "InternalServerError",
    502: "UpstreamFailure",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS |= {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway"}
_REASONS |= {503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, body: Any) -> Response:
    return Response(status, msgspec.json.encode(body))


def error_response(status: int, error: str | None = None, message: str = "") -> Response:
    """An XRPC error: `{"error", "message"}`."""
    name = error or _ERROR_NAMES.get(status, "Error")
    return json_response(status, {"error": name, "message": message or name})


@dataclass
class Hit:
    """One request: `status` is None for a reset, or while it is being answered."""

    endpoint: str
    did: str | None
    query: dict[str, str]
    arrived: float  # time.monotonic()
    status: int | None = None
    answered: float | None = None  # time.monotonic() once the answer is ready


@dataclass(frozen=True)
class _Fault:
    answer: int | str  # a status, or RESET
    retry_after: float | None


class FakeServer:
    """A loopback HTTP/1.1 server in its own thread; subclasses answer in `route`.

    `endpoint` of a request is the XRPC method for `/xrpc/NSID` (its `did` from the query), else
    `DID_DOC` with the DID taken from the path (`/did:plc:...`, percent-decoded).
    """

    def __init__(self) -> None:
        self.delay = 0.0  # seconds before each answer, to make concurrency visible
        self.keep_alive = True  # False: `Connection: close` on every answer
        self.hits: list[Hit] = []
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: dict[tuple[str, str | None], deque[_Fault]] = {}
        self._faults_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def route(self, endpoint: str, did: str | None, query: Mapping[str, str]) -> Response:
        raise NotImplementedError

    # -- faults and bookkeeping ----------------------------------------------------------------

    def fail(
        self,
        did: str | None,
        answers: Iterable[int | str],
        *,
        endpoint: str = GET_REPO,
        retry_after: float | None = None,
    ) -> None:
        """Queue failures for `(endpoint, did)`, served in order before the real answers: a
        status (JSON error body; with `Retry-After: retry_after` if given) or `RESET`."""
        with self._faults_lock:
            queue = self._faults.setdefault((endpoint, did), deque())
            queue.extend(_Fault(answer, retry_after) for answer in answers)

    def pending_faults(self, did: str | None, endpoint: str = GET_REPO) -> int:
        with self._faults_lock:
            return len(self._faults.get((endpoint, did), ()))

    def count(self, endpoint: str, did: str | None = None) -> int:
        """Requests received for `endpoint` (and `did`, if given), answered or not."""
        return len(self.arrivals(endpoint, did))

    def arrivals(self, endpoint: str, did: str | None = None) -> list[float]:
        """When the requests for `endpoint` (and `did`) arrived, by `time.monotonic()`."""
        hits = list(self.hits)
        return [h.arrived for h in hits if h.endpoint == endpoint and did in (None, h.did)]

    def reset_stats(self) -> None:
        self.hits = []
        self.connections = 0
        self.max_in_flight = self.in_flight

    def _next_fault(self, endpoint: str, did: str | None) -> _Fault | None:
        with self._faults_lock:
            queue = self._faults.get((endpoint, did))
            return queue.popleft() if queue else None

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on a free port, in a new thread with its own event loop."""
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"{type(self).__name__}", daemon=True
        )
        self._thread.start()
        self._call(self._listen())

    def stop(self) -> None:
        """Close the listener and every open connection, then the loop and its thread. A later
        `start()` listens on the same port again: a PDS coming back after an outage."""
        if self._loop is None or self._thread is None:
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = None

    def _call(self, coroutine: Any) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> FakeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeServer:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    # -- HTTP/1.1 ------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away mid-request: nothing to answer
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request and answer it; whether the connection stays open for another."""
        request_line = await reader.readline()
        if not request_line.strip():
            return False
        headers = {}
        while (line := await reader.readline()).strip():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if length := int(headers.get("content-length") or 0):
            await reader.readexactly(length)
        try:
            method, target, version = request_line.decode("latin-1").split()
        except ValueError:
            await self._write(writer, error_response(400, message="bad request line"), False)
            return False
        connection = headers.get("connection", "").lower()
        keep_alive = self.keep_alive and (
            connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"
        )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = await self._answer(method, target)
            if response is None:  # a scripted reset
                writer.transport.abort()
                return False
            await self._write(writer, response, keep_alive)
        finally:
            self.in_flight -= 1
        return keep_alive

    async def _answer(self, method: str, target: str) -> Response | None:
        url = urlsplit(target)
        query = dict(parse_qsl(url.query))
        if url.path.startswith("/xrpc/"):
            endpoint, did = url.path.removeprefix("/xrpc/"), query.get("did")
        else:
            endpoint, did = DID_DOC, unquote(url.path.lstrip("/")) or None
        hit = Hit(endpoint, did, query, time.monotonic())
        self.hits.append(hit)
        if self.delay:
            await asyncio.sleep(self.delay)
        fault = self._next_fault(endpoint, did)
        if method != "GET":
            response: Response | None = error_response(405, "MethodNotAllowed")
        elif fault is None:
            response = self.route(endpoint, did, query)
        elif fault.answer == RESET:
            response = None
        else:
            response = error_response(int(fault.answer), message="scripted failure")
            if fault.retry_after is not None:
                response.headers["Retry-After"] = f"{fault.retry_after:g}"
        hit.status = response.status if response else None
        hit.answered = time.monotonic()
        return response

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, response: Response, keep_alive: bool) -> None:
        reason = _REASONS.get(response.status, "Status")
        head = [
            f"HTTP/1.1 {response.status} {reason}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
            *(f"{name}: {value}" for name, value in response.headers.items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
        await writer.drain()


# --- the servers ------------------------------------------------------------------------------


class FakePlc(FakeServer):
    """A PLC directory: `GET /{did}` is the DID document naming the account's PDS; 404 else."""

    def __init__(self) -> None:
        super().__init__()
        self.accounts: dict[str, tuple[str, FakeServer]] = {}  # did: (handle, its PDS)

    def register(self, did: str, handle: str, pds: FakeServer) -> None:
        """Name `pds` as the account's PDS (again, to move the account)."""
        self.accounts[did] = (handle, pds)

    def route(self, endpoint: str, did: str | None, query: Mapping[str, str]) -> Response:
        account = self.accounts.get(did or "") if endpoint == DID_DOC else None
        if account is None:
            return json_response(404, {"message": f"DID not registered: {did}"})
        handle, pds = account
        service = {
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": pds.url,
        }
        return json_response(
            200, {"id": did, "alsoKnownAs": [f"at://{handle}"], "service": [service]}
        )


class FakePds(FakeServer):
    """A PDS hosting `repos`: getRepo (the whole repo; `since` is ignored), getLatestCommit and
    listRepos (`limit` 1-1000, default 500; the cursor is the last DID of the page)."""

    def __init__(self, repos: Iterable[FakeRepo] = ()) -> None:
        super().__init__()
        self.repos: dict[str, FakeRepo] = {repo.did: repo for repo in repos}
        self.cursor_on_last_page = False  # True: a full last page still names a cursor

    def add(self, repo: FakeRepo) -> None:
        self.repos[repo.did] = repo

    @property
    def web_did(self) -> str:
        """The did:web this server's `/.well-known/did.json` is the document of."""
        return "did:web:" + self.url.removeprefix("http://").replace(":", "%3A")

    def route(self, endpoint: str, did: str | None, query: Mapping[str, str]) -> Response:
        if endpoint == LIST_REPOS:
            return self._list_repos(query)
        if endpoint == DID_DOC and did == ".well-known/did.json":
            if self.web_did not in self.repos:
                return error_response(404, message="no did:web account here")
            service = {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                       "serviceEndpoint": self.url}  # fmt: skip
            return json_response(200, {"id": self.web_did, "service": [service]})
        if endpoint not in (GET_REPO, LATEST_COMMIT):
            return error_response(404, "MethodNotImplemented", f"no method {endpoint}")
        if not did:
            return error_response(400, message="did is required")
        repo = self.repos.get(did)
        if repo is None:
            return error_response(400, "RepoNotFound", f"Could not find repo for DID: {did}")
        if repo.status is not None:
            name = "Repo" + repo.status.capitalize()
            return error_response(400, name, f"Repo is {repo.status}: {did}")
        snapshot = repo.snapshot()
        if endpoint == LATEST_COMMIT:
            return json_response(200, {"cid": snapshot.commit, "rev": snapshot.rev})
        return Response(200, snapshot.car, "application/vnd.ipld.car")

    def _list_repos(self, query: Mapping[str, str]) -> Response:
        try:
            limit = int(query.get("limit", "500"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            return error_response(400, message="limit must be an integer from 1 to 1000")
        cursor = query.get("cursor", "")
        dids = sorted(did for did in self.repos if did > cursor)
        page = [self.repos[did] for did in dids[:limit]]
        body: dict[str, Any] = {"repos": [self._listed(repo) for repo in page]}
        if len(dids) > limit or (self.cursor_on_last_page and len(page) == limit):
            body["cursor"] = page[-1].did
        return json_response(200, body)

    @staticmethod
    def _listed(repo: FakeRepo) -> dict[str, Any]:
        snapshot = repo.snapshot()
        entry = {"did": repo.did, "head": snapshot.commit, "rev": snapshot.rev, "active": True}
        if repo.status is not None:
            entry |= {"active": False, "status": repo.status}
        return entry


class FakeRelay(FakePds):
    """A relay: the same sync methods as a PDS, over every repo of the network."""


class FakeNetwork:
    """A PLC directory, PDSes and a relay over one set of repos; start and stop them together."""

    def __init__(self, n_pdses: int = 1) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.plc = FakePlc()
        self.pdses = [FakePds() for _ in range(n_pdses)]
        self.relay = FakeRelay()

    @property
    def servers(self) -> list[FakeServer]:
        return [self.plc, *self.pdses, self.relay]

    def add(self, repo: FakeRepo, pds: int = 0) -> FakeRepo:
        """Host `repo` on PDS number `pds`, list it at the relay and register it at the PLC."""
        self.repos[repo.did] = repo
        self.pdses[pds].add(repo)
        self.relay.add(repo)
        self.plc.register(repo.did, repo.handle, self.pdses[pds])
        return repo

    def pds_of(self, did: str) -> FakePds:
        return next(pds for pds in self.pdses if did in pds.repos)

    def expected(self) -> dict[str, dict[str, str]]:
        """`{did: {at-uri: record CID}}` over every repo."""
        return {did: repo.expected() for did, repo in self.repos.items()}

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> FakeNetwork:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeNetwork:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


def make_network(
    n_repos: int,
    records_per_repo: int,
    n_pdses: int = 1,
    seed: int = 1,
    *,
    start_us: int = DEFAULT_START_TIME_US,
) -> FakeNetwork:
    """A network (not started) of `make_repos` repos spread over `n_pdses` PDSes in turn."""
    network = FakeNetwork(n_pdses)
    for i, repo in enumerate(make_repos(n_repos, records_per_repo, seed, start_us=start_us)):
        network.add(repo, i % n_pdses)
    return network
