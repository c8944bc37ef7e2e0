"""Lists, list items and blocks, feed generators, gates, starter packs, labelers, verifications,
post embeds and reply checks: rows by value, and the same state in order, replayed and shuffled.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import asyncpg
import msgspec
import pytest

from indexer.aggregates import Deltas
from indexer.db import Database, connect
from indexer.guard import Change
from indexer.locks import lock_changes
from indexer.metrics import Metrics
from indexer.pipeline import Pipeline
from indexer.plugin import Op, outcome_of
from indexer.replica import Replica
from plugins import registry
from plugins.listitem import ListItemPlugin
from plugins.post import PostPlugin
from plugins.threadgate import ThreadgatePlugin
from tests.helpers import (
    POST,
    assert_no_drift,
    create,
    delete,
    did,
    drain_replicas,
    post_record,
    push,
    rows,
    snapshot,
    uri,
)
from tests.test_races import GatedDatabase, _batch

LIST = "app.bsky.graph.list"
LISTITEM = "app.bsky.graph.listitem"
LISTBLOCK = "app.bsky.graph.listblock"
GENERATOR = "app.bsky.feed.generator"
THREADGATE = "app.bsky.feed.threadgate"
POSTGATE = "app.bsky.feed.postgate"
STARTERPACK = "app.bsky.graph.starterpack"
LABELER = "app.bsky.labeler.service"
VERIFICATION = "app.bsky.graph.verification"
T = "2024-11-19T07:06:40.000Z"
MODLIST = "app.bsky.graph.defs#modlist"
L1 = uri(1, LIST, "l1")


def blob(cid: str) -> dict[str, Any]:
    return {"$type": "blob", "ref": {"$link": cid}, "mimeType": "image/jpeg", "size": 1}


def list_record(name: str, **extra: Any) -> dict[str, Any]:
    return {"$type": LIST, "name": name, "purpose": MODLIST, "createdAt": T, **extra}


def item(subject: int, list_uri: str = L1) -> dict[str, Any]:
    return {"$type": LISTITEM, "subject": did(subject), "list": list_uri, "createdAt": T}


def gate(kind: str, author: int, rkey: str) -> dict[str, Any]:
    return {"$type": kind, "post": uri(author, POST, rkey), "createdAt": T}


def reply(root: str, parent: str) -> dict[str, Any]:
    rec = post_record("re")
    rec["reply"] = {"root": {"uri": root, "cid": "bafyr"}, "parent": {"uri": parent, "cid": "p"}}
    return rec


def post_with(embed: dict[str, Any]) -> dict[str, Any]:
    return post_record("embeds") | {"embed": embed}


async def index_in_any_order(
    settings: Any, redis: Any, db: asyncpg.Connection, postgres_server: Any, events: list[Any]
) -> None:
    """Index events in order; replaying them twice, or shuffled to three replicas in tiny
    batches on an empty database, must end in the same state, without counter drift."""
    await push(redis, settings.live_stream, events)
    await drain_replicas(settings, 1)
    in_order = await snapshot(db)
    await assert_no_drift(db)
    await push(redis, settings.live_stream, events + events)
    await drain_replicas(settings, 1)
    assert await snapshot(db) == in_order, "replayed"
    for seed in range(2):
        name = f"c_{uuid.uuid4().hex[:10]}"
        postgres_server.create_database(name, template="indexer_template")
        other = settings.replace(
            database_url=postgres_server.dsn(name),
            streams=(f"{settings.live_stream}_{seed}",),
            group=f"{settings.group}_{seed}",
            batch_size=2,
        )
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        conn = await asyncpg.connect(other.database_url)
        try:
            await push(redis, other.live_stream, shuffled)
            await drain_replicas(other, 3)
            assert await snapshot(conn) == in_order, f"seed {seed}"
            await assert_no_drift(conn)
        finally:
            await conn.close()
            postgres_server.drop_database(name)


async def test_lists_update_and_delete(settings, redis, db, postgres_server):
    facets = [{"index": {"byteStart": 0, "byteEnd": 1}, "features": []}]
    events = [
        create(1, LIST, "l1", list_record("first", description="a\u0000b"), 10),
        create(1, LIST, "l1", list_record("stale"), 11, op="update"),
        create(1, LIST, "l1", list_record("second", descriptionFacets=facets,
                                          avatar=blob("bafyavatar")), 12, op="update"),
        create(1, LIST, "l2", list_record("gone"), 13),
        delete(1, LIST, "l2", 14),
    ]  # fmt: skip
    events[1], events[2] = events[2], events[1]  # the older update arrives last: ignored
    await index_in_any_order(settings, redis, db, postgres_server, events)
    row = await db.fetchrow("SELECT * FROM list")
    assert (row["uri"], row["creator"], row["name"], row["purpose"]) == (
        L1, did(1), "second", MODLIST,
    )  # fmt: skip
    assert row["description"] is None
    assert row["avatarCid"] == "bafyavatar"
    assert row["descriptionFacets"] == '[{"index":{"byteStart":0,"byteEnd":1},"features":[]}]'
    assert (row["createdAt"], row["cid"]) == (T, "bafyl112")
    assert await db.fetchval("SELECT count(*) FROM list") == 1


async def test_list_items_in_own_lists_only_one_per_subject(settings, redis, db, postgres_server):
    events = [
        create(1, LIST, "l1", list_record("mine"), 10),
        create(1, LISTITEM, "i1", item(5), 11),
        create(1, LISTITEM, "i2", item(5), 12),  # the same subject again: a duplicate
        create(1, LISTITEM, "i3", item(6), 13),
        delete(1, LISTITEM, "i3", 14),
        create(2, LISTITEM, "i9", item(7), 15),  # user 2 adding to user 1's list: rejected
        create(1, LISTITEM, "i1", item(8), 16, op="update"),  # i1 moves on: i2 is promoted
        create(1, LISTITEM, "i4", item(9, "https://not-an-at-uri"), 17),  # rejected
    ]
    await index_in_any_order(settings, redis, db, postgres_server, events)
    assert await rows(db, 'SELECT uri, creator, "listUri", "subjectDid" FROM list_item') == [
        (uri(1, LISTITEM, "i1"), did(1), L1, did(8)),
        (uri(1, LISTITEM, "i2"), did(1), L1, did(5)),
    ]
    assert await db.fetchval("SELECT count(*) FROM duplicate_record") == 0
    # the rejected records are known to the rev guard (replays stay unchanged), not indexed
    live = {r["uri"] for r in await db.fetch("SELECT uri FROM record_state WHERE live")}
    assert {uri(2, LISTITEM, "i9"), uri(1, LISTITEM, "i4")} <= live


async def test_list_blocks_one_per_list(settings, redis, db, postgres_server):
    events = [
        create(3, LISTBLOCK, "b1", {"subject": L1, "createdAt": T}, 30),
        create(3, LISTBLOCK, "b2", {"subject": L1, "createdAt": "2024-01-01T00:00:00Z"}, 31),
        create(3, LISTBLOCK, "b3", {"subject": uri(1, LIST, "l2"), "createdAt": T}, 32),
        delete(3, LISTBLOCK, "b1", 33),
    ]
    await index_in_any_order(settings, redis, db, postgres_server, events)
    got = await rows(db, 'SELECT uri, creator, "subjectUri", "createdAt" FROM list_block')
    assert got == [
        (uri(3, LISTBLOCK, "b2"), did(3), L1, "2024-01-01T00:00:00.000Z"),
        (uri(3, LISTBLOCK, "b3"), did(3), uri(1, LIST, "l2"), T),
    ]


async def test_feed_generators_starter_packs_labelers_update(settings, redis, db, postgres_server):
    def feed(name: str) -> dict[str, Any]:
        return {"did": "did:web:feed.example", "displayName": name, "description": "x\u0000y",
                "avatar": blob("bafyfeed"), "createdAt": "bad date"}  # fmt: skip

    def pack(name: str) -> dict[str, Any]:
        return {"name": name, "list": L1, "createdAt": T}

    labels = {"policies": {"labelValues": []}, "createdAt": T}
    events = [
        create(1, GENERATOR, "f1", feed("Feed"), 40),
        create(1, GENERATOR, "f1", feed("Feed 2"), 41, op="update"),
        create(1, GENERATOR, "f2", feed("Gone"), 42),
        delete(1, GENERATOR, "f2", 43),
        create(1, STARTERPACK, "s1", pack("pack"), 44),
        create(1, STARTERPACK, "s1", pack("pack 2"), 45, op="update"),
        create(2, STARTERPACK, "s2", pack("gone"), 46),
        delete(2, STARTERPACK, "s2", 47),
        create(1, LABELER, "self", {"policies": {}, "createdAt": T}, 48),
        create(1, LABELER, "self", labels, 49, op="update"),
        create(2, LABELER, "self", {"createdAt": T}, 50),
        delete(2, LABELER, "self", 51),
        create(3, LABELER, "other", {"createdAt": T}, 52),  # not `self`: skipped
    ]  # fmt: skip
    await index_in_any_order(settings, redis, db, postgres_server, events)
    got = await rows(db, 'SELECT uri, creator, "feedDid", "displayName", description, "avatarCid", '
                         '"createdAt" FROM feed_generator')  # fmt: skip
    assert got == [(uri(1, GENERATOR, "f1"), did(1), "did:web:feed.example", "Feed 2", "xy",
                    "bafyfeed", "1970-01-01T00:00:00.000Z")]  # fmt: skip
    assert await rows(db, "SELECT uri, creator, name, cid FROM starter_pack") == [
        (uri(1, STARTERPACK, "s1"), did(1), "pack 2", "bafys145")
    ]
    assert await rows(db, 'SELECT uri, creator, cid, "createdAt" FROM labeler') == [
        (uri(1, LABELER, "self"), did(1), "bafyself49", T)
    ]


async def test_gates_flag_their_post_in_any_order(settings, redis, db, postgres_server):
    events = [
        create(1, POST, "p1", post_record(), 50),
        create(1, THREADGATE, "p1", gate(THREADGATE, 1, "p1"), 51),
        create(2, THREADGATE, "p1", gate(THREADGATE, 1, "p1"), 52),  # another's post: rejected
        create(1, THREADGATE, "p2", gate(THREADGATE, 1, "p2"), 53),  # before its post
        create(1, POST, "p2", post_record(), 54),
        create(1, POSTGATE, "p2", gate(POSTGATE, 1, "p2"), 55),
        create(1, POSTGATE, "p1", gate(POSTGATE, 1, "p1"), 56),
        delete(1, POSTGATE, "p1", 57),
        create(1, POSTGATE, "p3", gate(POSTGATE, 1, "p4"), 58),  # not its rkey: rejected
        create(1, POST, "p3", post_record(), 59),
    ]
    await index_in_any_order(settings, redis, db, postgres_server, events)
    assert await rows(db, 'SELECT uri, creator, "postUri" FROM thread_gate') == [
        (uri(1, THREADGATE, "p1"), did(1), uri(1, POST, "p1")),
        (uri(1, THREADGATE, "p2"), did(1), uri(1, POST, "p2")),
    ]
    assert await rows(db, 'SELECT uri, "postUri" FROM post_gate') == [
        (uri(1, POSTGATE, "p2"), uri(1, POST, "p2"))
    ]
    assert await rows(db, 'SELECT uri, "hasThreadGate", "hasPostGate" FROM post') == [
        (uri(1, POST, "p1"), True, None),
        (uri(1, POST, "p2"), True, True),
        (uri(1, POST, "p3"), None, None),
    ]
    await push(redis, settings.live_stream, [delete(1, THREADGATE, "p1", 60)])
    await drain_replicas(settings, 1)
    assert await db.fetchval('SELECT "hasThreadGate" FROM post WHERE uri = $1',
                             uri(1, POST, "p1")) is None  # fmt: skip


async def test_verifications_one_per_subject(settings, redis, db, postgres_server):
    def verify(subject: int, handle: str) -> dict[str, Any]:
        return {"subject": did(subject), "handle": handle, "displayName": f"{handle}\u0000!",
                "createdAt": T}  # fmt: skip

    events = [
        create(1, VERIFICATION, "v1", verify(5, "five.test"), 90),
        create(1, VERIFICATION, "v2", verify(5, "five.again"), 91),  # duplicate of v1
        create(1, VERIFICATION, "v3", verify(6, "six.test"), 92),
        delete(1, VERIFICATION, "v3", 93),
        create(2, VERIFICATION, "v1", verify(5, "five.test"), 94),  # another verifier
    ]
    await index_in_any_order(settings, redis, db, postgres_server, events)
    got = await rows(db, 'SELECT uri, rkey, creator, subject, handle, "displayName" '
                         "FROM verification")  # fmt: skip
    assert got == [
        (uri(1, VERIFICATION, "v1"), "v1", did(1), did(5), "five.test", "five.test!"),
        (uri(2, VERIFICATION, "v1"), "v1", did(2), did(5), "five.test", "five.test!"),
    ]
    assert await rows(db, 'SELECT uri, "duplicateOf" FROM duplicate_record') == [
        (uri(1, VERIFICATION, "v2"), uri(1, VERIFICATION, "v1"))
    ]


async def test_post_embeds_written_and_deleted_with_the_post(settings, redis, db, postgres_server):
    p1 = uri(1, POST, "p1")
    images = {"$type": "app.bsky.embed.images", "images": [
        {"image": blob("bafyimg0"), "alt": "first\u0000"},
        {"image": blob("bafyimg1"), "alt": "second"},
    ]}  # fmt: skip
    external = {"$type": "app.bsky.embed.external", "external": {
        "uri": "https://example.com", "title": "Example", "description": "about",
        "thumb": blob("bafythumb"),
    }}  # fmt: skip
    video = {"$type": "app.bsky.embed.video", "video": blob("bafyvideo"), "alt": "clip"}
    quote = {"$type": "app.bsky.embed.record", "record": {"uri": p1, "cid": "bafyp1"}}
    feed = {"$type": "app.bsky.embed.record",
            "record": {"uri": uri(1, GENERATOR, "f1"), "cid": "bafyf1"}}  # fmt: skip
    with_media = {"$type": "app.bsky.embed.recordWithMedia", "record": quote, "media": video}
    events = [
        create(1, POST, "p1", post_record(), 10),
        create(2, POST, "i", post_with(images), 11),
        create(2, POST, "e", post_with(external), 12),
        create(2, POST, "v", post_with(video), 13),
        create(2, POST, "q", post_with(quote), 14),
        create(2, POST, "f", post_with(feed), 15),
        create(2, POST, "m", post_with(with_media), 16),
        create(2, POST, "odd", post_with({"$type": "app.bsky.embed.images", "images": 3}), 17),
        create(2, POST, "gone", post_with(images), 18),
        delete(2, POST, "gone", 19),
    ]
    await index_in_any_order(settings, redis, db, postgres_server, events)
    p = lambda rkey: uri(2, POST, rkey)  # noqa: E731
    assert await rows(db, 'SELECT "postUri", position, "imageCid", alt FROM post_embed_image') == [
        (p("i"), "0", "bafyimg0", "first"),
        (p("i"), "1", "bafyimg1", "second"),
    ]
    assert await rows(db, "SELECT * FROM post_embed_external") == [
        (p("e"), "https://example.com", "Example", "about", "bafythumb")
    ]
    assert await rows(db, 'SELECT "postUri", "videoCid", alt FROM post_embed_video') == [
        (p("m"), "bafyvideo", "clip"),
        (p("v"), "bafyvideo", "clip"),
    ]
    assert await rows(db, 'SELECT "postUri", "embedUri", "embedCid" FROM post_embed_record') == [
        (p("f"), uri(1, GENERATOR, "f1"), "bafyf1"),
        (p("m"), p1, "bafyp1"),
        (p("q"), p1, "bafyp1"),
    ]
    assert await rows(db, "SELECT uri, subject FROM quote") == [(p("m"), p1), (p("q"), p1)]
    assert await db.fetchval('SELECT "quoteCount" FROM post_agg WHERE uri = $1', p1) == 2
    assert await db.fetchval("SELECT count(*) FROM post") == 8
    await push(redis, settings.live_stream, [delete(2, POST, rkey, 30) for rkey in "iemv"])
    await drain_replicas(settings, 1)
    for table in ("image", "external", "video"):
        assert await db.fetchval(f"SELECT count(*) FROM post_embed_{table}") == 0
    assert await rows(db, 'SELECT "postUri", "embedUri" FROM post_embed_record') == [
        (p("f"), uri(1, GENERATOR, "f1")),
        (p("q"), p1),
    ]
    assert await rows(db, "SELECT uri, subject FROM quote") == [(p("q"), p1)]
    assert await rows(db, "SELECT uri FROM feed_item") == await rows(db, "SELECT uri FROM post")
    assert await db.fetchval("SELECT count(*) FROM feed_item") == 4
    await assert_no_drift(db)


async def test_a_post_already_in_the_table_adds_nothing_with_it(settings, redis, db):
    """A `post` row the rev guard never saw (left by another indexer) is kept as it is: its
    create adds no feed item, embed or quote, and moves no counter."""
    p1, stale = uri(1, POST, "p1"), uri(2, POST, "stale")
    await db.execute(
        'INSERT INTO post (uri, cid, creator, text, "createdAt", "indexedAt") '
        "VALUES ($1, 'bafyold', $2, 'old', $3, $3)",
        stale, did(2), T,
    )  # fmt: skip
    quote = {"$type": "app.bsky.embed.record", "record": {"uri": p1, "cid": "bafyp1"}}
    events = [
        create(1, POST, "p1", post_record(), 10),
        create(2, POST, "stale", post_with(quote), 11),
        create(2, POST, "new", post_with(quote), 12),
    ]
    await push(redis, settings.live_stream, events)
    await drain_replicas(settings, 1)
    assert await rows(db, f"SELECT uri, text FROM post WHERE creator = '{did(2)}'") == [
        (uri(2, POST, "new"), "embeds"),
        (stale, "old"),
    ]
    assert await rows(db, "SELECT uri FROM quote") == [(uri(2, POST, "new"),)]
    assert await rows(db, 'SELECT "postUri" FROM post_embed_record') == [(uri(2, POST, "new"),)]
    assert await rows(db, "SELECT uri FROM feed_item ORDER BY uri") == [
        (p1,), (uri(2, POST, "new"),)
    ]  # fmt: skip
    assert await db.fetchval('SELECT "quoteCount" FROM post_agg WHERE uri = $1', p1) == 1
    assert await db.fetchval('SELECT "postsCount" FROM profile_agg WHERE did = $1', did(2)) == 1


async def test_invalid_reply_root_in_any_order(settings, redis, db, postgres_server):
    p1, r1 = uri(1, POST, "p1"), uri(2, POST, "r1")
    events = [
        create(1, POST, "p1", post_record(), 10),
        create(2, POST, "r1", reply(p1, p1), 11),  # valid
        create(3, POST, "r2", reply(p1, r1), 12),  # valid: r1's root is p1
        create(3, POST, "r3", reply(r1, r1), 13),  # invalid: r1 is a reply, not a root
        create(4, POST, "r4", reply(uri(9, POST, "x"), p1), 14),  # invalid: p1 is the root
        create(4, POST, "r5", reply(p1, uri(9, POST, "unknown")), 15),  # parent unknown
        create(5, POST, "r6", reply(p1, uri(5, POST, "r7")), 16),  # parent r7 comes next
        create(5, POST, "r7", reply(uri(9, POST, "y"), p1), 17),  # invalid; r6 too (roots differ)
    ]
    await index_in_any_order(settings, redis, db, postgres_server, events)
    got = await rows(db, 'SELECT uri, "invalidReplyRoot" FROM post')
    assert got == [
        (p1, None), (r1, None), (uri(3, POST, "r2"), None), (uri(3, POST, "r3"), True),
        (uri(4, POST, "r4"), True), (uri(4, POST, "r5"), None), (uri(5, POST, "r6"), True),
        (uri(5, POST, "r7"), True),
    ]  # fmt: skip
    # the parent goes: its replies can no longer be checked
    await push(redis, settings.live_stream, [delete(2, POST, "r1", 20)])
    await drain_replicas(settings, 1)
    assert await db.fetchval('SELECT "invalidReplyRoot" FROM post WHERE uri = $1',
                             uri(3, POST, "r3")) is None  # fmt: skip
    await assert_no_drift(db)


async def test_listitem_of_another_list_is_refused_and_marked(db):
    plugin = ListItemPlugin()
    ops = [
        Op(uri(n, LISTITEM, "i1"), did(n), LISTITEM, "i1", "2", "bafyi", None, "{}", T)
        for n in (1, 2)
    ]
    for op in ops:
        op.record = plugin.decode(b'{"subject": "did:plc:x", "list": "%s"}' % L1.encode())
    async with db.transaction():
        await plugin.insert(db, ops, Deltas())
    assert [op.rejected is not None for op in ops] == [False, True]
    assert [outcome_of(op, True) for op in ops] == ["indexed", "rejected"]
    assert await db.fetchval("SELECT uri FROM list_item") == uri(1, LISTITEM, "i1")


async def test_rejected_listitem_is_counted_in_events_total(settings, redis, db):
    await push(redis, settings.live_stream, [create(2, LISTITEM, "i9", item(7), 15)])
    metrics = Metrics()
    await Replica(settings, registry(), metrics).run(drain=True)
    labels = {"collection": LISTITEM, "operation": "create", "outcome": "rejected"}
    assert metrics.registry.get_sample_value("indexer_events_total", labels) == 1
    assert await db.fetchval("SELECT count(*) FROM list_item") == 0


async def test_updates_that_become_invalid_remove_the_row(settings, redis, db, postgres_server):
    """A listitem moved into another's list, a gate moved to another post: row and flag go."""
    events = [
        create(1, LIST, "l1", list_record("mine"), 10),
        create(1, LISTITEM, "i1", item(5), 11),
        create(1, LISTITEM, "i1", item(5, uri(2, LIST, "l2")), 12, op="update"),
        create(1, POST, "p1", post_record(), 13),
        create(1, THREADGATE, "p1", gate(THREADGATE, 1, "p1"), 14),
        create(1, THREADGATE, "p1", gate(THREADGATE, 1, "p2"), 15, op="update"),
        create(1, POST, "p2", post_record(), 16),
        create(1, POSTGATE, "p2", gate(POSTGATE, 1, "p1"), 17),  # invalid at first ...
        create(1, POSTGATE, "p2", gate(POSTGATE, 1, "p2"), 18, op="update"),  # ... then valid
    ]
    await index_in_any_order(settings, redis, db, postgres_server, events)
    assert await db.fetchval("SELECT count(*) FROM list_item") == 0
    assert await db.fetchval("SELECT count(*) FROM thread_gate") == 0
    assert await rows(db, 'SELECT uri, "postUri" FROM post_gate') == [
        (uri(1, POSTGATE, "p2"), uri(1, POST, "p2"))
    ]
    assert await rows(db, 'SELECT uri, "hasThreadGate", "hasPostGate" FROM post') == [
        (uri(1, POST, "p1"), None, None),
        (uri(1, POST, "p2"), None, True),
    ]


