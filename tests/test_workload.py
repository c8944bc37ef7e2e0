"""The workload generator (indexer/workload.py): deterministic, realistic, self-consistent."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard

from indexer import workload
from indexer.workload import (
    BLOCK,
    FOLLOW,
    LIKE,
    POST,
    PROFILE,
    REPOST,
    did_for,
    generate,
    make_cid,
    tid,
    write_jsonl,
)

N = 50_000
SEED = 11

DID_RE = re.compile(r"^did:plc:[a-z2-7]{24}$")
TID_RE = re.compile(r"^[234567a-j][234567a-z]{12}$")
CID_RE = re.compile(r"^bafyrei[a-z2-7]{52}$")
ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
COLLECTIONS = {LIKE, POST, REPOST, FOLLOW, BLOCK, PROFILE}

Event = dict[str, Any]


@pytest.fixture(scope="module")
def events() -> list[Event]:
    decode = msgspec.json.Decoder(dict[str, Any]).decode  # strict JSON, one object per event
    return [decode(raw) for raw in generate(N, seed=SEED)]


_commits_cache: dict[int, list[dict[str, Any]]] = {}


def commits(events: list[Event]) -> list[dict[str, Any]]:
    """The commit events flattened ({did, rev, operation, collection, rkey, record?, cid?})."""
    key = id(events)
    if key not in _commits_cache:
        _commits_cache.clear()
        _commits_cache[key] = [
            {"did": e["did"], **e["commit"]} for e in events if e["kind"] == "commit"
        ]
    return _commits_cache[key]


def pct(part: int, whole: int) -> float:
    return 100.0 * part / whole


def check_lifecycle(events: list[Event]) -> Counter[str]:
    """Every delete hits a live record created earlier; no live record is re-created; updates
    are of profiles (created earlier, or before the stream began)."""
    live: set[tuple[str, str, str]] = set()
    ops: Counter[str] = Counter()
    for c in commits(events):
        key = (c["did"], c["collection"], c["rkey"])
        op = c["operation"]
        ops[op] += 1
        if op == "create":
            assert key not in live, key
            live.add(key)
        elif op == "update":
            assert c["collection"] == PROFILE
            live.add(key)
        else:
            assert op == "delete"
            assert key in live, key
            live.remove(key)
    return ops


# -- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes() -> None:
    first = list(generate(3000, seed=5))
    assert len(first) == 3000
    assert first == list(generate(3000, seed=5))
    assert all(isinstance(raw, bytes) and b"\n" not in raw for raw in first)


def test_the_stream_without_a_celebrity_is_pinned() -> None:
    """Benchmark runs compare across commits: the default stream's bytes must not drift."""
    digest = hashlib.sha256(b"\n".join(generate(5000, seed=1))).hexdigest()
    assert digest == "9b7a3d83d828ee318f835d8630067117ad4f470b440b89432a4d4fb61fb13baa"
    assert list(generate(3000, seed=5, celebrity=0.0)) == list(generate(3000, seed=5))


def test_different_seeds_differ() -> None:
    a = list(generate(1000, seed=5))
    b = list(generate(1000, seed=6))
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 990


def test_start_time_and_accounts_parameters() -> None:
    evs = [json.loads(raw) for raw in generate(2000, seed=2, accounts=50, start_time_us=10**15)]
    assert len({e["did"] for e in evs}) <= 50
    assert {e["did"] for e in evs} <= {did_for(i) for i in range(50)}
    assert 10**15 < evs[0]["time_us"] < 10**15 + 10_000


def test_primitives() -> None:
    assert tid(0) == "2222222222222"
    assert tid((1 << 53) - 1, 1023) == "bzzzzzzzzzzzz"
    assert tid(1_732_000_000_000_000, 1) < tid(1_732_000_000_000_001, 0)
    assert TID_RE.match(tid(1_732_000_000_000_000, 7))
    assert did_for(7) == did_for(7) != did_for(8)
    assert DID_RE.match(did_for(123_456))
    assert CID_RE.match(make_cid(b"x"))
    assert make_cid("x") == make_cid(b"x") != make_cid("y")


