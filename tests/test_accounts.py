"""Accounts and identities: handles and statuses by event order, account deletion in chunks
with exact counters, and late events of a deleted account that must not bring anything back."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import asyncpg
import msgspec
import pytest

from indexer.config import Settings
from indexer.db import Database
from indexer.deletion import AccountDeletions
from indexer.events import normalize_line
from indexer.metrics import Metrics
from indexer.pipeline import Pipeline
from indexer.reconcile import reconcile
from indexer.replica import Replica
from indexer.workload import generate
from plugins import registry
from tests.helpers import (
    BLOCK,
    FOLLOW,
    LIKE,
    POST,
    PROFILE,
    REPOST,
    T0,
    assert_no_drift,
    create,
    delete,
    did,
    drain_replicas,
    follow_record,
    like_record,
    post_record,
    push,
    repost_record,
    rev,
    rows,
    snapshot,
    uri,
)
from tests.test_races import GatedDatabase, _batch

GONE = "2024-11-19T09:00:00.000Z"  # the deletion; the records' events are at T0, earlier
LATER = "2024-11-19T10:00:00.000Z"


def account(n: int, status: str | None, *, active: bool = False, time: str = GONE,
            seq: int = 1000) -> dict[str, Any]:  # fmt: skip
    return {"type": "account", "seq": seq, "time": time, "did": did(n), "active": active,
            "status": status}  # fmt: skip


def identity(n: int, handle: str | None, time: str, seq: int = 0) -> dict[str, Any]:
    return {"type": "identity", "seq": seq, "time": time, "did": did(n), "handle": handle}


def _world() -> list[dict[str, Any]]:
    """Account 1 posts, is liked, replied to, quoted, reposted and followed; it likes, replies
    to, reposts and quotes account 2's post, follows 2 and 3, blocks 3, has a profile and a
    duplicate like."""
    p1, q2 = uri(1, POST, "p1"), uri(2, POST, "q2")
    return [
        create(2, POST, "q2", post_record("theirs"), 1),
        create(1, POST, "p1", post_record("mine"), 2),
        create(1, POST, "p2", post_record("reply", reply_to=q2), 3),
        create(1, POST, "p3", post_record("quote", quote=q2), 4),
        create(1, LIKE, "l1", like_record(q2), 5),
        create(1, LIKE, "l2", like_record(q2), 6),  # duplicate of l1
        create(1, REPOST, "r1", repost_record(q2), 7),
        create(1, FOLLOW, "f1", follow_record(2), 8),
        create(1, FOLLOW, "f2", follow_record(3), 9),
        create(1, BLOCK, "b1", follow_record(3), 10),
        create(1, PROFILE, "self", {"$type": PROFILE, "displayName": "one"}, 11),
        create(2, LIKE, "k1", like_record(p1), 12),
        create(3, LIKE, "k2", like_record(p1), 13),
        create(2, POST, "q3", post_record("reply to 1", reply_to=p1), 14),
        create(3, POST, "q4", post_record("quote of 1", quote=p1), 15),
        create(4, REPOST, "s1", repost_record(p1), 16),
        create(4, FOLLOW, "g1", follow_record(1), 17),
        create(3, LIKE, "k3", like_record(q2), 18),
    ]


async def _counts(db: asyncpg.Connection) -> dict[str, tuple[int, ...]]:
    posts = await db.fetch(
        'SELECT uri, "likeCount", "repostCount", "replyCount", "quoteCount" FROM post_agg'
    )
    profiles = await db.fetch(
        'SELECT did, "followersCount", "followsCount", "postsCount" FROM profile_agg'
    )
    found = {r["uri"].rsplit("/", 1)[1]: tuple(r)[1:] for r in posts}
    found |= {r["did"][-4:]: tuple(r)[1:] for r in profiles}
    return found


async def _records_of(db: asyncpg.Connection, author: int) -> int:
    return int(await db.fetchval("SELECT count(*) FROM record WHERE did = $1", did(author)))


async def test_a_drained_replica_waits_out_an_outage_before_its_last_deletions(
    settings, redis, drain, postgres_server, monkeypatch
):
    """Drained, a replica runs the account deletions still pending. PostgreSQL going down just
    then is waited out: it used to end the run with ConnectionRefusedError."""
    await push(redis, settings.live_stream, _world())
    await drain()
    await push(redis, settings.live_stream, [account(1, "deleted")])
    replica = Replica(settings, registry(), Metrics())
    run_pending = replica.deletions.run_pending
    calls = 0
    restarted: list[asyncio.Task[None]] = []

    async def restart_soon() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(postgres_server.restart)

    async def after_an_outage(*args: Any, **kwargs: Any) -> int:
        nonlocal calls
        if not kwargs.get("wait"):
            return 0  # the chore's polls find nothing: the deletion is left to the last step
        calls += 1
        if calls == 1:
            postgres_server.kill()
            restarted.append(asyncio.create_task(restart_soon()))
        return await run_pending(*args, **kwargs)

    monkeypatch.setattr(replica.deletions, "run_pending", after_an_outage)
    try:
        await asyncio.wait_for(replica.run(drain=True), 60)
    finally:
        await asyncio.gather(*restarted)  # PostgreSQL is up again for the next tests
    assert calls >= 2
    assert replica.deletions.records_deleted > 0
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await _records_of(conn, 1) == 0
        assert await conn.fetchval("SELECT count(*) FROM account_fence WHERE pending") == 0
    finally:
        await conn.close()
    assert await redis.xlen(f"{settings.live_stream}:dlq") == 0


async def test_a_stop_during_that_outage_leaves_the_deletion_pending(
    settings, redis, drain, postgres_server, monkeypatch
):
    """Stopped while it waits the outage out, the drained replica exits without the deletion;
    its fence stays pending for the next start, which runs it."""
    await push(redis, settings.live_stream, _world())
    await drain()
    await push(redis, settings.live_stream, [account(1, "deleted")])
    replica = Replica(settings, registry(), Metrics())
    run_pending = replica.deletions.run_pending
    failed = asyncio.Event()

    async def down(*args: Any, **kwargs: Any) -> int:
        if not kwargs.get("wait"):
            return 0  # the chore's polls find nothing: the deletion is left to the last step
        postgres_server.kill()
        try:
            return await run_pending(*args, **kwargs)
        finally:
            failed.set()

    monkeypatch.setattr(replica.deletions, "run_pending", down)
    run = asyncio.create_task(replica.run(drain=True))
    try:
        await asyncio.wait_for(failed.wait(), 30)
        replica.stop()
        await asyncio.wait_for(run, 10)  # PostgreSQL is still down
    finally:
        await asyncio.to_thread(postgres_server.restart)
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM account_fence WHERE pending") == 1
        assert await _records_of(conn, 1) > 0
        await drain()  # the next start
        assert await conn.fetchval("SELECT count(*) FROM account_fence WHERE pending") == 0
        assert await _records_of(conn, 1) == 0
    finally:
        await conn.close()


async def test_deletion_removes_the_account_and_decrements_exactly(settings, redis, db, drain):
    await push(redis, settings.live_stream, _world())
    await drain()
    before = await _counts(db)
    assert before["q2"] == (2, 1, 1, 1)  # likes by 1 (l1; l2 a duplicate) and 3, 1's repost...
    assert before["p1"] == (2, 1, 1, 1)
    assert before["0001"] == (1, 2, 3)
    assert (before["0002"], before["0003"]) == ((1, 0, 2), (1, 0, 1))
    await push(redis, settings.live_stream, [account(1, "deleted")])
    await drain()
    after = await _counts(db)
    assert after["q2"] == (1, 0, 0, 0)  # only 3's like is left
    assert after["p1"] == (2, 1, 1, 1)  # others' likes, reply, quote and repost stay
    assert after["0001"] == (1, 0, 0)  # still followed by 4
    assert (after["0002"], after["0003"]) == ((0, 0, 2), (0, 0, 1))
    assert after["0004"] == before["0004"] == (0, 1, 0)
    assert await _records_of(db, 1) == 0
    for table in ("post", "like", "repost", "follow", "actor_block", "profile"):
        n = await db.fetchval(f'SELECT count(*) FROM "{table}" WHERE creator = $1', did(1))
        assert n == 0, table
    assert await db.fetchval("SELECT count(*) FROM duplicate_record") == 0
    assert (
        await db.fetchval("SELECT count(*) FROM quote WHERE uri LIKE $1", f"at://{did(1)}/%") == 0
    )
    assert await db.fetchval(
        'SELECT count(*) FROM feed_item WHERE "originatorDid" = $1', did(1)
    ) == 0  # fmt: skip
    assert (
        await db.fetchval("SELECT count(*) FROM record_state WHERE did = $1 AND live", did(1)) == 0
    )
    actor = await db.fetchrow('SELECT handle, "upstreamStatus" FROM actor WHERE did = $1', did(1))
    assert (actor["handle"], actor["upstreamStatus"]) == (None, "deleted")
    fence = await db.fetchrow('SELECT "deletedAt", pending FROM account_fence')
    assert (fence["deletedAt"], fence["pending"]) == (GONE, False)
    dirty = {(r["kind"], r["key"]) for r in await db.fetch("SELECT kind, key FROM dirty_counter")}
    assert ("post_agg", uri(2, POST, "q2")) in dirty
    assert ("profile_agg", did(2)) in dirty and ("profile_agg", did(1)) in dirty
    assert await _records_of(db, 2) == 3 and await _records_of(db, 4) == 2
    await assert_no_drift(db)

    # Replaying everything, in any order, changes nothing: the old events are fenced.
    state = await snapshot(db)
    await push(redis, settings.live_stream, [*reversed(_world()), account(1, "deleted")])
    await push(redis, settings.live_stream, _world())
    await drain(replicas=2, batch_size=3)
    assert await snapshot(db) == state
    assert await _counts(db) == after
    await assert_no_drift(db)


async def test_late_events_do_not_resurrect_and_newer_ones_apply(settings, redis, db, drain):
    q2 = uri(2, POST, "q2")
    await push(redis, settings.live_stream, [create(2, POST, "q2", post_record(), 1)])
    await push(redis, settings.live_stream, [account(1, "deleted")])  # before any of 1's events
    await drain()
    late = [
        create(1, LIKE, "l1", like_record(q2), 5),
        create(1, FOLLOW, "f1", follow_record(2), 6),
        create(1, POST, "p1", post_record(), 7) | {"time": GONE},  # same time as the deletion
    ]
    newer = create(1, LIKE, "l9", like_record(q2), 9) | {"time": LATER}
    await push(redis, settings.live_stream, [*late, newer])
    await drain()
    assert await _records_of(db, 1) == 1
    assert await db.fetchval('SELECT uri FROM "like"') == uri(1, LIKE, "l9")
    counts = await _counts(db)
    assert counts["q2"] == (1, 0, 0, 0) and counts["0002"] == (0, 0, 1)
    states = await db.fetch("SELECT uri, live FROM record_state WHERE did = $1", did(1))
    assert sorted((r["uri"].rsplit("/", 1)[1], r["live"]) for r in states) == [
        ("f1", False), ("l1", False), ("l9", True), ("p1", False)
    ]  # fmt: skip
    await assert_no_drift(db)


async def test_takedown_suspension_deactivation_keep_rows(settings, redis, db, drain):
    events = [create(n, POST, "p", post_record(), n) for n in (1, 2, 3, 4)]
    events += [
        account(1, "takendown"),
        account(2, "suspended"),
        account(3, "deactivated"),
        account(4, "deactivated", time=T0),
        account(4, None, active=True, time=LATER),  # reactivated later ...
        account(4, "takendown", time=GONE),  # ... which an older event does not undo
    ]
    await push(redis, settings.live_stream, events)
    await drain()
    rows = await db.fetch('SELECT did, "upstreamStatus" FROM actor ORDER BY did')
    assert [r["upstreamStatus"] for r in rows] == ["takendown", "suspended", "deactivated", None]
    assert await db.fetchval("SELECT count(*) FROM post") == 4
    assert await db.fetchval("SELECT count(*) FROM account_fence") == 0
    await assert_no_drift(db)


async def test_identity_sets_handles_newest_first_whatever_the_order(settings, redis, db, drain):
    t1, t2, t3 = "2024-11-19T07:00:00.000Z", "2024-11-19T08:00:00.000Z", GONE
    events = [
        identity(1, "Alice.example", t2),
        identity(1, "old.example", t1),  # older: ignored
        identity(2, "bob.example", t1),  # an actor row even without records
        identity(3, "shared.example", t2),
        identity(4, "shared.example", t1),  # 3 took it later: 4 gets none
        identity(5, "gone.example", t1),
        identity(5, None, t3),  # a null handle clears it
    ]
    for order in (events, list(reversed(events))):
        await db.execute("TRUNCATE actor, account_state")
        await push(redis, settings.live_stream, order)
        await drain()
        rows = await db.fetch("SELECT did, handle FROM actor ORDER BY did")
        assert [r["handle"] for r in rows] == [
            "alice.example", "bob.example", "shared.example", None, None
        ]  # fmt: skip
    # a newer claim takes the handle from its holder
    await push(redis, settings.live_stream, [identity(4, "shared.example", t3)])
    await drain()
    rows = await db.fetch("SELECT did, handle FROM actor WHERE handle = 'shared.example'")
    assert [r["did"] for r in rows] == [did(4)]
    assert await db.fetchval("SELECT handle FROM actor WHERE did = $1", did(3)) is None


async def test_repo_events_record_the_newest_rev(settings, redis, db, drain):
    def repo(rev: str, commit: str) -> dict[str, Any]:
        return {"type": "repo", "seq": 1, "time": T0, "did": did(1), "commit": commit, "rev": rev}

    await push(redis, settings.live_stream, [repo("3kb", "bafyb"), repo("3ka", "bafya")])
    await drain()
    row = await db.fetchrow('SELECT "commitCid", "repoRev" FROM actor_sync')
    assert (row["commitCid"], row["repoRev"]) == ("bafyb", "3kb")


async def _open(settings: Settings) -> Database:
    database = Database(settings)
    await database.open()
    return database


class _Crash(Exception):
    pass


async def test_an_interrupted_deletion_resumes(settings, redis, db, drain):
    await push(redis, settings.live_stream, _world())
    await drain()
    database = await _open(settings)
    try:
        await Pipeline(database, registry()).process(_batch(account(1, "deleted")))
        assert await _records_of(db, 1) == 10  # the batch only wrote the fence

        class Crashing(AccountDeletions):
            async def _delete_chunk(self, *args: Any) -> tuple[str, int]:
                if self.records_deleted >= 4:
                    raise _Crash  # the process dies after two chunks
                return await super()._delete_chunk(*args)

        with pytest.raises(_Crash):
            await Crashing(database, registry(), chunk_size=2).run_pending()
        assert await _records_of(db, 1) == 6
        assert await db.fetchval("SELECT pending FROM account_fence") is True
        await assert_no_drift(db)  # each chunk committed whole
        assert await AccountDeletions(database, registry(), chunk_size=3).run_pending() == 1
    finally:
        await database.close()
    assert await _records_of(db, 1) == 0
    assert await db.fetchval("SELECT pending FROM account_fence") is False
    assert (await _counts(db))["q2"] == (1, 0, 0, 0)
    await assert_no_drift(db)


@pytest.mark.parametrize("held", ["before its commit", "right after its fence read"])
async def test_deletion_waits_for_a_batch_that_read_no_fence(settings, db, database_url, held):
    """A batch with an old like of account 1 has read "no fence" and is held while the deletion
    commits; the deletion must wait for it and then remove that like too. Held right after its
    fence read, the batch has written nothing yet: only the transaction id its fence read took
    makes the deletion wait for it (else its like would outlive the account)."""
    q2 = uri(2, POST, "q2")
    database = await _open(settings)
    try:
        plain = Pipeline(database, registry())
        await plain.process(_batch(create(2, POST, "q2", post_record(), 1), identity(1, None, T0)))
        if held == "before its commit":
            gate = GatedDatabase(database_url, hold_commit=True)
            arrived, release = gate.before_commit, gate.release
        else:
            gate = GatedDatabase(database_url, pause_at="INSERT INTO record_state")
            arrived, release = gate.reached, gate.go
        paused = Pipeline(gate, registry())  # type: ignore[arg-type]
        batch = asyncio.create_task(
            paused.process(_batch(create(1, LIKE, "l1", like_record(q2), 5)))
        )
        await arrived.wait()
        await plain.process(_batch(account(1, "deleted")))
        deletion = asyncio.create_task(AccountDeletions(database, registry()).run_pending())
        await asyncio.sleep(0.3)
        assert not deletion.done()  # waiting for the held batch
        release.set()
        await batch
        assert await asyncio.wait_for(deletion, 10) == 1
    finally:
        await database.close()
    assert await db.fetchval('SELECT count(*) FROM "like"') == 0
    assert await db.fetchval('SELECT "likeCount" FROM post_agg WHERE uri = $1', q2) == 0
    await assert_no_drift(db)


async def test_a_deleted_account_record_deleted_later_stays_deleted(settings, redis, db, drain):
    q2 = uri(2, POST, "q2")
    first = [create(2, POST, "q2", post_record(), 1), create(1, LIKE, "l1", like_record(q2), 5)]
    then = [account(1, "deleted"), delete(1, LIKE, "l1", 6) | {"time": LATER}]
    for events in (first, then, first):
        await push(redis, settings.live_stream, events)
        await drain()
    state = await db.fetchrow("SELECT rev, live FROM record_state WHERE did = $1", did(1))
    assert (state["rev"], state["live"]) == (rev(6), False)
    assert (await _counts(db)).get("q2", (0, 0, 0, 0)) == (0, 0, 0, 0)
    await assert_no_drift(db)


async def _blocked_on_a_lock(db: asyncpg.Connection) -> None:
    """Until some other session waits on a row or advisory lock."""
    sql = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    for _ in range(500):
        if await db.fetchval(sql):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no session ever waited on a lock")


async def test_taking_a_handle_never_clears_the_holders_new_handle(settings, db, database_url):
    """Account 2 moves from h1 to h2 in one batch while account 1 claims h1 in another: the
    claim must clear 2's handle only if it is still h1, never wipe the h2 it just took."""
    t1, t2, t3 = "2024-11-19T07:00:00.000Z", "2024-11-19T08:00:00.000Z", LATER
    database = await _open(settings)
    try:
        plain = Pipeline(database, registry())
        await plain.process(_batch(identity(2, "h1.example", t1), identity(1, None, t1)))
        gate = GatedDatabase(database_url, hold_commit=True)
        moving = Pipeline(gate, registry())  # type: ignore[arg-type]
        move = asyncio.create_task(moving.process(_batch(identity(2, "h2.example", t3))))
        await gate.before_commit.wait()
        claim = asyncio.create_task(plain.process(_batch(identity(1, "h1.example", t2))))
        await _blocked_on_a_lock(db)  # the claim waits on account 2's row
        gate.release.set()
        await asyncio.wait_for(asyncio.gather(move, claim), 10)
    finally:
        await database.close()
    rows = await db.fetch("SELECT did, handle FROM actor ORDER BY did")
    assert [(r["did"], r["handle"]) for r in rows] == [
        (did(1), "h1.example"), (did(2), "h2.example")
    ]  # fmt: skip


