"""Jetstream as a source: subscribe URLs, zstd with the shipped dictionary, events to envelopes.

Jetstream v1 messages carry only `time_us`, which is also the cursor a client resumes from; each
instance stamps its own times, so the ingester resumes a few seconds early (the rewind) and the
indexer absorbs the overlap. v2 messages add a top-level `cursor`, a sequence, which is then the
position: v2 cursors are not times, so they resume exactly where they were.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import zstandard

from indexer.config import Settings
from indexer.constants import JETSTREAM_MAX_MESSAGE_BYTES
from indexer.events import UnsupportedEvent, encode, from_jetstream, jetstream_decoder
from indexer.source import Allowlist, BadFrame, Frame

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A v2 sequence stays far below any time_us of this century (2001-09-09 in microseconds), which
# is how a saved cursor tells which of the two it is.
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
        """The URL with `wantedCollections`, `compress` and `cursor` (rewound if a time)."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        query += [("wantedCollections", pattern) for pattern in self._allowed.patterns]
        if self._compress:
            query.append(("compress", "true"))
        if cursor is not None:
            is_time = cursor >= _FIRST_TIME_US
            query.append(("cursor", str(max(0, cursor - self._rewind_us) if is_time else cursor)))
        return urlunsplit(parts._replace(query=urlencode(query)))

    def decode(self, message: bytes) -> Frame:
        """One Jetstream message (JSON, or a zstd frame of it) as a frame of one envelope."""
        if message.startswith(_ZSTD_MAGIC):
            message = self._decompress(message)
        try:
            event = jetstream_decoder.decode(message)
        except msgspec.DecodeError as exc:
            raise BadFrame(f"not a Jetstream event: {exc}") from None
        cursor = event.cursor if event.cursor is not None else event.time_us
        frame = Frame(cursor=cursor, event_time_s=event.time_us / 1_000_000)
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
        """One zstd frame, bounded: a frame that claims or yields too much is bad."""
        try:
            size = zstandard.frame_content_size(message)
            if size > JETSTREAM_MAX_MESSAGE_BYTES:
                raise BadFrame(f"zstd frame of {size} bytes is over the limit")
            return self._decompressor.decompress(
                message, max_output_size=JETSTREAM_MAX_MESSAGE_BYTES
            )
        except zstandard.ZstdError as exc:
            raise BadFrame(f"bad zstd frame: {exc}") from None