async def test_rejected_update_is_counted(settings, redis, db):
    await push(redis, settings.live_stream, [
        create(1, LISTITEM, "i1", item(5), 11),
        create(1, LISTITEM, "i1", item(5, uri(2, LIST, "l2")), 12, op="update"),
    ])  # fmt: skip
    metrics = Metrics()
    await Replica(settings, registry(), metrics).run(drain=True)
    labels = {"collection": LISTITEM, "operation": "update", "outcome": "rejected"}
    assert metrics.registry.get_sample_value("indexer_events_total", labels) == 1
    assert await db.fetchval("SELECT count(*) FROM list_item") == 0


async def test_odd_but_valid_records_are_indexed_not_dead_lettered(settings, redis, db):
    """Optional fields missing, a huge image array, strong refs that are no at-uris."""
    p = lambda rkey: uri(2, POST, rkey)  # noqa: E731
    many = {"$type": "app.bsky.embed.images",
            "images": [{"image": blob(f"bafy{n}")} for n in range(500)]}  # fmt: skip
    bare_external = {"$type": "app.bsky.embed.external", "external": {"uri": "https://x.test"}}
    bare_video = {"$type": "app.bsky.embed.video", "video": blob("bafyv")}
    not_at = {"$type": "app.bsky.embed.record",
              "record": {"uri": "https://bsky.app/app.bsky.feed.post/x", "cid": "c"}}  # fmt: skip
    no_rkey = {"$type": "app.bsky.embed.record", "record": {"uri": uri(1, POST, "")}}
    no_cid = {
        "$type": "app.bsky.embed.recordWithMedia",
        "record": {"record": {"uri": uri(1, POST, "p1"), "cid": 7}},
        "media": {"$type": "app.bsky.embed.record", "record": {"uri": uri(1, POST, "q")}},
    }
    events = [
        create(2, POST, "many", post_with(many), 10),
        create(2, POST, "ext", post_with(bare_external), 11),
        create(2, POST, "vid", post_with(bare_video), 12),
        create(2, POST, "notat", post_with(not_at), 13),
        create(2, POST, "norkey", post_with(no_rkey), 14),
        create(2, POST, "nocid", post_with(no_cid), 15),
        create(2, POST, "badreply", reply("not a uri", "at://nobody"), 16),
        create(1, LIST, "l1", {"name": "n", "purpose": MODLIST}, 17),
        create(1, GENERATOR, "f1", {"did": "did:web:f.test"}, 18),
        create(1, STARTERPACK, "s1", {"list": L1}, 19),
        create(1, LABELER, "self", {}, 20),
        create(1, THREADGATE, "p9", {"post": uri(1, POST, "p9")}, 21),
        create(1, LISTBLOCK, "b1", {"subject": "not a uri"}, 22),
    ]  # fmt: skip
    await push(redis, settings.live_stream, events)
    metrics = Metrics()
    await Replica(settings, registry(), metrics).run(drain=True)
    assert await redis.xlen(f"{settings.live_stream}:dlq") == 0
    assert await db.fetchval("SELECT count(*) FROM post") == 7
    images = await rows(db, 'SELECT position, "imageCid", alt FROM post_embed_image')
    assert len(images) == 16 and images[0] == ("0", "bafy0", "")
    assert await rows(db, "SELECT * FROM post_embed_external") == [
        (p("ext"), "https://x.test", "", "", None)
    ]
    assert await rows(db, "SELECT * FROM post_embed_video") == [(p("vid"), "bafyv", None)]
    assert await rows(db, "SELECT * FROM post_embed_record") == [
        (p("nocid"), uri(1, POST, "p1"), "")
    ]
    assert await rows(db, 'SELECT uri, subject, "subjectCid" FROM quote') == [
        (p("nocid"), uri(1, POST, "p1"), "")
    ]
    assert await db.fetchval('SELECT "invalidReplyRoot" FROM post WHERE uri = $1',
                             p("badreply")) is None  # fmt: skip
    epoch = "1970-01-01T00:00:00.000Z"
    assert await db.fetchval("SELECT description FROM list") is None
    assert await db.fetchval('SELECT "displayName" FROM feed_generator') is None
    assert await rows(db, 'SELECT name, "createdAt" FROM starter_pack') == [(None, epoch)]
    assert await db.fetchval('SELECT "createdAt" FROM labeler') == epoch
    assert await db.fetchval("SELECT count(*) FROM thread_gate") == 1
    assert await db.fetchval('SELECT "subjectUri" FROM list_block') == "not a uri"
    await assert_no_drift(db)


