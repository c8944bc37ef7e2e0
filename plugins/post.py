"""app.bsky.feed.post: `post`, `feed_item`, `quote`, the embed tables; postsCount, replyCount and
quoteCount; `invalidReplyRoot` and the gate flags (see `plugins/_post_flags.py`)."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.aggregates import Deltas
from indexer.constants import MAX_TEXT_CHARS
from indexer.db import Connection, rows_json
from indexer.events import StrongRef
from indexer.normalize import clean_text, normalize_datetime
from indexer.plugin import Kind, Op, bulk_insert, sort_at
from plugins import _embeds as embeds
from plugins import _feed_item as feed_item
from plugins import _post_flags as post_flags
from plugins._embeds import at_uri_collection, embedded_record


class ReplyRef(msgspec.Struct):
    root: StrongRef
    parent: StrongRef


class PostRecord(msgspec.Struct):
    text: str = ""
    createdAt: Any = None
    reply: ReplyRef | None = None
    embed: dict[str, Any] | None = None
    langs: list[str] | None = None
    tags: list[str] | None = None


POST = "app.bsky.feed.post"
_decoder = msgspec.json.Decoder(PostRecord)
_json = msgspec.json.Encoder()
_POST_COLS = (
    "uri",
    "cid",
    "creator",
    "text",
    "replyRoot",
    "replyRootCid",
    "replyParent",
    "replyParentCid",
    "createdAt",
    "indexedAt",
    "langs",
    "tags",
)
_QUOTE_COLS = ("uri", "cid", "subject", "subjectCid", "createdAt", "indexedAt")
_EMBEDS_PARAM = 3  # $3 to $6: the embed tables' rows
_OF_NEW_POST = "r->>0 IN (SELECT uri FROM p)"  # a row of a post this statement inserted
# A batch's posts and, for those actually inserted, their feed items, embeds and quotes, in
# one round trip. Every row of $2 to $7 starts with its post's uri. The recheck of the flags
# is not part of it: an UPDATE cannot see rows its own statement inserted.
_INSERT = (
    "WITH p AS ("
    + bulk_insert("post", _POST_COLS, ("varchar",) * 10 + ("jsonb", "jsonb"),
                  "ON CONFLICT (uri) DO NOTHING RETURNING uri")
    + "), f AS ("
    + feed_item.insert_sql(param=2, where=_OF_NEW_POST)
    + f"), {embeds.insert_ctes(_EMBEDS_PARAM, _OF_NEW_POST)}, q AS ("
    + bulk_insert("quote", _QUOTE_COLS, ("varchar",) * 6,
                  "ON CONFLICT (uri) DO NOTHING RETURNING subject",
                  param=_EMBEDS_PARAM + len(embeds.TABLES), where=_OF_NEW_POST)
    + ") SELECT uri, NULL AS quoted FROM p UNION ALL SELECT NULL, subject FROM q"
)  # fmt: skip
# The posts ($1) with their quotes, feed items and embeds, in one round trip: all are rows of
# these uris, under the locks the batch already holds, so one snapshot sees them all.
_DELETE = (
    "WITH p AS (DELETE FROM post WHERE uri = ANY($1::varchar[]) "
    'RETURNING uri, creator, "replyParent"), '
    "q AS (DELETE FROM quote WHERE uri = ANY($1::varchar[]) RETURNING subject), "
    "f AS (DELETE FROM feed_item WHERE uri = ANY($1::varchar[])), "
    f"{embeds.DELETE_CTES} "
    'SELECT uri, creator, "replyParent", NULL AS quoted FROM p '
    "UNION ALL SELECT NULL, NULL, NULL, subject FROM q"
)


def quoted(embed: dict[str, Any] | None) -> StrongRef | None:
    """The post a record or record-with-media embed quotes, if any."""
    ref = embedded_record(embed)
    return ref if ref is not None and at_uri_collection(ref.uri) == POST else None


def _strings(values: list[str] | None) -> str | None:
    return None if values is None else _json.encode([clean_text(v) for v in values]).decode()


def _row(op: Op) -> tuple[Any, ...]:
    rec: PostRecord = op.record
    root = rec.reply.root if rec.reply else None
    parent = rec.reply.parent if rec.reply else None
    return (
        op.uri,
        op.cid,
        op.did,
        clean_text(rec.text, MAX_TEXT_CHARS),
        clean_text(root.uri) if root else None,
        clean_text(root.cid) if root else None,
        clean_text(parent.uri) if parent else None,
        clean_text(parent.cid) if parent else None,
        normalize_datetime(rec.createdAt),
        op.indexed_at,
        _strings(rec.langs),
        _strings(rec.tags),
    )


class PostPlugin:
    """Its calls expect the locks of `locks` taken (see `plugins/_post_flags.py`)."""

    collection = POST

    def decode(self, raw: bytes) -> PostRecord:
        return _decoder.decode(raw)

    def accepts(self, rkey: str) -> bool:
        return True

    def locks(self, op: Op, kind: Kind) -> list[tuple[str, bool]]:
        """The post itself, exclusive; the parent of a reply written, shared."""
        reply = op.record.reply if kind != "delete" else None
        parent = [(clean_text(reply.parent.uri), False)] if reply else []
        return [(op.uri, True), *parent]

    async def update(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await self.delete(conn, ops, deltas)
        await self.insert(conn, ops, deltas)

    async def insert(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        by_uri = {op.uri: op for op in ops}
        rows = {uri: _row(op) for uri, op in by_uri.items()}
        items, quotes = [], []
        rich = embeds.EmbedRows()
        for row in rows.values():
            uri, cid, creator, created, indexed = row[0], row[1], row[2], row[8], row[9]
            items.append((uri, cid, "post", uri, creator, sort_at(created, indexed)))
            subject = quoted(by_uri[uri].record.embed)
            if subject is not None:
                quotes.append((uri, cid, subject.uri, subject.cid, created, indexed))
            rich.add(uri, by_uri[uri].record.embed)
        params = [
            rows_json(list(rows.values())),
            rows_json(items),
            *rich.params(),
            rows_json(quotes),
        ]
        inserted = []
        for rec in await conn.fetch(_INSERT, *params):
            if rec["uri"] is None:
                deltas.post(rec["quoted"], "quoteCount", 1)
                continue
            row = rows[rec["uri"]]
            deltas.profile(row[2], "postsCount", 1)
            if row[6]:  # replyParent
                deltas.post(row[6], "replyCount", 1)
            inserted.append(rec["uri"])
        await post_flags.posts_added(conn, inserted)

    async def delete(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        removed = []
        for rec in await conn.fetch(_DELETE, [op.uri for op in ops]):
            if rec["uri"] is None:
                deltas.post(rec["quoted"], "quoteCount", -1)
                continue
            deltas.profile(rec["creator"], "postsCount", -1)
            if rec["replyParent"]:
                deltas.post(rec["replyParent"], "replyCount", -1)
            removed.append(rec["uri"])
        await post_flags.posts_removed(conn, removed)
