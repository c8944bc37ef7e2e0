"""What a network source gives the ingester: frames of envelopes, each with its position.

A source (Jetstream, the relay) knows its URLs and its wire format; `indexer.ingester` knows
connecting, queueing, writing, cursors and backpressure, and nothing of any format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class Frame:
    """What one message from a source comes to."""

    cursor: int | None = None  # the source position after this message; None if it has none
    event_time_s: float | None = None  # the event time, for the cursor lag
    envelopes: list[tuple[str, bytes]] = field(default_factory=list)  # (type, envelope JSON)
    skipped: tuple[str, ...] = ()  # a reason for each event not added (filtered, unknown, ...)
    host: str = ""  # set by the reader

    @property
    def size(self) -> int:
        """Bytes of its envelopes: what it holds in memory while queued, roughly."""
        return sum(len(raw) for _, raw in self.envelopes)


class BadFrame(ValueError):
    """A message that cannot be decoded: counted, logged and skipped."""


class SourceError(Exception):
    """The server reported an error in the stream (a relay error frame): counted and logged."""


class Source(Protocol):
    """A network source: where to connect and how to turn its messages into frames."""

    name: str
    urls: tuple[str, ...]
    max_message_bytes: int

    def subscribe_url(self, url: str, cursor: int | None) -> str:
        """The URL to connect to for resuming after `cursor` (None: live)."""
        ...

    def decode(self, message: bytes) -> Frame:
        """One message as a frame; raises BadFrame or SourceError."""
        ...


class Allowlist:
    """Collections that may be added: exact NSIDs and `prefix.*` patterns."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._exact = frozenset(p for p in patterns if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))
        self._known: dict[str, bool] = {}

    def __call__(self, collection: str) -> bool:
        allowed = self._known.get(collection)
        if allowed is None:
            allowed = collection in self._exact or collection.startswith(self._prefixes)
            if len(self._known) < 10_000:  # collections are few; a flood of names stays bounded
                self._known[collection] = allowed
        return allowed