def _op(plugin: Any, author: int, rkey: str, record: dict[str, Any]) -> Op:
    raw = msgspec.json.encode(record)
    return Op(uri(author, plugin.collection, rkey), did(author), plugin.collection, rkey, "2",
              "bafy", plugin.decode(raw), raw.decode(), T)  # fmt: skip


def _concurrent_pair(name: str) -> tuple[Any, Op, Any, Op, str, str]:
    """(plugin, op) written first, (plugin, op) second, and the post flag the pair must set."""
    p1 = uri(1, POST, "p1")
    posts, gates = PostPlugin(), ThreadgatePlugin()
    parent = _op(posts, 1, "p1", reply(uri(9, POST, "root"), uri(9, POST, "root")))
    child = _op(posts, 2, "r1", reply(p1, p1))  # invalid: p1 is itself a reply
    post = _op(posts, 1, "p1", post_record())
    gated = _op(gates, 1, "p1", gate(THREADGATE, 1, "p1"))
    return {
        "parent, then reply": (posts, parent, posts, child, "invalidReplyRoot", child.uri),
        "reply, then parent": (posts, child, posts, parent, "invalidReplyRoot", child.uri),
        "post, then gate": (posts, post, gates, gated, "hasThreadGate", p1),
        "gate, then post": (gates, gated, posts, post, "hasThreadGate", p1),
    }[name]