async def test_deletions_amid_the_live_stream_decrement_exactly(settings, redis, db):
    """The three busiest authors are deleted halfway through a workload that two replicas index
    in small batches while the deletions run: their records from before the deletion are gone,
    those after it are indexed, and every counter equals count(*)."""
    events = [msgspec.json.decode(normalize_line(e)) for e in generate(3000, seed=11, accounts=60)]
    half = len(events) // 2
    busiest = Counter(e["did"] for e in events[:half] if e["type"] == "create").most_common(3)
    gone_at = events[half]["time"]
    seq = events[half]["seq"]
    deletions = [account(1, "deleted", time=gone_at, seq=seq) | {"did": d} for d, _ in busiest]
    await push(redis, settings.live_stream, events[:half])
    await drain_replicas(settings, 1)
    dids = [d for d, _ in busiest]
    before = await db.fetchval("SELECT count(*) FROM record WHERE did = ANY($1)", dids)
    assert before > 30
    await push(redis, settings.live_stream, [*events[half : half + 50], *deletions])
    await push(redis, settings.live_stream, events[half + 50 :])
    await drain_replicas(settings.replace(batch_size=7), 2)
    old = await db.fetchval(
        'SELECT count(*) FROM record_state WHERE did = ANY($1) AND live AND "updatedAt" <= $2',
        dids,
        gone_at,
    )
    assert old == 0
    newer = await db.fetchval(
        'SELECT count(*) FROM record_state WHERE did = ANY($1) AND live AND "updatedAt" > $2',
        dids,
        gone_at,
    )
    assert newer > 0  # what they did after the deletion is indexed
    assert await db.fetchval("SELECT count(*) FROM account_fence WHERE pending") == 0
    statuses = await db.fetch('SELECT "upstreamStatus" FROM actor WHERE did = ANY($1)', dids)
    assert [r["upstreamStatus"] for r in statuses] == ["deleted"] * 3
    assert await db.fetchval("SELECT count(*) FROM dirty_counter") > 0
    await assert_no_drift(db)
    repaired = await reconcile(settings.database_url, "dirty")
    assert repaired.checked > 0 and repaired.drifted == 0


