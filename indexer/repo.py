"""A whole repo as `com.atproto.sync.getRepo` serves it: the records of a CAR, walked by its MST.

The CAR's root is the signed commit (`did`, `rev`, `data`); `data` is the root of the Merkle
search tree whose keys are `collection/rkey` and whose values are the records' CIDs. A node is
`{"l": left subtree, "e": [{"p": prefix length, "k": key suffix, "v": record, "t": subtree}]}`,
each key stored as the bytes it does not share with the previous key of the node. The walk
reads every node once; it needs no particular tree shape, only that each node's keys rebuild.
The commit's signature is not checked: the repo comes over TLS from the PDS its DID document
names (or from a relay the operator chose), which is what the firehose trusts too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cbrrr
import msgspec

from indexer.car import BadCar, car_blocks, car_roots, cid_text, record_json


@dataclass(frozen=True, slots=True)
class RepoRecord:
    """One record of a repo; `record` is None when its block is missing or not DAG-CBOR."""

    collection: str
    rkey: str
    cid: str
    record: msgspec.Raw | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A repo at one commit: its rev and every record it holds."""

    did: str
    rev: str
    commit: str
    records: list[RepoRecord]


def read_repo(car: bytes) -> Snapshot:
    """Every record of a repo CAR; raises BadCar when the commit or the tree is incomplete."""
    blocks = car_blocks(car)
    roots = car_roots(car)
    if len(roots) != 1:
        raise BadCar(f"a repo CAR has one root, got {len(roots)}")
    commit = _decode(blocks, roots[0], "commit")
    did, rev, data = commit.get("did"), commit.get("rev"), commit.get("data")
    if not isinstance(did, str) or not isinstance(rev, str) or not isinstance(data, cbrrr.CID):
        raise BadCar("the commit lacks did, rev or data")
    records = []
    for key, value in _walk(blocks, data):
        collection, _, rkey = key.partition("/")
        if not rkey:
            raise BadCar(f"MST key {key!r} is not collection/rkey")
        record = record_json(blocks.get(value.cid_bytes))
        records.append(RepoRecord(collection, rkey, cid_text(value), record))
    return Snapshot(did, rev, cid_text(roots[0]), records)


def _walk(blocks: dict[bytes, memoryview], root: cbrrr.CID) -> Iterator[tuple[str, cbrrr.CID]]:
    """(key, record CID) for every entry under `root`; each node read once, no recursion."""
    stack = [root]
    seen: set[bytes] = set()
    while stack:
        cid = stack.pop()
        if cid.cid_bytes in seen:
            raise BadCar("the MST visits a node twice")
        seen.add(cid.cid_bytes)
        node = _decode(blocks, cid.cid_bytes, "MST node")
        left, entries = node.get("l"), node.get("e")
        if not isinstance(entries, list):
            raise BadCar("an MST node has no entry list")
        if isinstance(left, cbrrr.CID):
            stack.append(left)
        key = b""
        for entry in entries:
            key = _key(entry, key)
            value, right = entry.get("v"), entry.get("t")
            if not isinstance(value, cbrrr.CID):
                raise BadCar("an MST entry has no record CID")
            yield key.decode("utf-8", "replace"), value
            if isinstance(right, cbrrr.CID):
                stack.append(right)


def _key(entry: Any, previous: bytes) -> bytes:
    """An entry's whole key: the prefix it shares with the previous key, then its own suffix."""
    if not isinstance(entry, dict):
        raise BadCar("an MST entry is not a map")
    prefix, suffix = entry.get("p"), entry.get("k")
    if not isinstance(prefix, int) or not isinstance(suffix, bytes) or prefix > len(previous):
        raise BadCar("an MST entry's key does not rebuild")
    return previous[:prefix] + suffix


def _decode(blocks: dict[bytes, memoryview], cid: bytes, what: str) -> dict[str, Any]:
    block = blocks.get(cid)
    if block is None:
        raise BadCar(f"the CAR lacks the {what} block")
    try:
        value = cbrrr.decode_dag_cbor(bytes(block))
    except (ValueError, RecursionError) as exc:
        raise BadCar(f"the {what} block is not DAG-CBOR: {exc}") from None
    if not isinstance(value, dict):
        raise BadCar(f"the {what} block is not a map")
    return value