async def _apply(conn: Any, plugin: Any, kind: str, op: Op) -> None:
    """As the pipeline applies a change: its locks first, in one statement, then the plugin."""
    await lock_changes(conn, {plugin.collection: plugin}, [Change(op, kind)])
    await getattr(plugin, kind)(conn, [op], Deltas())


@pytest.mark.parametrize(
    "pair", ["parent, then reply", "reply, then parent", "post, then gate", "gate, then post"]
)
async def test_records_of_one_post_in_concurrent_transactions(database_url, db, pair):
    """Neither transaction sees the other's uncommitted row; the second waits for the first."""
    first, first_op, second, second_op, flag, post_uri = _concurrent_pair(pair)
    one, two = await connect(database_url), await connect(database_url)
    try:
        tx_one, tx_two = one.transaction(), two.transaction()
        await tx_one.start()
        await _apply(one, first, "insert", first_op)
        await tx_two.start()
        task = asyncio.create_task(_apply(two, second, "insert", second_op))
        await asyncio.sleep(0.3)
        assert not task.done()  # waiting for the first transaction's lock on p1
        await tx_one.commit()
        await asyncio.wait_for(task, 10)
        await tx_two.commit()
    finally:
        await one.close()
        await two.close()
    assert await db.fetchval(f'SELECT "{flag}" FROM post WHERE uri = $1', post_uri) is True


