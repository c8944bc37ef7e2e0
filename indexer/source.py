"""What a network source gives the ingester: frames of envelopes, each with its position.

A source (Jetstream, the relay) knows its URLs, its wire format and what its cursors mean;
`indexer.ingester` knows connecting, queueing, writing, saving positions and backpressure, and
nothing of any format.

A position has up to two coordinates. `seq` is a host's own sequence (the relay's `seq`, a
Jetstream v2 `cursor`): exact, but meaningless on another host. `time_us` is a Jetstream event
time: every instance stamps its own, close to the others', so any host can resume from it (a few
seconds early). Positions are compared like with like: seq with seq of the same host, else time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit


class Position(NamedTuple):
    """Where a host's stream was read to: its sequence, its event time, or both."""

    host: str
    seq: int | None = None  # the host's own sequence: resumes exactly, on this host only
    time_us: int | None = None  # the event time (Jetstream): resumes on any host, rewound

    @property
    def cursor(self) -> int:
        """The value the host itself resumes from: its sequence if it has one, else the time."""
        value = self.seq if self.seq is not None else self.time_us
        assert value is not None  # a position has one coordinate at least
        return value

    def repeats(self, last: Position | None) -> bool:
        """Whether this position is at or before `last`, both read from the same host."""
        if last is None or last.host != self.host:
            return False  # another host numbers and stamps its stream differently
        if self.seq is not None and last.seq is not None:
            return self.seq <= last.seq
        if self.time_us is not None and last.time_us is not None:
            return self.time_us <= last.time_us
        return False

    def saved_value(self) -> str:
        """How it is saved in Redis: the bare cursor, or `seq@time_us` when it has both."""
        if self.seq is not None and self.time_us is not None:
            return f"{self.seq}@{self.time_us}"
        return str(self.cursor)


@dataclass(slots=True)
class Frame:
    """What one message from a source comes to."""

    seq: int | None = None  # the host's sequence after this message, if it numbers them
    time_us: int | None = None  # the event time in microseconds, if a host can resume from it
    event_time_s: float | None = None  # the event time, for the cursor lag
    envelopes: list[tuple[str, bytes]] = field(default_factory=list)  # (type, envelope JSON)
    skipped: tuple[str, ...] = ()  # a reason for each event not added (filtered, unknown, ...)
    position: Position | None = None  # set by the reader, which knows the host

    @property
    def size(self) -> int:
        """Bytes of its envelopes: what it holds in memory while queued, roughly."""
        return sum(len(raw) for _, raw in self.envelopes)


class BadFrame(ValueError):
    """A message that cannot be decoded: counted, logged and skipped."""


class TooBig(BadFrame):
    """A message over the source's size limit: counted, logged and skipped."""


class SourceError(Exception):
    """The server reported an error in the stream (a relay error frame): counted and logged."""


class CursorAhead(SourceError):
    """The server has nothing after our cursor: its sequence was reset below it."""


class Source(Protocol):
    """A network source: where to connect and how to turn its messages into frames."""

    name: str
    urls: tuple[str, ...]
    max_message_bytes: int

    def subscribe_url(self, url: str, cursor: int | None) -> str:
        """The URL to connect to for resuming after `cursor`, taken as given (None: live)."""
        ...

    def resume_cursor(self, url: str, position: Position) -> int | None:
        """The cursor to give `url` to resume after `position` (None: live)."""
        ...

    def saved_position(self, host: str, value: str) -> Position:
        """A position saved under `host` by `Position.saved_value` (or an older version)."""
        ...

    def decode(self, message: bytes) -> Frame:
        """One message as a frame; raises BadFrame or SourceError."""
        ...


def host_of(url: str) -> str:
    """The host (and port) of a URL: the name its position is saved under."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or url


def split_saved(value: str) -> tuple[int, int | None]:
    """A saved value as (cursor, time_us): `seq@time_us`, or a bare cursor and None."""
    cursor, _, time_us = value.partition("@")
    return int(cursor), int(time_us) if time_us else None


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
