"""Real atproto repos for tests of backfill: a Merkle search tree, a signed-looking commit, a CAR.

`FakeRepo.car()` is a CARv1 whose root is a commit (`did`, `version` 3, `data`, `rev`, `prev`
null, a 64-byte `sig` that nobody checks) pointing at a Merkle search tree built exactly as the
atproto repository spec lays it out, with every node and record a DAG-CBOR block under a CIDv1
(dag-cbor, sha2-256). Records keep links as `cbrrr.CID` (blob refs) and may hold bytes, so a
parser must map them back to `{"$link"}` and `{"$bytes"}` as the AppView does. `make_repos`
generates a set of repos whose records point at each other.
"""

from __future__ import annotations

import base64
import hashlib
import random
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbrrr

from indexer.events import time_from_us
from indexer.workload import (
    BLOCK,
    DEFAULT_START_TIME_US,
    FOLLOW,
    LIKE,
    POST,
    PROFILE,
    REPOST,
    did_for,
    tid,
)
from tests.fake_relay import car

Record = dict[str, Any]
Block = tuple[cbrrr.CID, bytes]


# --- the Merkle search tree -------------------------------------------------------------------


def key_depth(key: bytes) -> int:
    """The MST layer of a key: leading zero bits of its SHA-256, halved (a fanout of 4)."""
    digest = int.from_bytes(hashlib.sha256(key).digest(), "big")
    return (256 - digest.bit_length()) // 2


def _store(value: Any, blocks: list[Block]) -> cbrrr.CID:
    data = cbrrr.encode_dag_cbor(value)
    cid = cbrrr.CID.cidv1_dag_cbor_sha256_32_from(data)
    blocks.append((cid, data))
    return cid


