"""app.bsky.graph.list: the `list` table (curation and moderation lists); updates apply."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.normalize import clean_optional, clean_text, normalize_datetime
from indexer.plugin import Op
from plugins._rows import RowPlugin, blob_cid, json_text


class ListRecord(msgspec.Struct):
    name: str
    purpose: str
    description: str | None = None
    descriptionFacets: msgspec.Raw = msgspec.Raw()
    avatar: dict[str, Any] | None = None
    createdAt: Any = None


class ListPlugin(RowPlugin):
    collection = "app.bsky.graph.list"
    table = "list"
    cols = (
        "uri", "cid", "creator", "name", "purpose", "description", "descriptionFacets",
        "avatarCid", "createdAt", "indexedAt",
    )  # fmt: skip
    decode = msgspec.json.Decoder(ListRecord).decode

    def row(self, op: Op) -> tuple[Any, ...]:
        rec: ListRecord = op.record
        return (
            op.uri, op.cid, op.did, clean_text(rec.name), clean_text(rec.purpose),
            clean_optional(rec.description), json_text(rec.descriptionFacets),
            blob_cid(rec.avatar), normalize_datetime(rec.createdAt), op.indexed_at,
        )  # fmt: skip
