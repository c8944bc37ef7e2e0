"""Deterministic generator of realistic Jetstream (v1 JSON) events.

Used by the benchmark (``bench/``) and by tests. The stream follows the live network's mix
(see DESIGN "Performance"): likes 61%, follows 16%, posts 15%, reposts 7%, blocks and profiles
the rest; 91% creates, 8% deletes, 1% updates (profile updates); about 0.5% ``identity`` and
``account`` events. Like, repost, reply and quote subjects and follow/block targets are drawn
Zipf-like (exponent 1.1), so a few posts and accounts are very hot: the hottest post, the
stream's first one until 50,000 posts later, gets about 8% of the likes.

With ``celebrity=x`` (0 <= x < 1) one post and its author take far more: a share x of the likes
and reposts are of the stream's first post, and a share x of the follows are of its author, on
top of what the usual draw gives them. On the network a celebrity's likes come from a crowd far
larger than the accounts active in a short stream, so these come from fan accounts (indexes from
``accounts`` up, ``did_for`` as the others), the n-th celebrity like from the n-th fan, and
likewise for reposts and follows: every fan likes, reposts and follows the celebrity once (bar
the deliberate duplicate likes), whatever the stream's length, and the share is met however few
the accounts. Fans do nothing else. The celebrity post is never deleted; its likes, reposts and
follows are, like any others.

With ``scatter=True`` as well (the celebrity's control), the fans act as before but like,
repost and follow what the usual draw gives them instead of the celebrity: as many events, fans
and new accounts, and no subject takes more than the Zipf draw gives it.

Guarantees of the generated stream (all with bounded memory, for any number of events):

- the same ``(n, seed, accounts, start_time_us, celebrity)`` gives byte-identical output, and
  ``celebrity=0`` the same bytes as before the option existed;
- ``time_us`` strictly increases (about 1000 events per second of simulated time), and so does
  every repo's ``rev`` (a TID of the event time with a per-account clock id);
- a create's ``rkey`` is a fresh TID (profiles use ``self``); no live record is created twice;
- deletes target records created earlier in the stream and not yet deleted (drawn from a bounded
  pool of recent creates; records that fall out of the pool are simply never deleted);
- updates only touch profiles: created earlier in the stream, or (most of them) before it began;
  profile writes are spread uniformly over accounts;
- likes/reposts/replies/quotes reference posts created earlier in the stream by strong ref
  (``{"uri", "cid"}``); a reply's root is its parent's root when the parent is itself a reply;
- about 1% of likes deliberately duplicate an earlier like (same creator and subject, new rkey);
  otherwise (creator, subject) pairs of likes, reposts, follows and blocks are kept unique as far
  as a bounded memory of recent pairs allows (and always for the celebrity's fans).

A deleted post may still receive likes or replies later, as on the real network.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
import time
from bisect import bisect_right
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import zstandard

__all__ = [
    "BLOCK",
    "DEFAULT_START_TIME_US",
    "FOLLOW",
    "LIKE",
    "POST",
    "PROFILE",
    "REPOST",
    "did_for",
    "generate",
    "make_cid",
    "tid",
    "write_jsonl",
]

LIKE = "app.bsky.feed.like"
POST = "app.bsky.feed.post"
REPOST = "app.bsky.feed.repost"
FOLLOW = "app.bsky.graph.follow"
BLOCK = "app.bsky.graph.block"
PROFILE = "app.bsky.actor.profile"

DEFAULT_START_TIME_US = 1_732_000_000_000_000

# Shares of all events / of commits.
IDENTITY_SHARE = 0.003
ACCOUNT_SHARE = 0.002
DELETE_SHARE = 0.08
PROFILE_WRITE_SHARE = 0.01  # ~90% updates of existing profiles, the rest profile creates
PROFILE_EXISTED_SHARE = 0.9  # accounts whose profile predates the stream
# Collection weights of the non-profile creates (cumulative table built in the generator).
CREATE_MIX: tuple[tuple[str, float], ...] = (
    (LIKE, 61.0),
    (FOLLOW, 16.0),
    (POST, 15.0),
    (REPOST, 7.0),
    (BLOCK, 0.5),
)
DUPLICATE_LIKE_SHARE = 0.01
REPLY_SHARE = 0.30
QUOTE_SHARE = 0.05
FACET_SHARE = 0.06
TAGS_SHARE = 0.02
ZIPF_EXPONENT = 1.1
MEAN_EVENT_GAP_US = 1000

# Bounds on the generator's memory.
POST_POOL = 50_000  # recent posts that can be liked/replied to (ring buffer)
CREATED_POOL = 100_000  # recent creates that can be deleted
RECENT_LIKES = 10_000  # recent likes that can be duplicated
SEEN_PAIRS = 250_000  # per generation (two generations kept)

_S32 = "234567abcdefghijklmnopqrstuvwxyz"
_B32_LOWER = b"abcdefghijklmnopqrstuvwxyz234567"
_MASK53 = (1 << 53) - 1
_PAIR_CODES = {LIKE: 1, REPOST: 2, FOLLOW: 3, BLOCK: 4}

_WORDS_TEXT = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line "
    "bluesky skeet feed post firehose atproto federation vibes today lol ok yes really cat dog "
    "coffee morning night music art photo rain sun weekend news update thread 🦋 ✨ 🎉 😂 ❤️ "
    "café naïve über 日本語 ありがとう obrigado gracias danke"
)
_LANGS: tuple[tuple[float, list[str] | None], ...] = (
    (0.80, ["en"]),
    (0.87, ["ja"]),
    (0.92, ["pt"]),
    (0.95, ["de"]),
    (0.97, ["en", "es"]),
    (1.01, None),
)


@cache
def _triples() -> tuple[str, ...]:
    """Every 15-bit value as 3 base32-sortable chars."""
    return tuple(a + b + c for a in _S32 for b in _S32 for c in _S32)


@cache
def _words() -> tuple[str, ...]:
    return tuple(_WORDS_TEXT.split())


@cache
def _b64_to_b32() -> bytes:
    b64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return bytes.maketrans(b64, bytes(_B32_LOWER[i & 31] for i in range(64)))


def tid(time_us: int, clock_id: int = 0) -> str:
    """A 13-char base32-sortable TID of a microsecond timestamp and a 10-bit clock id."""
    v = ((time_us & _MASK53) << 10) | (clock_id & 1023)
    t = _triples()
    return (
        _S32[v >> 60]
        + t[(v >> 45) & 32767]
        + t[(v >> 30) & 32767]
        + t[(v >> 15) & 32767]
        + t[v & 32767]
    )


def _b32(data: bytes) -> str:
    return base64.b32encode(hashlib.sha256(data).digest()).decode("ascii").lower()


def did_for(index: int) -> str:
    """The ``did:plc:`` of account ``index`` (24 base32 chars, deterministic)."""
    return "did:plc:" + _b32(b"firehose-indexer/account/%d" % index)[:24]


def make_cid(content: bytes | str) -> str:
    """A plausible (not real) CIDv1 string: ``bafyrei`` + 52 base32 chars from sha256(content).

    The 52 chars are the base64 of the digest (plus its first 7 bytes) mapped onto the base32
    alphabet: one C call instead of Python's slow base32 encoder.
    """
    data = content.encode() if isinstance(content, str) else content
    digest = hashlib.sha256(data).digest()
    b64 = binascii.b2a_base64(digest + digest[:7], newline=False)
    return "bafyrei" + b64.translate(_b64_to_b32()).decode("ascii")


def handle_for(index: int) -> str:
    return f"{_words()[index % 100].lower()}{index}.bsky.social"


def _zipf_table(size: int) -> list[float]:
    table: list[float] = []
    total = 0.0
    for rank in range(1, size + 1):
        total += rank**-ZIPF_EXPONENT
        table.append(total)
    return table


StrongRef = dict[str, str]
Record = dict[str, Any]
Event = dict[str, Any]


class _Generator:
    """The stream's state. Every container is bounded (see the module docstring)."""

    def __init__(
        self,
        seed: int,
        accounts: int,
        start_time_us: int,
        celebrity: float = 0.0,
        scatter: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.words = _words()
        self.accounts = accounts
        self.dids = [did_for(i) for i in range(accounts)]
        self.zipf = _zipf_table(max(accounts, POST_POOL))
        self.create_cum: list[float] = []
        total = 0.0
        for _, weight in CREATE_MIX:
            total += weight
            self.create_cum.append(total)
        self.create_total = total
        self.t = start_time_us
        self.seq = 4_000_000_000
        # posts: (ref, root ref); post_serials: serial number of the post in each slot
        self.posts: list[tuple[StrongRef, StrongRef]] = []
        self.post_serials: list[int] = []
        self.post_count = 0
        self.created: list[tuple[int, str, str]] = []  # (account, collection, rkey)
        self.recent_likes: list[tuple[int, StrongRef]] = []
        self.like_count = 0
        self.seen_new: set[int] = set()
        self.seen_old: set[int] = set()
        self.has_profile = bytearray(accounts)
        self.iso_cache: dict[int, str] = {}
        self.celebrity = celebrity
        self.scatter = scatter  # fans draw their subjects as everyone does
        self.celebrity_post: StrongRef | None = None  # the first post, once there is one
        self.celebrity_account = 0  # its author
        self.fans = dict.fromkeys((LIKE, REPOST, FOLLOW), 0)  # celebrity likes, ... so far

    # -- small helpers -------------------------------------------------------------------------

    def _index(self, size: int) -> int:
        return int(self.rng.random() * size)

    def _zipf(self, size: int) -> int:
        """A rank in ``[0, size)``, rank 0 the hottest."""
        u = self.rng.random() * self.zipf[size - 1]
        return bisect_right(self.zipf, u, 0, size - 1)

    def _iso(self, time_us: int) -> str:
        sec, us = divmod(time_us, 1_000_000)
        prefix = self.iso_cache.get(sec)
        if prefix is None:
            if len(self.iso_cache) > 4096:
                self.iso_cache.clear()
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self.iso_cache[sec] = prefix
        return f"{prefix}.{us // 1000:03d}Z"

    def _created_at(self) -> str:
        return self._iso(self.t - int(self.rng.random() * 1_500_000))

    def _rkey(self, account: int) -> str:
        return tid(self.t - 1000, account)

    def _claim(self, code: int, creator: int, target: int) -> bool:
        """Record a (creator, target) pair; False when it was seen recently."""
        key = (code << 62) | (creator << 32) | target
        if key in self.seen_new or key in self.seen_old:
            return False
        self.seen_new.add(key)
        if len(self.seen_new) >= SEEN_PAIRS:
            self.seen_old = self.seen_new
            self.seen_new = set()
        return True

    def _add_created(self, account: int, collection: str, rkey: str) -> None:
        entry = (account, collection, rkey)
        if len(self.created) < CREATED_POOL:
            self.created.append(entry)
        else:
            self.created[self._index(CREATED_POOL)] = entry

    def _did(self, account: int) -> str:
        # Fans are not kept in a list: there may be millions, each seen a few times.
        return self.dids[account] if account < self.accounts else did_for(account)

    def _emit(
        self,
        account: int,
        collection: str,
        operation: str,
        rkey: str,
        record: Record | None,
        cid: str | None = None,
    ) -> Event:
        did = self._did(account)
        commit: dict[str, Any] = {
            "rev": tid(self.t, account),
            "operation": operation,
            "collection": collection,
            "rkey": rkey,
        }
        if record is not None:
            commit["record"] = record
            commit["cid"] = cid or make_cid(f"{did}/{collection}/{rkey}/{self.t}")
        return {"did": did, "time_us": self.t, "kind": "commit", "commit": commit}

    # -- subjects ------------------------------------------------------------------------------

    def _fan(self, collection: str) -> int | None:
        """The fan who likes, reposts or follows the celebrity now, or None: the usual draw."""
        if self.celebrity_post is None or self.rng.random() >= self.celebrity:
            return None
        fan = self.accounts + self.fans[collection]
        self.fans[collection] += 1
        return fan

    def _liker(self, collection: str) -> tuple[int, StrongRef]:
        """Who likes or reposts which post: a fan the celebrity post, else the usual draw."""
        fan = self._fan(collection)
        if fan is not None and self.celebrity_post is not None and not self.scatter:
            return fan, self.celebrity_post
        creator = self._index(self.accounts) if fan is None else fan
        return creator, self._post_subject(_PAIR_CODES[collection], creator)

    def _hot_post(self) -> tuple[StrongRef, StrongRef]:
        return self.posts[self._zipf(len(self.posts))]

    def _post_subject(self, code: int, creator: int) -> StrongRef:
        """A post for creator to like/repost, avoiding a (creator, post) pair seen before."""
        size = len(self.posts)
        slot = 0
        for attempt in range(8):
            slot = self._zipf(size) if attempt < 4 else self._index(size)
            if self._claim(code, creator, self.post_serials[slot]):
                break
        return self.posts[slot][0]

    def _account_subject(self, code: int, creator: int) -> int:
        """An account for creator to follow/block (never itself), avoiding repeated pairs."""
        subject = 0
        for attempt in range(8):
            subject = self._zipf(self.accounts) if attempt < 4 else self._index(self.accounts)
            if subject == creator:
                subject = (subject + 1) % self.accounts
            if self._claim(code, creator, subject):
                break
        return subject

    # -- records -------------------------------------------------------------------------------

    def _like(self) -> Event:
        rng = self.rng
        if self.recent_likes and rng.random() < DUPLICATE_LIKE_SHARE:
            creator, subject = self.recent_likes[self._index(len(self.recent_likes))]
        else:
            creator, subject = self._liker(LIKE)
            entry = (creator, subject)
            if len(self.recent_likes) < RECENT_LIKES:
                self.recent_likes.append(entry)
            else:
                self.recent_likes[self.like_count % RECENT_LIKES] = entry
            self.like_count += 1
        record = {"$type": LIKE, "subject": subject, "createdAt": self._created_at()}
        return self._create(creator, LIKE, record)

    def _repost(self) -> Event:
        creator, subject = self._liker(REPOST)
        record = {"$type": REPOST, "subject": subject, "createdAt": self._created_at()}
        return self._create(creator, REPOST, record)

    def _graph(self, collection: str) -> Event:
        fan = self._fan(collection) if collection == FOLLOW else None
        if fan is not None and not self.scatter:
            creator, subject = fan, self.celebrity_account
        else:
            creator = self._index(self.accounts) if fan is None else fan
            subject = self._account_subject(_PAIR_CODES[collection], creator)
        record = {
            "$type": collection,
            "subject": self.dids[subject],
            "createdAt": self._created_at(),
        }
        return self._create(creator, collection, record)

    def _create(self, creator: int, collection: str, record: Record) -> Event:
        rkey = self._rkey(creator)
        self._add_created(creator, collection, rkey)
        return self._emit(creator, collection, "create", rkey, record)

    def _text(self, limit: int) -> str:
        length = int(self.rng.random() ** 1.5 * limit)
        if length == 0:
            return ""
        words = self.rng.choices(self.words, k=length // 4 + 1)
        return " ".join(words)[:length].rstrip()

    def _facet(self, text: str) -> tuple[str, Record]:
        """Append a mention, link or tag to text; return the new text and its facet."""
        r = self.rng.random()
        if r < 0.4:
            account = self._zipf(self.accounts)
            token = "@" + handle_for(account)
            feature: Record = {
                "$type": "app.bsky.richtext.facet#mention",
                "did": self.dids[account],
            }
        elif r < 0.7:
            token = f"https://example.com/{self._index(1_000_000)}"
            feature = {"$type": "app.bsky.richtext.facet#link", "uri": token}
        else:
            tag = self.rng.choice(self.words[:100])
            token = "#" + tag
            feature = {"$type": "app.bsky.richtext.facet#tag", "tag": tag}
        prefix = text + " " if text else ""
        start = len(prefix.encode())
        facet = {
            "$type": "app.bsky.richtext.facet",
            "index": {"byteStart": start, "byteEnd": start + len(token.encode())},
            "features": [feature],
        }
        return prefix + token, facet

    def _post_record(self) -> Record:
        rng = self.rng
        record: Record = {"$type": POST, "createdAt": self._created_at()}
        r = rng.random()
        for bound, langs in _LANGS:
            if r < bound:
                if langs is not None:
                    record["langs"] = langs
                break
        text = self._text(300)
        if rng.random() < FACET_SHARE:
            text, facet = self._facet(text[:240])
            record["facets"] = [facet]
        if rng.random() < TAGS_SHARE:
            record["tags"] = [rng.choice(self.words[:100])]
        record["text"] = text
        return record

    def _post(self) -> Event:
        rng = self.rng
        creator = self._index(self.accounts)
        did = self.dids[creator]
        rkey = self._rkey(creator)
        uri = f"at://{did}/{POST}/{rkey}"
        cid = make_cid(f"{did}/{POST}/{rkey}/{self.t}")
        record = self._post_record()
        ref = {"uri": uri, "cid": cid}
        root = ref
        if self.posts and rng.random() < REPLY_SHARE:
            parent, root = self._hot_post()
            record["reply"] = {"root": root, "parent": parent}
        if self.posts and rng.random() < QUOTE_SHARE:
            quoted = self._hot_post()[0]
            record["embed"] = {"$type": "app.bsky.embed.record", "record": quoted}
        self._add_post(ref, root)
        if self.celebrity and self.celebrity_post is None:
            # kept out of the pool of deletable creates: the celebrity post stays
            self.celebrity_post, self.celebrity_account = ref, creator
        else:
            self._add_created(creator, POST, rkey)
        return self._emit(creator, POST, "create", rkey, record, cid)

    def _add_post(self, ref: StrongRef, root: StrongRef) -> None:
        if len(self.posts) < POST_POOL:
            self.posts.append((ref, root))
            self.post_serials.append(self.post_count)
        else:
            slot = self.post_count % POST_POOL
            self.posts[slot] = (ref, root)
            self.post_serials[slot] = self.post_count
        self.post_count += 1

    def _profile(self) -> Event:
        # Profile writes are spread over all accounts, as on the network, where one account
        # seldom writes its profile twice within seconds. Most accounts had a profile before the
        # stream began, so most writes are updates of a profile the stream never created.
        rng = self.rng
        account = self._index(self.accounts)
        if not self.has_profile[account] and rng.random() < PROFILE_EXISTED_SHARE:
            self.has_profile[account] = 1
        operation = "update" if self.has_profile[account] else "create"
        self.has_profile[account] = 1
        record: Record = {
            "$type": PROFILE,
            "displayName": " ".join(rng.choices(self.words, k=2)).title()[:64],
            "description": self._text(256),
            "createdAt": self._created_at(),
        }
        if rng.random() < 0.6:
            record["avatar"] = {
                "$type": "blob",
                "ref": {"$link": "bafkrei" + make_cid(f"avatar/{account}/{self.t}")[7:]},
                "mimeType": "image/jpeg",
                "size": 20_000 + self._index(900_000),
            }
        return self._emit(account, PROFILE, operation, "self", record)

    def _delete(self) -> Event:
        pool = self.created
        i = self._index(len(pool))
        account, collection, rkey = pool[i]
        last = pool.pop()
        if i < len(pool):
            pool[i] = last
        return self._emit(account, collection, "delete", rkey, None)

    # -- events --------------------------------------------------------------------------------

    def _commit(self) -> Event:
        r = self.rng.random()
        if r < DELETE_SHARE and self.created:
            return self._delete()
        if DELETE_SHARE <= r < DELETE_SHARE + PROFILE_WRITE_SHARE:
            return self._profile()
        u = self.rng.random() * self.create_total
        collection = CREATE_MIX[bisect_right(self.create_cum, u)][0]
        if not self.posts or collection == POST:
            return self._post()
        if collection == LIKE:
            return self._like()
        if collection == REPOST:
            return self._repost()
        return self._graph(collection)

    def _identity(self) -> Event:
        account = self._index(self.accounts)
        did = self.dids[account]
        body = {
            "did": did,
            "handle": handle_for(account),
            "seq": self.seq,
            "time": self._iso(self.t),
        }
        return {"did": did, "time_us": self.t, "kind": "identity", "identity": body}

    def _account(self) -> Event:
        account = self._index(self.accounts)
        did = self.dids[account]
        body = {"active": True, "did": did, "seq": self.seq, "time": self._iso(self.t)}
        return {"did": did, "time_us": self.t, "kind": "account", "account": body}

    def next_event(self) -> Event:
        rng = self.rng
        self.t += 1 + int(rng.random() * (2 * MEAN_EVENT_GAP_US - 1))
        self.seq += 1 + int(rng.random() * 3)
        r = rng.random()
        if r < IDENTITY_SHARE:
            return self._identity()
        if r < IDENTITY_SHARE + ACCOUNT_SHARE:
            return self._account()
        return self._commit()


def generate(
    n: int,
    seed: int = 1,
    *,
    accounts: int | None = None,
    start_time_us: int = DEFAULT_START_TIME_US,
    celebrity: float = 0.0,
    scatter: bool = False,
) -> Iterator[bytes]:
    """Iterate over ``n`` Jetstream events, each one JSON object as bytes (no newline).

    ``accounts`` defaults to ``max(1000, n // 20)``; ``celebrity`` is the share of likes,
    reposts and follows that go to one post and its author, ``scatter`` its control (see the
    module docstring).
    Deterministic in all arguments; bad arguments raise ``ValueError`` at the call, before any
    event is produced.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    count = max(1000, n // 20) if accounts is None else accounts
    if count < 2:
        raise ValueError(f"accounts must be >= 2, got {count}")
    if not 0.0 <= celebrity < 1.0:  # NaN fails too
        raise ValueError(f"celebrity must be >= 0 and < 1, got {celebrity}")
    if scatter and not celebrity:
        raise ValueError("scatter needs a celebrity share (it scatters the celebrity's fans)")
    return _events(_Generator(seed, count, start_time_us, celebrity, scatter), n)


def _events(gen: _Generator, n: int) -> Iterator[bytes]:
    encode = msgspec.json.Encoder().encode
    next_event = gen.next_event
    for _ in range(n):
        yield encode(next_event())


def _write_lines(out: BinaryIO, events: Iterator[bytes]) -> int:
    count = 0
    chunk: list[bytes] = []
    for event in events:
        chunk.append(event)
        if len(chunk) >= 4096:
            out.write(b"\n".join(chunk) + b"\n")
            count += len(chunk)
            chunk.clear()
    if chunk:
        out.write(b"\n".join(chunk) + b"\n")
        count += len(chunk)
    return count


def write_jsonl(
    path: Path | str,
    n: int,
    seed: int = 1,
    *,
    accounts: int | None = None,
    start_time_us: int = DEFAULT_START_TIME_US,
    celebrity: float = 0.0,
    scatter: bool = False,
) -> int:
    """Write ``generate(...)`` as newline-delimited JSON (zstd when path ends in ``.zst``).

    Returns the number of events written.
    """
    target = Path(path)
    events = generate(
        n, seed, accounts=accounts, start_time_us=start_time_us, celebrity=celebrity,
        scatter=scatter,
    )  # fmt: skip
    with target.open("wb") as raw:
        if target.suffix != ".zst":
            return _write_lines(raw, events)
        with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as out:
            return _write_lines(out, events)
