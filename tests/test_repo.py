"""`indexer.repo.read_repo`: a repo CAR walked by its MST, and the CARs it refuses."""

from __future__ import annotations

import json

import cbrrr
import pytest

from indexer.car import BadCar, car_blocks
from indexer.repo import read_repo
from indexer.workload import LIKE, POST
from tests.fake_relay import car
from tests.fake_repo import FakeRepo, build_mst, make_repos


def _blocks(data: bytes) -> list[tuple[cbrrr.CID, bytes]]:
    """The (CID, bytes) blocks of a CAR, in order."""
    return [(cbrrr.CID(cid), bytes(block)) for cid, block in car_blocks(data).items()]


def test_every_record_of_generated_repos_with_its_json() -> None:
    for repo in make_repos(6, 120, seed=3):
        snapshot = read_repo(repo.car())
        assert (snapshot.did, snapshot.rev, snapshot.commit) == (
            repo.did,
            repo.rev,
            repo.commit_cid,
        )
        got = {f"at://{repo.did}/{r.collection}/{r.rkey}": r for r in snapshot.records}
        assert {uri: r.cid for uri, r in got.items()} == repo.expected()
        records = {uri: json.loads(bytes(r.record or b"")) for uri, r in got.items()}
        assert records == repo.json_records()


def test_an_empty_repo_has_no_records() -> None:
    repo = FakeRepo("did:plc:empty")
    assert read_repo(repo.car()).records == []


def test_a_missing_record_block_is_a_record_without_body() -> None:
    repo = FakeRepo("did:plc:holes")
    repo.put(POST, "p1", {"$type": POST, "text": "kept", "createdAt": "2024-01-01T00:00:00Z"})
    repo.put(LIKE, "l1", {"$type": LIKE, "createdAt": "2024-01-01T00:00:00Z"})
    lost = cbrrr.CID.decode(repo.record_cid(LIKE, "l1"))
    blocks = [(cid, data) for cid, data in _blocks(repo.car()) if cid != lost]
    root = cbrrr.CID.decode(repo.commit_cid)
    records = {r.rkey: r.record for r in read_repo(car(root, blocks)).records}
    assert records["l1"] is None and records["p1"] is not None


def _commit(data: object) -> tuple[cbrrr.CID, bytes]:
    block = cbrrr.encode_dag_cbor(data)
    return cbrrr.CID.cidv1_dag_cbor_sha256_32_from(block), block


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("truncated", "runs past the end"),
        ("no commit block", "lacks the commit block"),
        ("commit without data", "lacks did, rev or data"),
        ("no MST node", "lacks the MST node block"),
        ("bad key", "does not rebuild"),
    ],
)
def test_unreadable_cars_are_refused_with_a_reason(case: str, reason: str) -> None:
    repo = FakeRepo("did:plc:broken")
    repo.put(POST, "p1", {"$type": POST, "text": "x", "createdAt": "2024-01-01T00:00:00Z"})
    whole = repo.car()
    root = cbrrr.CID.decode(repo.commit_cid)
    blocks = _blocks(whole)
    if case == "truncated":
        data = whole[:-10]
    elif case == "no commit block":
        data = car(root, blocks[1:])
    elif case == "commit without data":
        cid, block = _commit({"did": repo.did, "rev": repo.rev})
        data = car(cid, [(cid, block), *blocks[1:]])
    elif case == "no MST node":
        mst_root, _ = build_mst({b"app.bsky.feed.post/p1": blocks[-1][0]})
        data = car(root, [b for b in blocks if b[0] != mst_root])
    else:
        node = {"l": None, "e": [{"p": 5, "k": b"x", "v": blocks[-1][0], "t": None}]}
        node_cid, node_block = _commit(node)
        cid, block = _commit({"did": repo.did, "rev": repo.rev, "data": node_cid})
        data = car(cid, [(cid, block), (node_cid, node_block)])
    with pytest.raises(BadCar, match=reason):
        read_repo(data)
