"""app.bsky.feed.generator: the `feed_generator` table (custom feeds); updates apply."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.normalize import clean_optional, clean_text, normalize_datetime
from indexer.plugin import Op
from plugins._rows import RowPlugin, blob_cid, json_text


class GeneratorRecord(msgspec.Struct):
    did: str
    displayName: str | None = None
    description: str | None = None
    descriptionFacets: msgspec.Raw = msgspec.Raw()
    avatar: dict[str, Any] | None = None
    createdAt: Any = None


class FeedGeneratorPlugin(RowPlugin):
    collection = "app.bsky.feed.generator"
    table = "feed_generator"
    cols = (
        "uri", "cid", "creator", "feedDid", "displayName", "description", "descriptionFacets",
        "avatarCid", "createdAt", "indexedAt",
    )  # fmt: skip
    decode = msgspec.json.Decoder(GeneratorRecord).decode

    def row(self, op: Op) -> tuple[Any, ...]:
        rec: GeneratorRecord = op.record
        return (
            op.uri, op.cid, op.did, clean_text(rec.did), clean_optional(rec.displayName),
            clean_optional(rec.description), json_text(rec.descriptionFacets),
            blob_cid(rec.avatar), normalize_datetime(rec.createdAt), op.indexed_at,
        )  # fmt: skip