# -- shape -------------------------------------------------------------------------------------


def check_commit(c: dict[str, Any]) -> None:
    assert TID_RE.match(c["rev"])
    assert c["collection"] in COLLECTIONS
    assert c["rkey"] == "self" if c["collection"] == PROFILE else TID_RE.match(c["rkey"])
    if c["operation"] == "delete":
        assert "record" not in c
        assert "cid" not in c
        return
    assert c["operation"] in {"create", "update"}
    assert CID_RE.match(c["cid"])
    record = c["record"]
    assert record["$type"] == c["collection"]
    assert ISO_RE.match(record["createdAt"])
    if c["collection"] in {LIKE, REPOST}:
        assert set(record["subject"]) == {"uri", "cid"}
    elif c["collection"] in {FOLLOW, BLOCK}:
        assert DID_RE.match(record["subject"])
    elif c["collection"] == POST:
        assert isinstance(record["text"], str)
        assert len(record["text"]) <= 300


def test_every_event_has_the_jetstream_fields(events: list[Event]) -> None:
    kinds: Counter[str] = Counter()
    for e in events:
        kinds[e["kind"]] += 1
        assert DID_RE.match(e["did"])
        assert isinstance(e["time_us"], int)
        if e["kind"] == "commit":
            check_commit(e["commit"])
        elif e["kind"] == "identity":
            body = e["identity"]
            assert body["did"] == e["did"]
            assert body["handle"].endswith(".bsky.social")
            assert isinstance(body["seq"], int)
            assert ISO_RE.match(body["time"])
        else:
            assert e["kind"] == "account"
            body = e["account"]
            assert body["active"] is True
            assert body["did"] == e["did"]
            assert isinstance(body["seq"], int)
            assert ISO_RE.match(body["time"])
    other = kinds["identity"] + kinds["account"]
    assert kinds["identity"] > 0
    assert kinds["account"] > 0
    assert 0.2 <= pct(other, N) <= 1.0, kinds


# -- mix ---------------------------------------------------------------------------------------


def test_collection_mix(events: list[Event]) -> None:
    cs = commits(events)
    shares = Counter(c["collection"] for c in cs)
    total = len(cs)
    for collection, target in ((LIKE, 61), (FOLLOW, 16), (POST, 15), (REPOST, 7)):
        assert abs(pct(shares[collection], total) - target) <= 2, (collection, shares)
    rest = pct(shares[BLOCK] + shares[PROFILE], total)
    assert 0.5 <= rest <= 3, shares
    assert shares[BLOCK] > 0
    assert shares[PROFILE] > 0


def test_operation_mix_and_lifecycle(events: list[Event]) -> None:
    ops = check_lifecycle(events)
    total = sum(ops.values())
    assert abs(pct(ops["create"], total) - 91) <= 2, ops
    assert abs(pct(ops["delete"], total) - 8) <= 2, ops
    assert 0.5 <= pct(ops["update"], total) <= 1.5, ops


def test_lifecycle_holds_when_the_bounded_pools_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workload, "CREATED_POOL", 300)
    monkeypatch.setattr(workload, "POST_POOL", 200)
    monkeypatch.setattr(workload, "RECENT_LIKES", 50)
    monkeypatch.setattr(workload, "SEEN_PAIRS", 500)
    gen = workload._Generator(3, 1000, workload.DEFAULT_START_TIME_US)
    evs = [gen.next_event() for _ in range(12_000)]
    ops = check_lifecycle(evs)
    assert ops["delete"] > 700
    assert len(gen.created) <= 300
    assert len(gen.posts) <= 200
    assert len(gen.recent_likes) <= 50
    assert len(gen.seen_new) < 500
    assert len(gen.seen_old) <= 500


# -- ordering ----------------------------------------------------------------------------------