def _shared_prefix(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def build_mst(entries: Mapping[bytes, cbrrr.CID]) -> tuple[cbrrr.CID, list[Block]]:
    """The root CID and the node blocks (root first) of the MST holding `entries`."""
    blocks: list[Block] = []
    keys = sorted(entries)
    if not keys:
        return _store({"l": None, "e": []}, blocks), blocks
    depths = {key: key_depth(key) for key in keys}
    root = _mst_node(keys, max(depths.values()), entries, depths, blocks)
    return root, blocks[::-1]  # children were stored first


def _mst_node(
    keys: Sequence[bytes],
    layer: int,
    entries: Mapping[bytes, cbrrr.CID],
    depths: Mapping[bytes, int],
    blocks: list[Block],
) -> cbrrr.CID:
    """One node at `layer` over sorted `keys`, none deeper than the layer. The keys of the layer
    stay here; each run of shallower keys between them becomes a subtree one layer down (which
    may hold no key of its own and only an `l`, when the layers skip one)."""
    here = [i for i, key in enumerate(keys) if depths[key] == layer]

    def subtree(start: int, end: int) -> cbrrr.CID | None:
        if start == end:
            return None
        return _mst_node(keys[start:end], layer - 1, entries, depths, blocks)

    left = subtree(0, here[0] if here else len(keys))
    node_entries = []
    previous = b""
    for n, i in enumerate(here):
        end = here[n + 1] if n + 1 < len(here) else len(keys)
        key = keys[i]
        prefix = _shared_prefix(previous, key)
        right = subtree(i + 1, end)
        node_entries.append({"p": prefix, "k": key[prefix:], "v": entries[key], "t": right})
        previous = key
    return _store({"l": left, "e": node_entries}, blocks)


# --- repos ------------------------------------------------------------------------------------


def atproto_json(value: Any) -> Any:
    """A DAG-CBOR value in the AppView's JSON form: links `{"$link"}`, bytes `{"$bytes"}`."""
    if isinstance(value, cbrrr.CID):
        return {"$link": value.encode()}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii").rstrip("=")}
    if isinstance(value, dict):
        return {k: atproto_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [atproto_json(v) for v in value]
    return value


@dataclass(frozen=True)
class Snapshot:
    """A repo at one rev, as served: the commit's CID, the rev and the CAR."""

    commit: str
    rev: str
    car: bytes


class FakeRepo:
    """An account's repo: records by `(collection, rkey)`, a rev that grows with each change.

    `status` ("takendown", "deactivated", "suspended") makes the repo inactive: listRepos says
    so and getRepo refuses it. Thread-safe: a test may change it while a server serves it.
    """

    def __init__(
        self,
        did: str,
        *,
        handle: str | None = None,
        clock_id: int | None = None,
        start_us: int = DEFAULT_START_TIME_US,
    ) -> None:
        self.did = did
        self.handle = handle or did.rsplit(":", 1)[-1][:16] + ".test"
        self.status: str | None = None
        self._clock_id = zlib.crc32(did.encode()) % 1024 if clock_id is None else clock_id
        self._time_us = start_us
        self.rev = tid(start_us, self._clock_id)
        self._records: dict[tuple[str, str], tuple[Record, cbrrr.CID, bytes]] = {}
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None

    def put(self, collection: str, rkey: str, record: Record, *, time_us: int | None = None) -> str:
        """Create or update a record; the new rev (a TID of `time_us`, by default 1 ms on)."""
        if not collection or not rkey or "/" in collection or "/" in rkey:
            raise ValueError(f"bad record key {collection}/{rkey}")
        data = cbrrr.encode_dag_cbor(record)  # refuses what DAG-CBOR cannot hold, early
        with self._lock:
            self._records[collection, rkey] = (record, _cid(data), data)
            return self._advance(time_us)

    def delete(self, collection: str, rkey: str, *, time_us: int | None = None) -> str:
        """Delete a record (KeyError if absent); the new rev."""
        with self._lock:
            del self._records[collection, rkey]
            return self._advance(time_us)

    def _advance(self, time_us: int | None) -> str:
        if time_us is None:
            time_us = self._time_us + 1000
        elif time_us <= self._time_us:
            # Same clock id, so only a later time makes a greater TID.
            raise ValueError(f"rev of {self.did} must increase: {time_us} <= {self._time_us}")
        self._time_us = time_us
        self.rev = tid(time_us, self._clock_id)
        self._snapshot = None
        return self.rev

    @property
    def records(self) -> dict[tuple[str, str], Record]:
        with self._lock:
            return {key: value[0] for key, value in self._records.items()}

    def uri(self, collection: str, rkey: str) -> str:
        return f"at://{self.did}/{collection}/{rkey}"

    def record_cid(self, collection: str, rkey: str) -> str:
        with self._lock:
            return self._records[collection, rkey][1].encode()

    def expected(self) -> dict[str, str]:
        """`{at-uri: record CID}` of every record the repo holds."""
        with self._lock:
            return {self.uri(c, r): value[1].encode() for (c, r), value in self._records.items()}

    def json_records(self) -> dict[str, Any]:
        """`{at-uri: record in the AppView's JSON form}`."""
        with self._lock:
            items = list(self._records.items())
        return {self.uri(c, r): atproto_json(value[0]) for (c, r), value in items}

    def snapshot(self) -> Snapshot:
        """The repo as getRepo serves it now (built once per rev)."""
        with self._lock:
            if self._snapshot is None:
                self._snapshot = self._build()
            return self._snapshot

    def car(self) -> bytes:
        return self.snapshot().car

    @property
    def commit_cid(self) -> str:
        return self.snapshot().commit

    def _build(self) -> Snapshot:
        leaves = {f"{c}/{r}".encode(): value[1] for (c, r), value in self._records.items()}
        mst_root, nodes = build_mst(leaves)
        unsigned: dict[str, Any] = {
            "did": self.did, "version": 3, "data": mst_root, "rev": self.rev, "prev": None,
        }  # fmt: skip
        # Any 64 bytes do: nobody checks the signature, but the same repo gets the same bytes.
        signature = hashlib.sha512(cbrrr.encode_dag_cbor(unsigned)).digest()
        commit_data = cbrrr.encode_dag_cbor({**unsigned, "sig": signature})
        commit = _cid(commit_data)
        # Records in key order, each block once: the same repo gives the same bytes.
        records = {
            cid.cid_bytes: (cid, data) for _, (_, cid, data) in sorted(self._records.items())
        }
        blocks = [(commit, commit_data), *nodes, *records.values()]
        return Snapshot(commit.encode(), self.rev, car(commit, blocks))


def _cid(data: bytes) -> cbrrr.CID:
    return cbrrr.CID.cidv1_dag_cbor_sha256_32_from(data)


# --- generated repos ----------------------------------------------------------------------

_KINDS = (POST, LIKE, FOLLOW, REPOST, BLOCK)
_KIND_WEIGHTS = (35, 35, 15, 10, 5)
_WORDS = ("sky", "blue", "fox", "river", "quiet", "lamp", "paper", "orbit", "salt", "maple")


@dataclass
class _Generator:
    """Records for a set of repos: posts first, so that likes, reposts and replies can point at
    real posts (their CIDs are the posts' block CIDs) in other repos."""

    rng: random.Random
    repos: list[FakeRepo]
    time_us: int
    posts: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)

    def tick(self) -> int:
        self.time_us += self.rng.randint(1, 2000)
        return self.time_us

    def blob(self) -> dict[str, Any]:
        ref = cbrrr.CID.cidv1_raw_sha256_32_from(self.rng.randbytes(32))
        size = self.rng.randint(10_000, 900_000)
        return {"$type": "blob", "ref": ref, "mimeType": "image/jpeg", "size": size}

    def profile(self, repo: FakeRepo) -> None:
        t = self.tick()
        record: Record = {"$type": PROFILE, "displayName": repo.handle.split(".")[0]}
        record |= {"description": self.text(), "createdAt": time_from_us(t)}
        if self.rng.random() < 0.5:
            record["avatar"] = self.blob()
        repo.put(PROFILE, "self", record, time_us=t)

    def text(self) -> str:
        return " ".join(self.rng.choices(_WORDS, k=self.rng.randint(2, 12)))

    def post(self, repo: FakeRepo) -> None:
        t = self.tick()
        rkey = tid(t, self.rng.randrange(1024))
        record: Record = {"$type": POST, "text": self.text(), "createdAt": time_from_us(t)}
        record["langs"] = ["en"]
        root = None
        if self.posts and self.rng.random() < 0.3:
            _, parent, root = self.rng.choice(self.posts)
            record["reply"] = {"root": root, "parent": parent}
        if self.rng.random() < 0.2:
            images = [
                {"alt": self.text(), "image": self.blob()} for _ in range(self.rng.randint(1, 4))
            ]
            record["embed"] = {"$type": "app.bsky.embed.images", "images": images}
        if self.rng.random() < 0.1:  # a field outside the lexicon, as records may have
            record["extra"] = self.rng.randbytes(self.rng.randint(1, 8))
        repo.put(POST, rkey, record, time_us=t)
        ref = {"uri": repo.uri(POST, rkey), "cid": repo.record_cid(POST, rkey)}
        self.posts.append((repo.did, ref, root or ref))

    def subject_post(self, repo: FakeRepo) -> dict[str, str] | None:
        """A post of another repo if one turns up in a few draws (else possibly its own)."""
        if not self.posts:
            return None
        for _ in range(5):
            did, ref, _ = self.rng.choice(self.posts)
            if did != repo.did:
                break
        return ref

    def other(self, repo: FakeRepo, kind: str, followed: set[tuple[str, str]]) -> None:
        """A like, repost, follow or block; a post when it has nothing left to point at."""
        subject: Any
        if kind in (LIKE, REPOST):
            subject = self.subject_post(repo)
        else:
            free = [
                r.did for r in self.repos if r.did != repo.did and (kind, r.did) not in followed
            ]
            subject = self.rng.choice(free) if free else None
            followed.add((kind, subject or ""))
        if subject is None:
            self.post(repo)
            return
        t = self.tick()
        record = {"$type": kind, "subject": subject, "createdAt": time_from_us(t)}
        repo.put(kind, tid(t, self.rng.randrange(1024)), record, time_us=t)


def make_repos(
    n_repos: int, records_per_repo: int, seed: int = 1, *, start_us: int = DEFAULT_START_TIME_US
) -> list[FakeRepo]:
    """`n_repos` repos of `records_per_repo` records each (a profile at `self`, then posts,
    likes, follows, reposts and blocks); the same arguments give the same repos, byte for byte."""
    rng = random.Random(seed)
    repos = [
        FakeRepo(did_for(i), handle=f"user{i}.test", clock_id=i % 1024, start_us=start_us)
        for i in range(n_repos)
    ]
    plans = {
        repo.did: rng.choices(_KINDS, _KIND_WEIGHTS, k=max(records_per_repo - 1, 0))
        for repo in repos
    }
    generator = _Generator(rng, repos, start_us)
    for repo in repos:
        if records_per_repo > 0:
            generator.profile(repo)
        for _ in range(plans[repo.did].count(POST)):
            generator.post(repo)
    for repo in repos:
        followed: set[tuple[str, str]] = set()
        for kind in plans[repo.did]:
            if kind != POST:
                generator.other(repo, kind, followed)
    return repos
