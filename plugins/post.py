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
from plugins import _feed_item as feed_item
from plugins import _post_flags as post_flags
from plugins._embeds import EmbedRows, at_uri_collection, embedded_record, remove_embeds


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
_INSERT_POST = bulk_insert(
    "post",
    _POST_COLS,
    ("varchar",) * 10 + ("jsonb", "jsonb"),
    "ON CONFLICT (uri) DO NOTHING RETURNING uri",
)
_INSERT_QUOTE = bulk_insert(
    "quote",
    ("uri", "cid", "subject", "subjectCid", "createdAt", "indexedAt"),
    ("varchar",) * 6,
    "ON CONFLICT (uri) DO NOTHING RETURNING subject",
)
_DELETE_POST = (
    'DELETE FROM post WHERE uri = ANY($1::varchar[]) RETURNING uri, creator, "replyParent"'
)
_DELETE_QUOTE = "DELETE FROM quote WHERE uri = ANY($1::varchar[]) RETURNING subject"


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
        inserted = await conn.fetch(_INSERT_POST, rows_json(list(rows.values())))
        quotes, items = [], []
        embeds = EmbedRows()
        for rec in inserted:
            row = rows[rec["uri"]]
            uri, cid, creator, parent, created, indexed = (
                row[0],
                row[1],
                row[2],
                row[6],
                row[8],
                row[9],
            )
            deltas.profile(creator, "postsCount", 1)
            if parent:
                deltas.post(parent, "replyCount", 1)
            items.append((uri, cid, "post", uri, creator, sort_at(created, indexed)))
            subject = quoted(by_uri[uri].record.embed)
            if subject is not None:
                quotes.append((uri, cid, subject.uri, subject.cid, created, indexed))
            embeds.add(uri, by_uri[uri].record.embed)
        await feed_item.add(conn, items)
        await embeds.write(conn)
        await post_flags.posts_added(conn, [rec["uri"] for rec in inserted])
        if quotes:
            for q in await conn.fetch(_INSERT_QUOTE, rows_json(quotes)):
                deltas.post(q["subject"], "quoteCount", 1)

    async def delete(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        uris = [op.uri for op in ops]
        deleted = await conn.fetch(_DELETE_POST, uris)
        for rec in deleted:
            deltas.profile(rec["creator"], "postsCount", -1)
            if rec["replyParent"]:
                deltas.post(rec["replyParent"], "replyCount", -1)
        for rec in await conn.fetch(_DELETE_QUOTE, uris):
            deltas.post(rec["subject"], "quoteCount", -1)
        await feed_item.remove(conn, uris)
        await remove_embeds(conn, uris)
        await post_flags.posts_removed(conn, [rec["uri"] for rec in deleted])