def test_time_and_revs_increase(events: list[Event]) -> None:
    times = [e["time_us"] for e in events]
    assert all(a < b for a, b in pairwise(times))
    mean_gap = (times[-1] - times[0]) / (len(times) - 1)
    assert 900 <= mean_gap <= 1100  # ~1000 events per simulated second
    last_rev: dict[str, str] = {}
    for c in commits(events):
        prev = last_rev.get(c["did"])
        assert prev is None or prev < c["rev"], (c["did"], prev, c["rev"])
        last_rev[c["did"]] = c["rev"]
    assert len(last_rev) <= max(1000, N // 20)


# -- references --------------------------------------------------------------------------------


def check_post_refs(events: list[Event]) -> None:
    """Likes, reposts, replies and quotes reference posts created earlier, by strong ref."""
    cid_of: dict[str, str] = {}
    root_of: dict[str, str] = {}
    for c in commits(events):
        if c["operation"] != "create":
            continue
        record = c["record"]
        if c["collection"] in {LIKE, REPOST}:
            assert cid_of[record["subject"]["uri"]] == record["subject"]["cid"]
        if c["collection"] != POST:
            continue
        uri = f"at://{c['did']}/{POST}/{c['rkey']}"
        cid_of[uri] = c["cid"]
        root_of[uri] = uri
        if "reply" in record:
            parent, root = record["reply"]["parent"], record["reply"]["root"]
            assert cid_of[parent["uri"]] == parent["cid"]
            assert cid_of[root["uri"]] == root["cid"]
            assert root["uri"] == root_of[parent["uri"]]
            root_of[uri] = root["uri"]
        if "embed" in record:
            quoted = record["embed"]["record"]
            assert record["embed"]["$type"] == "app.bsky.embed.record"
            assert cid_of[quoted["uri"]] == quoted["cid"]


def test_subjects_reference_earlier_posts(events: list[Event]) -> None:
    check_post_refs(events)
    posts = [c["record"] for c in commits(events) if c["collection"] == POST and "record" in c]
    replies = sum("reply" in p for p in posts)
    quotes = sum("embed" in p for p in posts)
    nested = sum(
        "reply" in p and p["reply"]["root"]["uri"] != p["reply"]["parent"]["uri"] for p in posts
    )
    assert 25 <= pct(replies, len(posts)) <= 35
    assert 3 <= pct(quotes, len(posts)) <= 7
    assert nested > 0
    assert any("facets" in p for p in posts)
    assert any("tags" in p for p in posts)
    assert pct(sum(p.get("langs") == ["en"] for p in posts), len(posts)) > 70


def test_subjects_are_zipf_hot(events: list[Event]) -> None:
    cs = [c for c in commits(events) if c["operation"] == "create"]
    likes = Counter(c["record"]["subject"]["uri"] for c in cs if c["collection"] == LIKE)
    total_likes = sum(likes.values())
    hottest_post, hottest_likes = likes.most_common(1)[0]
    assert pct(hottest_likes, total_likes) >= 1.0, (hottest_post, hottest_likes, total_likes)
    # the top 1% of liked posts take a large share of all likes
    top = sum(count for _, count in likes.most_common(max(1, len(likes) // 100)))
    assert pct(top, total_likes) >= 20
    follows = Counter(c["record"]["subject"] for c in cs if c["collection"] == FOLLOW)
    assert pct(follows.most_common(1)[0][1], sum(follows.values())) >= 1.0


def test_about_one_percent_of_likes_are_duplicates(events: list[Event]) -> None:
    seen: set[tuple[str, str]] = set()
    duplicates = 0
    likes = 0
    for c in commits(events):
        if c["operation"] == "create" and c["collection"] == LIKE:
            likes += 1
            pair = (c["did"], c["record"]["subject"]["uri"])
            duplicates += pair in seen
            seen.add(pair)
    assert 0.5 <= pct(duplicates, likes) <= 2.5, (duplicates, likes)


def test_follows_are_never_self_follows(events: list[Event]) -> None:
    graph = [c for c in commits(events) if c["operation"] == "create"]
    assert all(
        c["record"]["subject"] != c["did"] for c in graph if c["collection"] in {FOLLOW, BLOCK}
    )


# -- celebrity ---------------------------------------------------------------------------------

CELEBRITY_N = 20_000
CELEBRITY = 0.4


@pytest.fixture(scope="module")
def celebrity_events() -> list[Event]:
    return [json.loads(raw) for raw in generate(CELEBRITY_N, seed=SEED, celebrity=CELEBRITY)]


def test_a_celebrity_takes_its_share_of_likes_reposts_and_follows(
    celebrity_events: list[Event],
) -> None:
    creates = [c for c in commits(celebrity_events) if c["operation"] == "create"]
    first = next(c for c in creates if c["collection"] == POST)
    star_post, star = f"at://{first['did']}/{POST}/{first['rkey']}", first["did"]
    fans = {did_for(i) for i in range(1000, 1000 + CELEBRITY_N)}  # accounts default to 1000
    for collection, subject_of, celebrity in (
        (LIKE, lambda r: r["subject"]["uri"], star_post),
        (REPOST, lambda r: r["subject"]["uri"], star_post),
        (FOLLOW, lambda r: r["subject"], star),
    ):
        made = [c for c in creates if c["collection"] == collection]
        to_star = [c for c in made if subject_of(c["record"]) == celebrity]
        by_fans = [c for c in to_star if c["did"] in fans]
        assert abs(len(by_fans) / len(made) - CELEBRITY) <= 0.03, (collection, len(made))
        # the usual draw may add some (the first post is the hottest of the Zipf pool too)
        assert CELEBRITY - 0.03 <= len(to_star) / len(made) <= CELEBRITY + 0.1, collection
        assert all(subject_of(c["record"]) == celebrity for c in made if c["did"] in fans)
    # the fans are new accounts, and the n-th celebrity like comes from the n-th fan
    fan_likes = [c["did"] for c in creates if c["collection"] == LIKE and c["did"] in fans]
    distinct = list(dict.fromkeys(fan_likes))
    assert distinct == [did_for(1000 + n) for n in range(len(distinct))]


def test_fans_like_and_follow_the_celebrity_once(celebrity_events: list[Event]) -> None:
    ops = check_lifecycle(celebrity_events)
    check_post_refs(celebrity_events)
    pairs: Counter[tuple[str, str, str]] = Counter()
    for c in commits(celebrity_events):
        if c["operation"] == "create" and c["collection"] in {LIKE, REPOST, FOLLOW}:
            subject = c["record"]["subject"]
            pairs[
                (c["collection"], c["did"], subject if c["collection"] == FOLLOW else "post")
            ] += 1
            assert c["record"]["subject"] != c["did"]
    fans = {did_for(i) for i in range(1000, 1000 + CELEBRITY_N)}
    fan_pairs = {k: v for k, v in pairs.items() if k[1] in fans}
    repeated = {k: v for k, v in fan_pairs.items() if v > 1}
    # fans do nothing but like, repost and follow the one celebrity: a pair twice is one of
    # the ~1% deliberate duplicate likes
    assert set(repeated) <= {k for k in fan_pairs if k[0] == LIKE}
    fan_likes = sum(v for k, v in fan_pairs.items() if k[0] == LIKE)
    assert sum(v - 1 for v in repeated.values()) <= 0.015 * fan_likes
    assert all(c["did"] not in fans for c in commits(celebrity_events)
               if c["collection"] not in {LIKE, REPOST, FOLLOW})  # fmt: skip
    assert ops["delete"] > 0.06 * sum(ops.values())


def test_celebrity_likes_and_follows_are_deleted_but_not_the_post(
    celebrity_events: list[Event],
) -> None:
    cs = commits(celebrity_events)
    first = next(c for c in cs if c["collection"] == POST)
    fans = {did_for(i) for i in range(1000, 1000 + CELEBRITY_N)}
    deleted = Counter(
        c["collection"] for c in cs if c["operation"] == "delete" and c["did"] in fans
    )
    assert deleted[LIKE] > 50
    assert deleted[FOLLOW] > 10
    assert not any(
        c["operation"] == "delete" and (c["did"], c["rkey"]) == (first["did"], first["rkey"])
        for c in cs
    )


def test_scattered_fans_make_the_same_stream_without_a_celebrity() -> None:
    """The control: as many fans doing as much, each subject drawn as everyone's."""
    fans = {did_for(i) for i in range(1000, 1000 + CELEBRITY_N)}
    shares = {}
    for scatter in (False, True):
        events = [json.loads(raw) for raw in generate(
            CELEBRITY_N, seed=SEED, celebrity=CELEBRITY, scatter=scatter
        )]  # fmt: skip
        creates = [c for c in commits(events) if c["operation"] == "create"]
        first = next(c for c in creates if c["collection"] == POST)
        star_post = f"at://{first['did']}/{POST}/{first['rkey']}"
        likes = [c for c in creates if c["collection"] == LIKE]
        follows = [c for c in creates if c["collection"] == FOLLOW]
        shares[scatter] = (
            sum(c["did"] in fans for c in likes) / len(likes),
            sum(c["did"] in fans for c in follows) / len(follows),
            sum(c["record"]["subject"]["uri"] == star_post for c in likes) / len(likes),
            max(Counter(c["record"]["subject"] for c in follows).values()) / len(follows),
        )
    fan_likes, fan_follows, star_likes, top_follows = shares[True]
    assert abs(fan_likes - shares[False][0]) <= 0.02 and abs(fan_likes - CELEBRITY) <= 0.03
    assert abs(fan_follows - shares[False][1]) <= 0.03
    assert star_likes < 0.25 < CELEBRITY <= shares[False][2]  # no celebrity left (Zipf: 16%)
    assert top_follows < 0.25 < CELEBRITY <= shares[False][3]
    with pytest.raises(ValueError, match="scatter needs a celebrity"):
        generate(10, scatter=True)


def test_a_celebrity_stream_is_deterministic() -> None:
    first = list(generate(3000, seed=5, celebrity=0.3))
    assert first == list(generate(3000, seed=5, celebrity=0.3))
    assert first != list(generate(3000, seed=5, celebrity=0.31))
    assert first != list(generate(3000, seed=5))


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5, math.nan])
def test_a_bad_celebrity_share_raises_at_the_call(tmp_path: Path, share: float) -> None:
    with pytest.raises(ValueError, match="celebrity must be >= 0 and < 1"):
        generate(10, celebrity=share)
    path = tmp_path / "bad.jsonl"
    with pytest.raises(ValueError, match="celebrity"):
        write_jsonl(path, 10, celebrity=share)
    assert not path.exists()


def test_write_jsonl_passes_the_celebrity_on(tmp_path: Path) -> None:
    path = tmp_path / "celebrity.jsonl"
    assert write_jsonl(path, 2000, seed=4, celebrity=0.5) == 2000
    assert path.read_bytes().split(b"\n")[:-1] == list(generate(2000, seed=4, celebrity=0.5))


# -- files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["events.jsonl", "events.jsonl.zst"])
def test_write_jsonl_round_trips(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert write_jsonl(path, 5000, seed=4) == 5000
    data = path.read_bytes()
    if name.endswith(".zst"):
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            data = reader.read()
    assert data.endswith(b"\n")
    assert data.split(b"\n")[:-1] == list(generate(5000, seed=4))


def test_write_jsonl_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    assert write_jsonl(str(path), 0) == 0
    assert path.read_bytes() == b""


def test_bad_arguments_raise_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate(-1)
    with pytest.raises(ValueError, match="accounts must be >= 2"):
        generate(10, accounts=1)
    path = tmp_path / "bad.jsonl"
    with pytest.raises(ValueError):
        write_jsonl(path, 10, accounts=0)
    assert not path.exists()
