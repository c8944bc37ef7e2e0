"""Jetstream as a source: subscribe URLs, zstd with the shipped dictionary, events to envelopes.

Jetstream v1 messages carry only `time_us`, which is also the cursor a client resumes from; each
instance stamps its own times, so the ingester resumes a few seconds early (the rewind) and the
indexer absorbs the overlap. v2 messages add a top-level `cursor`, a sequence of that instance:
it resumes exactly where it was on the same instance, and means nothing on another one, which is
then given the event time, rewound, as with v1. A saved position keeps both (`seq@time_us`).
"""

from __future__ import annotations

import logging
import time
from functools import cache
from importlib import resources
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import zstandard

from indexer.config import Settings
from indexer.constants import JETSTREAM_MAX_AHEAD_S, JETSTREAM_MAX_MESSAGE_BYTES
from indexer.events import UnsupportedEvent, encode, from_jetstream, jetstream_decoder
from indexer.source import (
    Allowlist,
    BadFrame,
    Frame,
    Position,
    TooBig,
    host_of,
    split_saved,
)

log = logging.getLogger(__name__)

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A v2 sequence stays far below any time_us of this century (2001-09-09 in microseconds), which
# is how a bare saved cursor (saved before positions kept both) tells which of the two it is.
_FIRST_TIME_US = 1_000_000_000_000_000


@cache
def zstd_dictionary() -> zstandard.ZstdCompressionDict:
    """The dictionary Jetstream compresses with, shipped in the package."""
    data = resources.files("indexer").joinpath("data/zstd_dictionary").read_bytes()
    return zstandard.ZstdCompressionDict(data)


class JetstreamSource:
    """Jetstream's `/subscribe` endpoint(s), filtered by the collection allowlist."""

    name = "jetstream"
    max_message_bytes = JETSTREAM_MAX_MESSAGE_BYTES

    def __init__(self, settings: Settings) -> None:
        self.urls = settings.jetstream_urls
        self._allowed = Allowlist(settings.ingester_collections)
        self._compress = settings.jetstream_compress
        self._rewind_us = int(settings.jetstream_rewind_s * 1_000_000)
        self._decompressor = zstandard.ZstdDecompressor(dict_data=zstd_dictionary())

    def subscribe_url(self, url: str, cursor: int | None) -> str:
        """The URL with `wantedCollections`, `compress` and `cursor`."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        query += [("wantedCollections", pattern) for pattern in self._allowed.patterns]
        if self._compress:
            query.append(("compress", "true"))
        if cursor is not None:
            query.append(("cursor", str(cursor)))
        return urlunsplit(parts._replace(query=urlencode(query)))

    def resume_cursor(self, url: str, position: Position) -> int | None:
        """The v2 sequence on its own host; anywhere else the event time, rewound."""
        if position.seq is not None and position.host == host_of(url):
            return position.seq
        if position.time_us is not None:
            return max(0, position.time_us - self._rewind_us)
        log.warning(
            "the saved v2 cursor %d of %s has no event time to resume %s from: reading live",
            position.seq, position.host, host_of(url),
        )  # fmt: skip
        return None

    def saved_position(self, host: str, value: str) -> Position:
        """`seq@time_us`; a bare time_us (v1); a bare sequence (v2, saved by older versions)."""
        cursor, time_us = split_saved(value)
        if time_us is not None:
            return Position(host, seq=cursor, time_us=time_us)
        if cursor >= _FIRST_TIME_US:
            return Position(host, time_us=cursor)
        return Position(host, seq=cursor)

    def decode(self, message: bytes) -> Frame:
        """One Jetstream message (JSON, or a zstd frame of it) as a frame of one envelope."""
        if message.startswith(_ZSTD_MAGIC):
            message = self._decompress(message)
        try:
            event = jetstream_decoder.decode(message)
        except msgspec.DecodeError as exc:
            raise BadFrame(f"not a Jetstream event: {exc}") from None
        _check_time(event.time_us)
        frame = Frame(
            seq=event.cursor, time_us=event.time_us, event_time_s=event.time_us / 1_000_000
        )
        if event.commit is not None and not self._allowed(event.commit.collection):
            frame.skipped = ("filtered",)
            return frame
        try:
            envelope = from_jetstream(event)
        except UnsupportedEvent:
            frame.skipped = ("unknown",)
            return frame
        frame.envelopes.append((str(envelope.__struct_config__.tag), encode(envelope)))
        return frame

    def _decompress(self, message: bytes) -> bytes:
        """One zstd frame, bounded: a frame that claims or yields too much is skipped."""
        try:
            size = zstandard.frame_content_size(message)
            if size > JETSTREAM_MAX_MESSAGE_BYTES:
                raise TooBig(f"zstd frame of {size} bytes is over the limit")
            return self._decompressor.decompress(
                message, max_output_size=JETSTREAM_MAX_MESSAGE_BYTES
            )
        except zstandard.ZstdError as exc:
            raise BadFrame(f"bad zstd frame: {exc}") from None


def _check_time(time_us: int) -> None:
    """A time_us before Jetstream's century or ahead of our clock is bad, never a position."""
    latest_us = (time.time() + JETSTREAM_MAX_AHEAD_S) * 1_000_000
    if not _FIRST_TIME_US <= time_us <= latest_us:
        raise BadFrame(f"time_us {time_us} is out of range (before 2001 or ahead of our clock)")
