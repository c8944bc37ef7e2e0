"""A post's embeds: `post_embed_image`, `_video`, `_external` and `_record`.

A record-with-media embed writes both its record and its media. Embeds are open unions that
clients extend, so they are read leniently from the decoded JSON: a part of an unexpected shape
(an embedded record whose uri is no `at://` record uri, an image without a blob) is left out,
never a reason to refuse the post.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from indexer.constants import MAX_CID_CHARS, MAX_TEXT_CHARS
from indexer.db import rows_json
from indexer.events import StrongRef
from indexer.normalize import clean_optional, clean_text
from indexer.plugin import bulk_insert
from plugins.profile import blob_cid

IMAGES: Final = "app.bsky.embed.images"
VIDEO: Final = "app.bsky.embed.video"
EXTERNAL: Final = "app.bsky.embed.external"
RECORD: Final = "app.bsky.embed.record"
RECORD_WITH_MEDIA: Final = "app.bsky.embed.recordWithMedia"
MAX_IMAGES: Final = 16  # the lexicon allows 4; more is junk, but bounded junk is harmless

_TABLES: Final = {
    "post_embed_image": ("postUri", "position", "imageCid", "alt"),
    "post_embed_video": ("postUri", "videoCid", "alt"),
    "post_embed_external": ("postUri", "uri", "title", "description", "thumbCid"),
    "post_embed_record": ("postUri", "embedUri", "embedCid"),
}
TABLES: Final = tuple(_TABLES)


def insert_ctes(first_param: int, where: str) -> str:
    """`e0 AS (INSERT INTO post_embed_image ...), ...`: one CTE per table, in TABLES order, its
    rows the parameter `$first_param + n`, each row kept where `where` holds."""
    return ", ".join(
        f"e{n} AS ("
        + bulk_insert(
            table,
            cols,
            ("varchar",) * len(cols),
            "ON CONFLICT DO NOTHING",
            param=first_param + n,
            where=where,
        )
        + ")"
        for n, (table, cols) in enumerate(_TABLES.items())
    )


# The four tables' rows of some posts ($1): data-modifying CTEs always run, referenced or not.
DELETE_CTES: Final = ", ".join(
    f'd{n} AS (DELETE FROM {table} WHERE "postUri" = ANY($1::varchar[]))'
    for n, table in enumerate(_TABLES)
)


@dataclass(slots=True)
class EmbedRows:
    """Rows per embed table, for a batch of posts."""

    rows: dict[str, list[tuple[Any, ...]]] = field(
        default_factory=lambda: {table: [] for table in _TABLES}
    )

    def add(self, post_uri: str, embed: object) -> None:
        """The rows of one post's embed (a record with media gives a record and a media)."""
        if not isinstance(embed, dict):
            return
        kind = embed.get("$type")
        ref = embedded_record(embed)
        if ref is not None:
            self.rows["post_embed_record"].append((post_uri, ref.uri, ref.cid))
        if kind == RECORD_WITH_MEDIA:
            media = embed.get("media")
            if isinstance(media, dict) and media.get("$type") not in (RECORD, RECORD_WITH_MEDIA):
                self.add(post_uri, media)
        elif kind == IMAGES:
            self._images(post_uri, embed.get("images"))
        elif kind == VIDEO:
            self._video(post_uri, embed)
        elif kind == EXTERNAL:
            self._external(post_uri, embed.get("external"))

    def _images(self, post_uri: str, images: object) -> None:
        if not isinstance(images, list):
            return
        for position, image in enumerate(images[:MAX_IMAGES]):
            cid = _blob(image.get("image")) if isinstance(image, dict) else None
            if cid is None:
                continue
            alt = clean_text(image.get("alt"), MAX_TEXT_CHARS)
            self.rows["post_embed_image"].append((post_uri, str(position), cid, alt))

    def _video(self, post_uri: str, embed: dict[str, Any]) -> None:
        cid = _blob(embed.get("video"))
        if cid is not None:
            alt = embed.get("alt")
            alt_text = clean_optional(alt, MAX_TEXT_CHARS) if isinstance(alt, str) else None
            self.rows["post_embed_video"].append((post_uri, cid, alt_text))

    def _external(self, post_uri: str, external: object) -> None:
        if not isinstance(external, dict) or not isinstance(external.get("uri"), str):
            return
        self.rows["post_embed_external"].append((
            post_uri, clean_text(external["uri"]), clean_text(external.get("title")),
            clean_text(external.get("description"), MAX_TEXT_CHARS),
            _blob(external.get("thumb")),
        ))  # fmt: skip

    def params(self) -> list[bytes]:
        """The rows of each table (TABLES order), as `insert_ctes` takes them."""
        return [rows_json(self.rows[table]) for table in TABLES]


def at_uri_collection(uri: str) -> str | None:
    """The collection of `at://AUTHORITY/COLLECTION/RKEY`, or None when `uri` is no such uri."""
    if not uri.startswith("at://"):
        return None
    parts = uri[5:].split("/")
    return parts[1] if len(parts) == 3 and all(parts) else None


def embedded_record(embed: object) -> StrongRef | None:
    """The record a record or record-with-media embed points at, when its uri is a record's."""
    if not isinstance(embed, dict):
        return None
    kind = embed.get("$type")
    if kind == RECORD_WITH_MEDIA:
        embed = embed.get("record")
    elif kind != RECORD:
        return None
    ref = embed.get("record") if isinstance(embed, dict) else None
    if not isinstance(ref, dict) or not isinstance(ref.get("uri"), str):
        return None
    uri = clean_text(ref["uri"])
    if at_uri_collection(uri) is None:
        return None
    return StrongRef(uri, clean_text(ref.get("cid"), MAX_CID_CHARS))


def _blob(value: object) -> str | None:
    return blob_cid(value) if isinstance(value, dict) else None