async def test_post_delete_locks_before_touching_rows(database_url, db):
    """A delete waiting for a post's lock holds none of its rows, so the lock's holder may still
    update them (here: re-flag the post as a reply of its newly arrived parent), no deadlock.
    """
    posts = PostPlugin()
    p1, r1 = uri(1, POST, "p1"), uri(2, POST, "r1")
    async with db.transaction():  # r1 replies to p1 (not yet known), naming another root
        await _apply(db, posts, "insert", _op(posts, 2, "r1", reply(uri(9, POST, "x"), p1)))
    one, two = await connect(database_url), await connect(database_url)
    try:
        tx_one, tx_two = one.transaction(), two.transaction()
        await tx_one.start()
        await _apply(one, posts, "insert", _op(posts, 3, "s1", reply(p1, r1)))  # shares r1
        await tx_two.start()
        deleting = asyncio.create_task(_apply(two, posts, "delete", _op(posts, 2, "r1", {})))
        await asyncio.sleep(0.3)
        assert not deleting.done()  # waiting for the lock on r1
        # p1 arrives: r1, its reply, becomes invalid; the row must not be held by the delete
        await asyncio.wait_for(_apply(one, posts, "insert", _op(posts, 1, "p1", post_record())), 5)
        assert await one.fetchval('SELECT "invalidReplyRoot" FROM post WHERE uri = $1', r1)
        await tx_one.commit()
        await asyncio.wait_for(deleting, 10)
        await tx_two.commit()
    finally:
        await one.close()
        await two.close()
    assert await rows(db, 'SELECT uri, "invalidReplyRoot" FROM post') == [
        (p1, None),
        (uri(3, POST, "s1"), None),
    ]


