"""Property: any delivery order, with duplicates, ends in the state a simple model predicts."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from indexer.config import Settings
from tests.helpers import (
    FOLLOW,
    LIKE,
    POST,
    assert_no_drift,
    create,
    delete,
    drain_replicas,
    follow_record,
    like_record,
    post_record,
    push,
    uri,
)

AUTHORS = (1, 2, 3)
RKEYS = ("a", "b", "c")
SUBJECT_POSTS = (uri(1, POST, "a"), uri(2, POST, "b"))


@dataclass(frozen=True)
class Step:
    author: int
    collection: str
    rkey: str
    delete: bool
    target: int  # which subject post, followed did, or (for posts) reply parent; 0 = none


steps = st.builds(
    Step,
    author=st.sampled_from(AUTHORS),
    collection=st.sampled_from((LIKE, FOLLOW, POST)),
    rkey=st.sampled_from(RKEYS),
    delete=st.booleans(),
    target=st.integers(min_value=0, max_value=2),
)


def history(plan: list[Step]) -> list[dict[str, object]]:
    """The true history: each repo's ops with strictly increasing revs."""
    events = []
    for n, step in enumerate(plan, start=1):
        if step.delete:
            events.append(delete(step.author, step.collection, step.rkey, n))
            continue
        if step.collection == LIKE:
            rec = like_record(SUBJECT_POSTS[step.target % 2])
        elif step.collection == FOLLOW:
            rec = follow_record(step.target + 1)
        else:
            rec = post_record("p", reply_to=SUBJECT_POSTS[step.target - 1] if step.target else None)
        events.append(create(step.author, step.collection, step.rkey, rec, n))
    return events


def model(events: list[dict[str, object]]) -> dict[str, Counter[str]]:
    """Expected counters: the highest rev of each record decides; likes/follows unique per pair."""
    final: dict[str, dict[str, object]] = {}
    for ev in events:
        key = f"at://{ev['did']}/{ev['collection']}/{ev['rkey']}"
        if key not in final or ev["rev"] > final[key]["rev"]:
            final[key] = ev
    live = [ev for ev in final.values() if ev["type"] == "create"]
    likes = {(ev["record"]["subject"]["uri"], ev["did"]) for ev in live if ev["collection"] == LIKE}
    follows = {(ev["did"], ev["record"]["subject"]) for ev in live if ev["collection"] == FOLLOW}
    posts = [ev for ev in live if ev["collection"] == POST]
    # of the live records of one pair, the lowest uri is the original; the rest are duplicates
    pairs: dict[tuple[str, str, str], list[str]] = {}
    for ev in live:
        if ev["collection"] in (LIKE, FOLLOW):
            rec = ev["record"]
            subject = rec["subject"]["uri"] if ev["collection"] == LIKE else rec["subject"]
            key = (ev["collection"], ev["did"], subject)
            pairs.setdefault(key, []).append(f"at://{ev['did']}/{ev['collection']}/{ev['rkey']}")
    return {
        "likeCount": Counter(subject for subject, _ in likes),
        "followersCount": Counter(subject for _, subject in follows),
        "followsCount": Counter(creator for creator, _ in follows),
        "postsCount": Counter(str(ev["did"]) for ev in posts),
        "replyCount": Counter(
            ev["record"]["reply"]["parent"]["uri"] for ev in posts if "reply" in ev["record"]
        ),
        "live": Counter(f"at://{ev['did']}/{ev['collection']}/{ev['rkey']}" for ev in live),
        "originals": Counter(min(uris) for uris in pairs.values()),
        "duplicates": Counter(
            f"{uri}>{min(uris)}" for uris in pairs.values() for uri in uris if uri != min(uris)
        ),
    }


async def observed(conn: asyncpg.Connection) -> dict[str, Counter[str]]:
    async def counter(sql: str) -> Counter[str]:
        return Counter({r[0]: r[1] for r in await conn.fetch(sql) if r[1]})

    return {
        "likeCount": await counter('SELECT uri, "likeCount" FROM post_agg'),
        "followersCount": await counter('SELECT did, "followersCount" FROM profile_agg'),
        "followsCount": await counter('SELECT did, "followsCount" FROM profile_agg'),
        "postsCount": await counter('SELECT did, "postsCount" FROM profile_agg'),
        "replyCount": await counter('SELECT uri, "replyCount" FROM post_agg'),
        "live": await counter("SELECT uri, 1 FROM record"),
        "originals": await counter('SELECT uri, 1 FROM "like" UNION ALL SELECT uri, 1 FROM follow'),
        "duplicates": await counter(
            "SELECT uri || '>' || \"duplicateOf\", 1 FROM duplicate_record"
        ),
    }


async def _run(base: Settings, server: object, events: list[object], replicas: int) -> None:
    name = f"h_{uuid.uuid4().hex[:10]}"
    server.create_database(name, template="indexer_template")
    prefix = uuid.uuid4().hex[:8]
    settings = base.replace(
        database_url=server.dsn(name),
        streams=(f"{prefix}_live",),
        group=f"{prefix}_g",
        batch_size=3,
    )
    client = aioredis.Redis.from_url(settings.redis_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        await push(client, settings.live_stream, events)
        await drain_replicas(settings, replicas)
        expected = model(events)
        assert await observed(conn) == expected
        await assert_no_drift(conn)
    finally:
        await conn.close()
        await client.aclose()
        server.drop_database(name)


@hyp_settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    plan=st.lists(steps, min_size=1, max_size=25),
    order=st.randoms(use_true_random=False),
    repeats=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
    replicas=st.integers(min_value=1, max_value=3),
)
def test_any_order_with_duplicates_matches_model(
    settings, postgres_server, plan, order, repeats, replicas
):
    events = history(plan)
    delivered = events + [events[i % len(events)] for i in repeats]
    order.shuffle(delivered)
    asyncio.run(_run(settings, postgres_server, delivered, replicas))