async def test_a_claim_and_the_holders_move_in_one_batch_end_as_in_two(settings, db):
    """2 holds h1; 1 claims it (t2), then 2 moves to h2 (t3). In one batch or two, 1 ends
    with h1: 2's newer key is for h2, not for the h1 that 1's claim is compared with."""
    t1, t2, t3 = "2024-11-19T07:00:00.000Z", "2024-11-19T08:00:00.000Z", LATER
    claim, move = identity(1, "h1.example", t2), identity(2, "h2.example", t3)
    database = await _open(settings)
    try:
        pipeline = Pipeline(database, registry())
        for batches in ([[claim], [move]], [[claim, move]], [[move, claim]]):
            await db.execute("TRUNCATE actor, account_state")
            await pipeline.process(_batch(identity(2, "h1.example", t1)))
            for events in batches:
                await pipeline.process(_batch(*events))
            rows = await db.fetch("SELECT did, handle FROM actor ORDER BY did")
            assert [r["handle"] for r in rows] == ["h1.example", "h2.example"], batches
    finally:
        await database.close()


async def test_a_freed_handle_goes_to_its_newest_remaining_claimant_in_any_order(settings, db):
    """Handles follow the newest claims, however the events are ordered and batched: account 1's
    older claim of h1 wins it once 2 moves on to h2; 3's claim of h2 loses to 2's newer one;
    4's deletion frees h3 for 5."""
    t0, t1, t2, t3 = (f"2024-11-19T0{h}:00:00.000Z" for h in (5, 6, 7, 8))
    events = [
        identity(2, "h1.example", t1),
        identity(1, "h1.example", t0),
        identity(2, "h2.example", t3),
        identity(3, "h2.example", t2),
        identity(4, "h3.example", t1),
        account(4, "deleted", time=t2),
        identity(5, "h3.example", t0),
    ]
    expected = [(did(1), "h1.example"), (did(2), "h2.example"), (did(3), None), (did(4), None),
                (did(5), "h3.example")]  # fmt: skip
    database = await _open(settings)
    try:
        pipeline = Pipeline(database, registry())
        for seed in range(8):
            shuffled = events[:]
            random.Random(seed).shuffle(shuffled)
            cuts = sorted(random.Random(seed + 100).sample(range(1, len(events)), seed % 4))
            batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]
            for batch in batches:
                await pipeline.process(_batch(*batch))
            got = await rows(db, "SELECT did, handle FROM actor ORDER BY did")
            assert got == expected, (seed, [[e["did"][-1] for e in b] for b in batches])
            await db.execute("TRUNCATE actor, account_state, account_fence")
    finally:
        await database.close()