async def test_crossed_post_deletes_and_replies_in_two_batches_do_not_deadlock(
    settings, db, database_url
):
    """Batch A deletes p and replies to q; batch B deletes q and replies to p. A batch takes
    every post lock it needs in one statement before its first row, so B waits for A whole
    instead of holding q while A waits for it (a deadlock when each took its delete's locks,
    then its inserts')."""
    p, q = uri(1, POST, "p"), uri(2, POST, "q")
    database = Database(settings)
    await database.open()
    try:
        plain = Pipeline(database, registry())
        await plain.process(_batch(create(1, POST, "p", post_record(), 1),
                                   create(2, POST, "q", post_record(), 1)))  # fmt: skip
        gate = GatedDatabase(database_url, pause_at="DELETE FROM post ")
        paused = Pipeline(gate, registry())  # type: ignore[arg-type]
        a = asyncio.create_task(paused.process(_batch(
            delete(1, POST, "p", 2), create(3, POST, "r1", reply(q, q), 2))))  # fmt: skip
        await asyncio.wait_for(gate.reached.wait(), 10)  # A is about to delete p
        b = asyncio.create_task(plain.process(_batch(
            delete(2, POST, "q", 2), create(4, POST, "r2", reply(p, p), 2))))  # fmt: skip
        await asyncio.sleep(0.3)
        gate.go.set()
        outcomes = await asyncio.wait_for(asyncio.gather(a, b), 20)
    finally:
        await database.close()
    assert [len(o.done) for o in outcomes] == [2, 2]
    assert await rows(db, 'SELECT uri, "invalidReplyRoot" FROM post ORDER BY uri') == [
        (uri(3, POST, "r1"), None),
        (uri(4, POST, "r2"), None),
    ]
    await assert_no_drift(db)
