"""HTTP for backfill: DID documents and the sync XRPC calls, bounded per host and retried.

Every request holds a slot of its host (`BACKFILL_PER_HOST`), so one PDS never sees more than
that many of our requests at once, whatever the total. A 429 or a 5xx answer and a network
error are retried after the server's `Retry-After` (or `RateLimit-Reset`) when it gives one,
else after an exponential backoff with jitter, `BACKFILL_ATTEMPTS` times in all; the slot is
released while waiting. An answer that will not change (the repo is not found, taken down,
deactivated; the DID has no PDS) is not retried.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx
import msgspec

from indexer.config import Settings
from indexer.constants import BACKFILL_BACKOFF_MAX_S, BACKFILL_MAX_REPO_BYTES

log = logging.getLogger(__name__)

_RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class Unavailable(Exception):
    """The repo cannot be fetched now, and retrying will not help (the message says why)."""


class GaveUp(Exception):
    """Every attempt failed with an answer worth retrying; the message is the last one."""


class _Service(msgspec.Struct):
    id: str
    type: str = ""
    serviceEndpoint: str | dict[str, Any] = ""


class _DidDocument(msgspec.Struct):
    id: str = ""
    service: list[_Service] = []


class ListedRepo(msgspec.Struct):
    """One repo of a `listRepos` page."""

    did: str
    rev: str = ""
    head: str = ""
    active: bool = True
    status: str | None = None


class _RepoPage(msgspec.Struct):
    repos: list[ListedRepo] = []
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    repos: list[ListedRepo]
    cursor: str | None


class Xrpc:
    """The HTTP client of one backfill: per-host slots, retries, bounded bodies."""

    def __init__(self, settings: Settings, on_retry: Callable[[str], None]) -> None:
        self._settings = settings
        self._on_retry = on_retry
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.backfill_timeout_s, connect=10.0),
            follow_redirects=True,
            headers={"user-agent": "firehose-indexer backfill"},
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def pds_of(self, did: str) -> str:
        """The PDS endpoint named by a DID's document (did:plc through PLC_URL, or did:web)."""
        url = _did_document_url(did, self._settings.plc_url)
        body = await self._get(url, {}, f"the DID document of {did}")
        try:
            document = msgspec.json.decode(body, type=_DidDocument)
        except msgspec.DecodeError as exc:
            raise Unavailable(f"the DID document of {did} is invalid: {exc}") from None
        for service in document.service:
            endpoint = service.serviceEndpoint
            if service.id in ("#atproto_pds", f"{did}#atproto_pds") and isinstance(endpoint, str):
                return endpoint.rstrip("/")
        raise Unavailable(f"the DID document of {did} names no #atproto_pds service")

    async def get_repo(self, base: str, did: str) -> bytes:
        """The whole repo of a DID as a CAR file."""
        url = f"{base}/xrpc/com.atproto.sync.getRepo"
        return await self._get(url, {"did": did}, f"the repo of {did}")

    async def list_repos(self, base: str, cursor: str | None, limit: int) -> Page:
        """One page of `com.atproto.sync.listRepos`."""
        params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        body = await self._get(f"{base}/xrpc/com.atproto.sync.listRepos", params, "listRepos")
        try:
            page = msgspec.json.decode(body, type=_RepoPage)
        except msgspec.DecodeError as exc:
            raise GaveUp(f"listRepos answered an invalid page: {exc}") from None
        return Page(page.repos, page.cursor or None)

    async def _get(self, url: str, params: dict[str, str], what: str) -> bytes:
        """The body of a GET, retried as the module says."""
        delay = self._settings.backfill_backoff_s
        attempts = self._settings.backfill_attempts
        for attempt in range(1, attempts + 1):
            try:
                async with self._slot(url):
                    return await self._get_once(url, params, what)
            except _Retry as retry:
                if attempt == attempts:
                    raise GaveUp(f"{what}: {retry.reason} ({attempts} attempts)") from None
                self._on_retry(retry.kind)
                wait = retry.after_s if retry.after_s is not None else delay * random.uniform(1, 2)
                log.info("%s: %s; attempt %d in %.1f s", what, retry.reason, attempt + 1, wait)
                await asyncio.sleep(min(wait, BACKFILL_BACKOFF_MAX_S))
                delay = min(delay * 2, BACKFILL_BACKOFF_MAX_S)
        raise AssertionError("unreachable")

    async def _get_once(self, url: str, params: dict[str, str], what: str) -> bytes:
        try:
            async with self._client.stream("GET", url, params=params) as response:
                if response.status_code in _RETRIED_STATUSES:
                    await response.aread()
                    raise _Retry(_kind(response.status_code), _reason(response), _after(response))
                if response.status_code != 200:
                    await response.aread()
                    raise Unavailable(f"{what}: {_reason(response)}")
                return await _read_bounded(response, what)
        except httpx.UnsupportedProtocol as exc:
            raise Unavailable(f"{what}: {exc}") from None
        except httpx.TransportError as exc:
            raise _Retry("network", f"{type(exc).__name__}: {exc}", None) from None
        except httpx.HTTPError as exc:  # too many redirects, an undecodable body
            raise Unavailable(f"{what}: {type(exc).__name__}: {exc}") from None
        except httpx.InvalidURL as exc:
            raise Unavailable(f"{what}: invalid URL {url!r}: {exc}") from None

    def _slot(self, url: str) -> asyncio.Semaphore:
        host = urlsplit(url).netloc
        if host not in self._slots:
            self._slots[host] = asyncio.Semaphore(self._settings.backfill_per_host)
        return self._slots[host]


class _Retry(Exception):
    def __init__(self, kind: str, reason: str, after_s: float | None) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.after_s = kind, reason, after_s


async def _read_bounded(response: httpx.Response, what: str) -> bytes:
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > BACKFILL_MAX_REPO_BYTES:
            raise Unavailable(f"{what} is over {BACKFILL_MAX_REPO_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _kind(status: int) -> str:
    return "rate_limited" if status == 429 else "server_error"


def _reason(response: httpx.Response) -> str:
    """The status and the XRPC error name and message, when the body has them."""
    detail = ""
    try:
        body = msgspec.json.decode(response.content)
        if isinstance(body, dict):
            detail = f" {body.get('error', '')}: {body.get('message', '')}".rstrip(": ")
    except msgspec.DecodeError:
        pass
    return f"HTTP {response.status_code}{detail}"


def _after(response: httpx.Response) -> float | None:
    """Seconds to wait, from `Retry-After` (seconds or an HTTP date) or `RateLimit-Reset`."""
    value = response.headers.get("retry-after")
    if value is not None:
        if value.strip().isdigit():
            return float(value)
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    reset = response.headers.get("ratelimit-reset")
    if reset is not None and reset.strip().isdigit():
        return max(0.0, float(reset) - time.time())
    return None


def _did_document_url(did: str, plc_url: str) -> str:
    """Where a DID's document is: PLC_URL for did:plc, `/.well-known/did.json` for did:web
    (plain http only for a loopback host, as a test server has no certificate)."""
    if did.startswith("did:plc:"):
        return f"{plc_url.rstrip('/')}/{quote(did)}"
    if did.startswith("did:web:"):
        host = unquote(did.removeprefix("did:web:"))
        if ":" in host.replace("%3A", ":") and not host.startswith(("localhost", "127.0.0.1")):
            raise Unavailable(f"{did}: a did:web with a path or port is not supported")
        scheme = "http" if host.split(":")[0] in ("localhost", "127.0.0.1") else "https"
        return f"{scheme}://{host}/.well-known/did.json"
    raise Unavailable(f"{did}: only did:plc and did:web can be resolved")
