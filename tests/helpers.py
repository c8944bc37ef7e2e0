"""Builders for envelopes, and checks of the database state, shared by the tests."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

from indexer.config import Settings
from indexer.drift import drift, negative_counters
from indexer.metrics import Metrics
from indexer.replica import Replica
from indexer.workload import BLOCK, FOLLOW, LIKE, POST, PROFILE, REPOST
from plugins import registry

__all__ = ["BLOCK", "FOLLOW", "LIKE", "POST", "PROFILE", "REPOST"]
T0 = "2024-11-19T07:06:40.000Z"


def did(n: int) -> str:
    return f"did:plc:user{n:04d}"


def uri(author: int, collection: str, rkey: str) -> str:
    return f"at://{did(author)}/{collection}/{rkey}"


def rev(n: int) -> str:
    """A TID-like revision that sorts with n (13 base32-sortable characters)."""
    chars = "234567abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(13):
        out = chars[n % 32] + out
        n //= 32
    return out


def create(
    author: int, collection: str, rkey: str, record: dict[str, Any], r: int, *, op: str = "create"
) -> dict[str, Any]:
    return {
        "type": op,
        "seq": r,
        "time": T0,
        "did": did(author),
        "commit": "bafycommit",
        "rev": rev(r),
        "collection": collection,
        "rkey": rkey,
        "cid": f"bafy{rkey}{r}",
        "record": record,
    }


def delete(author: int, collection: str, rkey: str, r: int) -> dict[str, Any]:
    return {
        "type": "delete",
        "seq": r,
        "time": T0,
        "did": did(author),
        "commit": "bafycommit",
        "rev": rev(r),
        "collection": collection,
        "rkey": rkey,
    }


def like_record(subject: str, created: str = T0) -> dict[str, Any]:
    return {"$type": LIKE, "subject": {"uri": subject, "cid": "bafysubject"}, "createdAt": created}


def repost_record(subject: str) -> dict[str, Any]:
    return {"$type": REPOST, "subject": {"uri": subject, "cid": "bafysubject"}, "createdAt": T0}


def follow_record(subject: int) -> dict[str, Any]:
    return {"$type": FOLLOW, "subject": did(subject), "createdAt": T0}


def post_record(
    text: str = "hello", *, reply_to: str | None = None, quote: str | None = None
) -> dict[str, Any]:
    rec: dict[str, Any] = {"$type": POST, "text": text, "createdAt": T0, "langs": ["en"]}
    if reply_to:
        ref = {"uri": reply_to, "cid": "bafyparent"}
        rec["reply"] = {"root": ref, "parent": ref}
    if quote:
        rec["embed"] = {"$type": "app.bsky.embed.record", "record": {"uri": quote, "cid": "bafyq"}}
    return rec


async def push(client: aioredis.Redis, stream: str, events: list[Any]) -> list[str]:
    """XADD each event (a dict is JSON-encoded, bytes go as they are); returns the entry ids."""
    async with client.pipeline(transaction=False) as pipe:
        for event in events:
            raw = event if isinstance(event, bytes) else msgspec.json.encode(event)
            pipe.xadd(stream, {"event": raw})
        ids = await pipe.execute()
    return [i.decode() for i in ids]


async def drain_replicas(settings: Settings, count: int) -> int:
    """Run `count` replicas concurrently in this process until the group is drained."""
    replicas = [
        Replica(settings.replace(consumer=f"replica-{n}"), registry(), Metrics())
        for n in range(count)
    ]
    await asyncio.wait_for(asyncio.gather(*(r.run(drain=True) for r in replicas)), 90)
    return sum(r.indexed for r in replicas)


_SNAPSHOT_TABLES = {
    "record": "SELECT uri, cid, did, json, rev FROM record",
    "post": 'SELECT uri, cid, creator, text, "replyParent", "createdAt", langs::text FROM post',
    "like": 'SELECT uri, subject, creator FROM "like"',
    "repost": "SELECT uri, subject, creator FROM repost",
    "follow": 'SELECT uri, creator, "subjectDid" FROM follow',
    "block": 'SELECT uri, creator, "subjectDid" FROM actor_block',
    "duplicate_record": 'SELECT uri, cid, "duplicateOf" FROM duplicate_record',
    "profile": 'SELECT uri, cid, "displayName", description FROM profile',
    "quote": "SELECT uri, subject FROM quote",
    "feed_item": 'SELECT uri, type, "postUri", "originatorDid" FROM feed_item',
    "post_agg": 'SELECT uri, "likeCount", "repostCount", "replyCount", "quoteCount" '
    'FROM post_agg WHERE greatest("likeCount", "repostCount", "replyCount", '
    '"quoteCount") > 0',
    "profile_agg": 'SELECT did, "followersCount", "followsCount", "postsCount" FROM profile_agg '
    'WHERE greatest("followersCount", "followsCount", "postsCount") > 0',
    "actor": 'SELECT did, "indexedAt" FROM actor',
    "post_flags": 'SELECT uri, "invalidReplyRoot", "hasThreadGate", "hasPostGate" FROM post',
    "post_embed_image": 'SELECT "postUri", position, "imageCid", alt FROM post_embed_image',
    "post_embed_video": 'SELECT "postUri", "videoCid", alt FROM post_embed_video',
    "post_embed_external": 'SELECT "postUri", uri, title, description, "thumbCid" '
    "FROM post_embed_external",
    "post_embed_record": 'SELECT "postUri", "embedUri", "embedCid" FROM post_embed_record',
    "list": 'SELECT uri, cid, name, purpose, description, "descriptionFacets", "avatarCid" '
    "FROM list",
    "list_item": 'SELECT uri, creator, "listUri", "subjectDid" FROM list_item',
    "list_block": 'SELECT uri, creator, "subjectUri" FROM list_block',
    "feed_generator": 'SELECT uri, cid, "feedDid", "displayName", description FROM feed_generator',
    "thread_gate": 'SELECT uri, "postUri" FROM thread_gate',
    "post_gate": 'SELECT uri, "postUri" FROM post_gate',
    "starter_pack": "SELECT uri, cid, name FROM starter_pack",
    "labeler": "SELECT uri, cid FROM labeler",
    "verification": 'SELECT uri, subject, handle, "displayName" FROM verification',
    "record_state": "SELECT uri, rev, live FROM record_state",
}


async def snapshot(conn: Any) -> dict[str, list[tuple[Any, ...]]]:
    """The visible state (everything but the times of indexing) of the tables we write."""
    state = {}
    for name, sql in _SNAPSHOT_TABLES.items():
        rows = await conn.fetch(sql)
        state[name] = sorted(tuple(r) for r in rows)
    return state


async def assert_no_drift(conn: Any) -> None:
    """Every counter equals the count(*) of its rows, and none is negative."""
    found = await drift(conn)
    assert found == dict.fromkeys(found, 0), f"counter drift: {found}"
    assert await negative_counters(conn) == 0


def bad_entries() -> dict[str, bytes]:
    """Each bad entry with the words its dead-letter reason must contain."""
    good_like = create(7, LIKE, "lx", like_record(uri(1, POST, "p1")), 50)
    no_rev = {k: v for k, v in good_like.items() if k != "rev"}
    typed = dict(good_like, rev=5)
    no_subject = create(7, LIKE, "ly", {"createdAt": "2024-01-01T00:00:00Z"}, 51)
    bad_did = create(7, LIKE, "lz", like_record(uri(1, POST, "p1")), 52) | {"did": "nope"}
    return {
        "undecodable event: JSON is malformed": b"{not json",
        "missing required field `rev`": msgspec.json.encode(no_rev),
        "Expected `str`, got `int`": msgspec.json.encode(typed),
        "invalid app.bsky.feed.like record": msgspec.json.encode(no_subject),
        "invalid did": msgspec.json.encode(bad_did),
        "Invalid value 'bogus'": b'{"type":"bogus","did":"did:plc:x"}',
        "invalid app.bsky.feed.post record: Invalid UTF-8": msgspec.json.encode(
            create(7, POST, "u1", post_record("PLACEHOLDER"), 53)
        ).replace(b"PLACEHOLDER", b"\xff\xfe"),
    }


def unindexable_uri() -> str:
    """A uri only PostgreSQL can refuse: too big for a btree index row, even compressed."""
    noise = random.Random(1)
    return "at://" + "".join(chr(noise.randrange(0x4E00, 0x9FFF)) for _ in range(2900))


async def rows(db: asyncpg.Connection, sql: str) -> list[tuple[Any, ...]]:
    """The rows of a query as sorted tuples."""
    return sorted(tuple(r) for r in await db.fetch(sql))
